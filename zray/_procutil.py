"""Process helpers: tie a child's life to its parent, find GPUs, private dirs.

Every directory zray keeps state in (the object store under /dev/shm, spill
dirs, session dirs with their sockets and logs, ~/.zray) goes through
``private_dir``: created 0700, and refused when it already exists but is a
symlink, belongs to another user or is writable by group or others. Such a
directory would let another local user plant objects (which zray unpickles),
sockets or addresses, i.e. run code as the cluster's user.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback

_PR_SET_PDEATHSIG = 1


class UnsafePathError(PermissionError):
    """A directory or file zray would use is not private to this user."""


def user_tmp_dir() -> str:
    """This user's zray dir for sessions, spill files and the address file (not created)."""
    return os.environ.get("ZRAY_TMPDIR") or os.path.join(tempfile.gettempdir(),
                                                         f"zray-{os.getuid()}")


_bytecode_cache: list = []  # [the cache dir, or None], once found


def bytecode_env(env: dict) -> dict:
    """``env`` for a process of ours (broker, node agent, executor), with its bytecode
    cached. Where PYTHONDONTWRITEBYTECODE is set (Docker images often set it) and nothing
    was compiled before (an editable install, a checkout), each of them compiled every
    module it imports at each start: importing workerd.executor and brokerd took 1.3-2.4 s
    without bytecode against 0.35-0.55 s with it, on this 2-core machine, for every
    executor started. Our processes write it to a cache of this user's instead
    (PYTHONPYCACHEPREFIX: owner-only, checked to be ours; never into the source tree the
    setting keeps clean). An explicit PYTHONPYCACHEPREFIX is left as it is."""
    if not env.get("PYTHONDONTWRITEBYTECODE") or env.get("PYTHONPYCACHEPREFIX"):
        return env
    if not _bytecode_cache:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                ".cache")
        found = None
        for where in (os.path.join(base, "zray"), user_tmp_dir()):
            try:
                found = private_dir(where, "pycache")
                break
            except (OSError, UnsafePathError):
                continue
        _bytecode_cache.append(found)
    if _bytecode_cache[0] is not None:
        env["PYTHONPYCACHEPREFIX"] = _bytecode_cache[0]
        del env["PYTHONDONTWRITEBYTECODE"]
    return env


def private_dir(path: str, *subdirs: str) -> str:
    """Make ``path`` (then each of ``subdirs`` below it, in turn) a directory only this
    user can use, and return the last one.

    A missing directory is created with mode 0700 (whatever the umask); missing
    parents of ``path`` itself are created too. An existing one is used only if it
    is a real directory (not a symlink), owned by this uid and not writable by
    group or others; it is then tightened to 0700. Otherwise ``UnsafePathError``
    names the path and what is wrong with it.
    """
    _one_private_dir(path, create_parents=True)
    for sub in subdirs:
        path = os.path.join(path, sub)
        _one_private_dir(path)
    return path


def _one_private_dir(path: str, create_parents: bool = False) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        if not create_parents:
            raise
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        return _one_private_dir(path)
    # Checked on an fd opened without following a symlink, so what is checked is
    # what gets chmod-ed and used.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        if os.path.islink(path):
            raise UnsafePathError(f"refusing to use {path}: it is a symlink (to "
                                  f"{os.readlink(path)!r}); zray keeps its files only in "
                                  f"private directories. Remove it and try again.") from None
        if not os.path.isdir(path):
            raise UnsafePathError(f"refusing to use {path}: it is not a directory") from None
        raise UnsafePathError(f"cannot open {path}: {e}") from None
    try:
        st = os.fstat(fd)
        uid = os.getuid()
        if st.st_uid != uid:
            raise UnsafePathError(
                f"refusing to use {path}: it belongs to uid {st.st_uid}, not to this user "
                f"(uid {uid}); another user may have planted it. Remove it (or point "
                f"ZRAY_TMPDIR / ZRAY_SHM_DIR elsewhere) and try again.")
        if st.st_mode & 0o022:
            raise UnsafePathError(
                f"refusing to use {path}: it is writable by group or others (mode "
                f"{st.st_mode & 0o777:o}), so anything in it may have been planted. Remove "
                f"it and try again.")
        if st.st_mode & 0o777 != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def write_private_file(path: str, data: bytes | str, exclusive: bool = False) -> None:
    """Write a file only this user can read, never through a symlink planted at ``path``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def exit_forked_child(exc: BaseException | None = None):
    """End a process that user code forked from a zray process (an executor).

    The child is a copy of its parent: it must never return into the parent's
    loop, which would run with the parent's sockets. It ends as a plain Python
    program would: with SystemExit's code, with 1 and a traceback on stderr for
    any other exception, with 0 when the user code returned.
    """
    code = 0
    if isinstance(exc, SystemExit):
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    elif exc is not None:
        traceback.print_exception(exc)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code & 0xFF)


def signal_wakeup_fd() -> int | None:
    """The read end of a pipe that becomes readable when a signal with a Python handler
    arrives (``signal.set_wakeup_fd``): a daemon polls it beside its sockets, so its
    SIGTERM handler takes effect at once instead of after the poll's timeout (a stop
    used to wait out up to 250 ms of it: zmq_poll, interrupted, runs the handler and
    polls again for the whole timeout). The handler leaves the byte there, so that
    poll returns at once; its loop then ends. None off the main thread (only the
    main thread may set it)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:
        os.close(r)
        os.close(w)
        return None
    return r


def die_with_parent(expected_ppid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    Closes the race where the parent died before the call by comparing the
    current parent pid with ``expected_ppid``. A watchdog thread covers
    platforms without prctl.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except Exception:
            _watch_parent()
    else:
        _watch_parent()
    if expected_ppid is not None and os.getppid() != expected_ppid:
        os._exit(1)


def _watch_parent():
    ppid = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(1)

    threading.Thread(target=watch, name="zray-parent-watch", daemon=True).start()


def env_number(name: str, default, lo, hi, cast=float, what: str = "a number"):
    """The number in environment variable ``name`` (``default`` if unset or empty), checked
    to be within ``lo..hi``; a bad value is a ValueError naming the variable."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ValueError(f"{name} must be {what} ({lo}..{hi}), got {text!r}")
    return value


def detect_gpus() -> list:
    """GPU ids this machine offers: CUDA_VISIBLE_DEVICES if set, else the NVIDIA driver's list
    (its /proc entries, or ``nvidia-smi`` where the driver has none, as in some sandboxes)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [g.strip() for g in cvd.split(",") if g.strip() and g.strip() != "-1"]
    try:
        entries = os.listdir("/proc/driver/nvidia/gpus")
        return [str(i) for i in range(len(entries))]
    except OSError:
        return [str(i) for i in range(len(_nvidia_smi_models()))]


def detect_accelerator_type() -> str | None:
    """The type of this machine's NVIDIA GPUs as Ray names it (``"NVIDIA H100 80GB HBM3"``
    -> ``"H100"``, ``"NVIDIA GeForce RTX 4090"`` -> ``"GeForce-RTX-4090"``), from the
    driver's /proc entry of the first GPU (or ``nvidia-smi``); None without one."""
    try:
        first = sorted(os.listdir("/proc/driver/nvidia/gpus"))[0]
        with open(f"/proc/driver/nvidia/gpus/{first}/information") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("Model:")), "")
    except (OSError, IndexError):
        models = _nvidia_smi_models()
        if not models:
            return None
        model = models[0]
    return accelerator_type_of(model)


_smi_models: list | None = None


def _nvidia_smi_models() -> list:
    """The GPU model names ``nvidia-smi`` lists, in index order; [] without it (asked once
    per process: only where the driver has no /proc entries)."""
    global _smi_models
    if _smi_models is None:
        import shutil
        import subprocess

        exe = shutil.which("nvidia-smi")
        models: list = []
        if exe:
            try:
                out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=15,
                                     stdin=subprocess.DEVNULL)
                if out.returncode == 0:
                    models = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            except (OSError, subprocess.SubprocessError):
                models = []
        _smi_models = models
    return _smi_models


def accelerator_type_of(model: str) -> str | None:
    """Ray's accelerator type for a GPU model name: after the vendor word, the all-capital
    words up to and including the first token with a digit (its leading capitals and
    digits), joined by dashes; failing that, the name without "NVIDIA", dashed."""
    words = model.split()
    picked = []
    for word in words[1:]:
        lead = word[:len(word) - len(word.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))]
        if any(c.isdigit() for c in lead):
            picked.append(lead)
            if len("-".join(picked)) > 1:
                return "-".join(picked)
            break
        if not (lead and lead == word):
            break
        picked.append(word)
    rest = words[1:] if words[:1] == ["NVIDIA"] else words
    return "-".join(rest) or None


def new_session_dir(base: str | None = None) -> str:
    """A new private (0700) directory for this cluster's sockets and logs: under init's
    ``_temp_dir`` (in a private ``zray-UID`` directory there, so a shared temp dir such as
    /tmp works and no other user can plant anything), or ``$ZRAY_TMPDIR`` / ``/tmp/zray-UID``."""
    if base is not None:
        os.makedirs(base, mode=0o700, exist_ok=True)
        base = private_dir(os.path.join(base, f"zray-{os.getuid()}"))
    else:
        base = private_dir(user_tmp_dir())
    _prune_sessions(base)
    # mkdtemp: a fresh name, created 0700 with O_EXCL semantics (mkdir fails if it exists)
    path = tempfile.mkdtemp(prefix=time.strftime("session_%Y%m%d-%H%M%S_"), dir=base)
    private_dir(path, "logs")
    # in use while this process lives
    write_private_file(os.path.join(path, ".pid"), str(os.getpid()), exclusive=True)
    return path


def setup_logging(name: str, log_dir: str | None, level: int = logging.INFO, stderr: bool = True):
    handlers: list = []
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    from zray import _logfiles

    if log_dir:
        private_dir(log_dir)
        handlers.append(_logfiles.PrivateRotatingFileHandler(os.path.join(log_dir, f"{name}.log")))
    _logfiles.rotate_stdio()  # stdout/stderr into a file (daemon .out, executor log): rotated
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {name} %(process)d -- %(message)s")
    root = logging.getLogger()
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level)


def _prune_sessions(base: str, keep: int = 20, min_age_s: float = 3600.0) -> None:
    """Delete old session dirs (logs of clusters long gone): all but the newest
    ``keep``, and only those untouched for ``min_age_s``."""
    import shutil

    try:
        entries = [e for e in os.scandir(base) if e.name.startswith("session_") and e.is_dir()]
    except OSError:
        return
    def mtime(e) -> float:  # another process may be pruning the same dir right now
        try:
            return e.stat().st_mtime
        except OSError:
            return 0.0

    entries.sort(key=mtime, reverse=True)
    now = time.time()
    for e in entries[keep:]:
        try:
            if now - mtime(e) <= min_age_s:
                continue
            with open(os.path.join(e.path, ".pid")) as f:
                pid = int(f.read().strip() or 0)
            os.kill(pid, 0)  # its creator lives: the cluster may still be running
        except ProcessLookupError:
            shutil.rmtree(e.path, ignore_errors=True)
        except (OSError, ValueError):
            pass
