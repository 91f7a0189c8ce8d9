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
        with os.fdopen(open_regular(os.path.join(log_dir, EXECUTOR_INDEX))) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1].strip().isdigit():
                    out[int(parts[1])] = parts[0]
    except (OSError, ValueError):
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


def task_lines(paths: list, task_id_hex: str, raw: bool = False) -> list:
    """The lines a task printed: from its marker to the next marker, in ``paths``
    (``raw``: as bytes, undecoded)."""
    out = []
    marker = f"{MARKER}{task_id_hex}"
    start = MARKER
    if raw:
        marker, start = marker.encode(), MARKER.encode()
    for path in paths:
        inside = False
        try:
            with (os.fdopen(open_regular(path), "rb") if raw else
                  os.fdopen(open_regular(path), errors="replace")) as f:
                for line in f:
                    if line.startswith(start):
                        inside = line.startswith(marker)
                        continue
                    if inside:
                        out.append(line)
        except (OSError, ValueError):
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
            with os.fdopen(open_regular(path), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    continue
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if m.find(marker) >= 0:
                        found.append(base)
        except (OSError, ValueError):
            continue
    return found


# ------------------------------------------------ reading for others (LOG_READ, REQ)
MAX_ANSWER_BYTES = 1 << 20  # text in one answer
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _file(log_dir: str, name) -> str:
    """The path of a file directly in ``log_dir``; a name with a path in it is refused."""
    if (not isinstance(name, str) or not name or len(name) > 255 or name[0] == "."
            or not set(name) <= _NAME_OK):
        raise ValueError(f"not a log file name: {name!r:.80}")
    return os.path.join(log_dir, name)


def open_regular(path: str) -> int:
    """A read-only fd of ``path`` if it is a regular file, never opened through a
    symlink and never blocking (a FIFO planted in the log dir would stall the node or
    the broker on open); ValueError naming the file otherwise."""
    import errno
    import stat

    name = os.path.basename(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{name} is a symbolic link, not a log file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{name} is not a regular file")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _stat_regular(path: str) -> os.stat_result:
    """The stat of a regular file ``path`` (not followed if a symlink)."""
    import stat

    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise ValueError(f"{os.path.basename(path)} is {kind}, not a log file")
    return st


def _read(path: str, offset: int, limit: int) -> tuple:
    """(bytes from ``offset``, at most ``limit``; the file's stat) of a regular file,
    never through a symlink."""
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        return os.pread(fd, limit, offset) if limit > 0 else b"", st
    finally:
        os.close(fd)


def tail_text(paths: list, n: int, limit: int = MAX_ANSWER_BYTES, raw: bool = False) -> tuple:
    """(the last ``n`` lines (all for -1) of ``paths`` joined, at most ``limit`` bytes of
    them: the newest; whether older wanted output was left out for the limit). ``raw``:
    bytes, undecoded (else text, undecodable bytes replaced)."""
    chunks: list = []
    lines = size = 0
    stopped = False  # by the limit, with more before
    for path in reversed(paths):
        try:
            end = _stat_regular(path).st_size
        except (OSError, ValueError):
            continue
        while end > 0 and not (n >= 0 and lines > n):
            if size >= limit:
                stopped = True
                break
            step = min(65536, end)
            data, _ = _read(path, end - step, step)
            end -= step
            chunks.insert(0, data)
            lines += data.count(b"\n")
            size += len(data)
        if stopped or (n >= 0 and lines > n):
            break
    text = b"".join(chunks)
    if len(text) > limit:
        text, stopped = text[-limit:], True
    out = (text if raw else text.decode(errors="replace")).splitlines(keepends=True)
    if n >= 0:
        truncated = stopped and len(out) <= n
        out = out[-n:] if n else []
    else:
        truncated = stopped
    if truncated and out:
        out = out[1:]  # its first line is cut
    return (b"" if raw else "").join(out), truncated


def serve(log_dir: str, op: str, args: dict) -> dict:
    """Answer a log query about ``log_dir`` (a node's, or the broker's):

    * ``list``: {} -> {files: [[name, size], ...], executors: [[pid, cid hex], ...]}
    * ``tail``: {name, lines} -> {text, truncated, ino, size}: the last ``lines`` lines
      (-1: all) of the file and its rotated backups, at most MAX_ANSWER_BYTES of them
    * ``read``: {name, offset, ino} -> {text, ino, offset}: what follows ``offset``; if
      the file was rotated since (its inode is not ``ino``), the rest of the old file
      (now ``name.1``) and then {ino: the new one's, offset: 0}
    * ``task``: {task_id} -> {files, text, truncated}: the lines a task printed

    ``raw`` True in ``args``: ``text`` is the file's bytes, undecoded (get_log decodes them
    with the caller's ``encoding`` and ``errors``, as Ray does); else UTF-8 text with
    undecodable bytes replaced.
    """
    if not log_dir or not os.path.isdir(log_dir):
        raise ValueError("no log directory here")
    raw = args.get("raw") is True  # text as bytes, undecoded: the client decodes it
    if op == "list":
        files = []
        for name in sorted(os.listdir(log_dir)):
            try:
                st = os.stat(os.path.join(log_dir, name), follow_symlinks=False)
            except OSError:
                continue
            import stat

            if stat.S_ISREG(st.st_mode):
                files.append([name, st.st_size])
        return {"files": files,
                "executors": [[pid, cid] for pid, cid in executor_index(log_dir).items()]}
    if op == "tail":
        path = _file(log_dir, args.get("name"))
        n = args.get("lines", 1000)
        if type(n) is not int or n < -1:
            raise ValueError("lines must be an int >= -1")
        st = _stat_regular(path)
        text, truncated = tail_text(with_backups(path), n, raw=raw)
        return {"text": text, "truncated": truncated, "ino": st.st_ino, "size": st.st_size}
    if op == "read":
        path = _file(log_dir, args.get("name"))
        offset, ino = args.get("offset", 0), args.get("ino")
        if type(offset) is not int or offset < 0 or (ino is not None and type(ino) is not int):
            raise ValueError("offset must be an int >= 0 and ino an int")
        st = _stat_regular(path)
        if ino is not None and st.st_ino != ino:  # rotated: finish the old file first
            try:
                old = os.stat(path + ".1")
                if old.st_ino == ino and old.st_size > offset:
                    data, _ = _read(path + ".1", offset, MAX_ANSWER_BYTES)
                    return {"text": data if raw else data.decode(errors="replace"),
                            "ino": ino, "offset": offset + len(data)}
            except OSError:
                pass
            offset = 0
        elif offset > st.st_size:  # truncated
            offset = 0
        data, st = _read(path, offset, MAX_ANSWER_BYTES)
        return {"text": data if raw else data.decode(errors="replace"), "ino": st.st_ino,
                "offset": offset + len(data)}
    if op == "task":
        task = args.get("task_id")
        if not isinstance(task, str) or len(task) > 64 or not all(
                c in "0123456789abcdef" for c in task):
            raise ValueError("task_id must be a hex string")
        files = files_with_task(log_dir, task)
        lines = []
        for path in files:
            lines += task_lines(with_backups(path), task, raw)
        text = (b"" if raw else "").join(lines)
        truncated = len(text) > MAX_ANSWER_BYTES
        return {"files": [os.path.basename(p) for p in files],
                "text": text[-MAX_ANSWER_BYTES:], "truncated": truncated}
    raise ValueError(f"unknown log operation {op!r:.40}")
