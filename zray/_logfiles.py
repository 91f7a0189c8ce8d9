"""Log files of a session: where they are, how they rotate, how a task's lines are found.

::

    <session dir>/logs/
        broker.log  node.log              daemon logs (logging, RotatingFileHandler)
        broker.out  node.out  <role>.out  daemon stdout/stderr (rotated by rotate_stdio)
        executor-<cid>.log                one per executor: what its tasks print (rotated
                                          by rotate_stdio), with a marker line before the
                                          first output of each task: ":task_name:<id> <name>"
        executors.tsv                     "<cid hex>\\t<pid>\\t<start time>" per executor

Rotation (Ray's scheme and defaults): a file past ZRAY_ROTATION_MAX_BYTES (512 MiB)
becomes ``<name>.1`` (``.1`` becomes ``.2`` ... up to ZRAY_ROTATION_BACKUP_COUNT, 5) and
a new file takes its place. A process's stdout/stderr are rotated from inside it: a
thread checks the size once a second and ``dup2``s the new file onto fd 1 and 2, so
Python's and native code's writes both land in the new file.
"""

from __future__ import annotations

import logging.handlers
import os
import threading
import time

MARKER = ":task_name:"
EXECUTOR_INDEX = "executors.tsv"


def _env_int(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {text!r}")
    return value


def max_bytes() -> int:
    return _env_int("ZRAY_ROTATION_MAX_BYTES", 512 * 1024 * 1024, 1024)


def backup_count() -> int:
    return _env_int("ZRAY_ROTATION_BACKUP_COUNT", 5, 0)


def shift_backups(path: str, backups: int) -> None:
    """path.(n-1) -> path.n ... path -> path.1 (the oldest beyond ``backups`` goes)."""
    if backups == 0:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    for i in range(backups - 1, 0, -1):
        try:
            os.replace(f"{path}.{i}", f"{path}.{i + 1}")
        except FileNotFoundError:
            pass
    os.replace(path, f"{path}.1")


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A daemon's log file: owner-only (0600), never opened through a symlink, rotated
    at max_bytes() with backup_count() backups."""

    def __init__(self, path: str):
        super().__init__(path, maxBytes=max_bytes(), backupCount=backup_count(), delay=True)

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                     0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


_rotating = False


def rotate_stdio(interval: float = 1.0) -> bool:
    """Rotate this process's stdout (and stderr, when it is the same file) by size, if
    stdout is a regular file. Started once per process; True if rotation runs."""
    global _rotating
    if _rotating:
        return True
    try:
        path = os.readlink("/proc/self/fd/1")
        st = os.fstat(1)
    except OSError:
        return False
    import stat

    if not stat.S_ISREG(st.st_mode) or not os.path.isabs(path):
        return False
    limit, backups = max_bytes(), backup_count()
    _rotating = True

    def watch():
        while True:
            time.sleep(interval)
            try:
                st = os.fstat(1)
                if st.st_size <= limit:
                    continue
                same_err = _same_file(2, st)
                on_disk = os.stat(path)
                if (on_disk.st_dev, on_disk.st_ino) != (st.st_dev, st.st_ino):
                    continue  # someone else moved our file: leave it alone
                for stream in _std_streams():
                    stream.flush()
                shift_backups(path, backups)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                             0o600)
                os.dup2(fd, 1)
                if same_err:
                    os.dup2(fd, 2)
                os.close(fd)
            except OSError:
                continue

    threading.Thread(target=watch, name="zray-log-rotation", daemon=True).start()
    return True


def _same_file(fd: int, st) -> bool:
    try:
        other = os.fstat(fd)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _std_streams():
    import sys

    out = []
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if s is not None and hasattr(s, "flush"):
            out.append(s)
    return out


def record_executor(log_dir: str, cid_hex: str, pid: int) -> None:
    """Append an executor to the node's index (which log file is which pid)."""
    fd = os.open(os.path.join(log_dir, EXECUTOR_INDEX),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{cid_hex}\t{pid}\t{time.time():.3f}\n".encode())
    finally:
        os.close(fd)


def executor_index(log_dir: str) -> dict:
    """{pid: cid hex} of the executors a node started (a reused pid: the latest)."""
    out: dict = {}
    try:
        with open(os.path.join(log_dir, EXECUTOR_INDEX)) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1].strip().isdigit():
                    out[int(parts[1])] = parts[0]
    except OSError:
        pass
    return out


def executor_log(log_dir: str, cid_hex: str) -> str:
    return os.path.join(log_dir, f"executor-{cid_hex}.log")


def with_backups(path: str) -> list:
    """The rotated files of ``path``, oldest first, then ``path``."""
    backups = []
    i = 1
    while os.path.exists(f"{path}.{i}"):
        backups.append(f"{path}.{i}")
        i += 1
    return list(reversed(backups)) + ([path] if os.path.exists(path) else [])


def task_lines(paths: list, task_id_hex: str) -> list:
    """The lines a task printed: from its marker to the next marker, in ``paths``."""
    out = []
    marker = f"{MARKER}{task_id_hex}"
    for path in paths:
        inside = False
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    if line.startswith(MARKER):
                        inside = line.startswith(marker)
                        continue
                    if inside:
                        out.append(line)
        except OSError:
            continue
    return out


def files_with_task(log_dir: str, task_id_hex: str) -> list:
    """Executor logs (the current file's path, for each) whose file or backups hold the
    marker of a task."""
    import mmap

    marker = f"{MARKER}{task_id_hex}".encode()
    found = []
    try:
        names = sorted(n for n in os.listdir(log_dir) if n.startswith("executor-"))
    except OSError:
        return []
    for name in names:
        path = os.path.join(log_dir, name)
        base = path[:path.rindex(".log") + 4]
        if base in found:
            continue
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    continue
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if m.find(marker) >= 0:
                        found.append(base)
        except (OSError, ValueError):
            continue
    return found
