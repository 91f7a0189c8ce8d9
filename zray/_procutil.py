"""Process helpers: tie a child's life to its parent, find GPUs, session dirs."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import tempfile
import threading
import time

_PR_SET_PDEATHSIG = 1


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


def detect_gpus() -> list:
    """GPU ids this machine offers: CUDA_VISIBLE_DEVICES if set, else the NVIDIA driver's list."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [g.strip() for g in cvd.split(",") if g.strip() and g.strip() != "-1"]
    try:
        entries = os.listdir("/proc/driver/nvidia/gpus")
        return [str(i) for i in range(len(entries))]
    except OSError:
        return []


def detect_accelerator_type() -> str | None:
    """The type of this machine's NVIDIA GPUs as Ray names it (``"NVIDIA H100 80GB HBM3"``
    -> ``"H100"``, ``"NVIDIA GeForce RTX 4090"`` -> ``"GeForce-RTX-4090"``), from the
    driver's /proc entry of the first GPU; None without one."""
    try:
        first = sorted(os.listdir("/proc/driver/nvidia/gpus"))[0]
        with open(f"/proc/driver/nvidia/gpus/{first}/information") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("Model:")), "")
    except (OSError, IndexError):
        return None
    return accelerator_type_of(model)


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
    """A private (0700) directory for this cluster's sockets and logs, under ``base``
    (init's ``_temp_dir``; created 0700 if missing, never re-permissioned if it exists)
    or the private ``$ZRAY_TMPDIR`` / ``/tmp/zray-UID``."""
    if base is None:
        base = os.environ.get("ZRAY_TMPDIR") or os.path.join(tempfile.gettempdir(),
                                                             f"zray-{os.getuid()}")
        os.makedirs(base, mode=0o700, exist_ok=True)
        os.chmod(base, 0o700)
    else:
        os.makedirs(base, mode=0o700, exist_ok=True)
    _prune_sessions(base)
    path = tempfile.mkdtemp(prefix=time.strftime("session_%Y%m%d-%H%M%S_"), dir=base)
    os.makedirs(os.path.join(path, "logs"), exist_ok=True)
    with open(os.path.join(path, ".pid"), "w") as f:  # in use while this process lives
        f.write(str(os.getpid()))
    return path


def setup_logging(name: str, log_dir: str | None, level: int = logging.INFO, stderr: bool = True):
    handlers: list = []
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(log_dir, f"{name}.log")))
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
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    now = time.time()
    for e in entries[keep:]:
        try:
            if now - e.stat().st_mtime <= min_age_s:
                continue
            with open(os.path.join(e.path, ".pid")) as f:
                pid = int(f.read().strip() or 0)
            os.kill(pid, 0)  # its creator lives: the cluster may still be running
        except ProcessLookupError:
            shutil.rmtree(e.path, ignore_errors=True)
        except (OSError, ValueError):
            pass
