"""Runtime environments, node side: set an executor process up for its environment.

::

    first EXEC of a runtime_env (options["renv"], zray/_renv.py)
      --> ExecutorProcess.load_call --> RuntimeEnvSetup.apply (once per process)
            pip / uv:    venvs/<sha of the list>/  (lock; created once per node)
            packages:    pkgs/pkg_<sha>/  (lock; fetched by object id, unzipped once)
            then:        sys.path, cwd = working_dir, PYTHONPATH / PATH / VIRTUAL_ENV,
                         worker_process_setup_hook
      any failure or overrun of setup_timeout_seconds --> RuntimeEnvSetupError for
      the call (and the process retires, so a later task tries again)

The broker binds a fresh executor to the environment of its first task and
never gives it another environment's (brokerd/placement.py ``take_idle``),
so a process is set up at most once and environments never share one. An
executor of an environment is reaped when idle (brokerd/nodes.py).

The cache lives in the node's private session directory
(``runtime_resources/``, 0700) and is shared by the node's executors: each
entry is made under an exclusive ``flock`` of ``<entry>.lock`` by the first
process that needs it (concurrent first uses wait for it: one install, one
download) and marked ready by a ``<entry>.ready`` file beside it; every process
using an entry holds a shared lock on it for life. When the cache passes its
bounds (``ZRAY_RUNTIME_ENV_CACHE_MB`` of packages, ``ZRAY_RUNTIME_ENV_MAX_VENVS``
environments) the least recently used entries that no process holds are deleted.

pip environments: ``python -m venv --without-pip`` plus a ``.pth`` file that puts
the executor's own site-packages after the venv's, so the environment layers
over what the worker has (pip skips requirements the worker already
satisfies) and pip itself comes from the worker. The executor adds the venv's
site-packages to the front of ``sys.path`` (it keeps its own interpreter) and
puts the venv's ``bin`` first on PATH, so subprocesses run the venv's python.
``uv`` needs the ``uv`` command on the node's PATH.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import time
import zipfile
from typing import Optional

import cloudpickle

from zray._procutil import private_dir, user_tmp_dir
from zray._renv import package_matches, unpack_problem
from zray.exceptions import RuntimeEnvSetupError

log = logging.getLogger("zray.runtime_env")

READY = ".ready"  # <entry>.ready, beside the entry (never inside the user's folder)
CACHE_MB = float(os.environ.get("ZRAY_RUNTIME_ENV_CACHE_MB", str(10 * 1024)))
MAX_VENVS = int(os.environ.get("ZRAY_RUNTIME_ENV_MAX_VENVS", "10"))
_DEFAULT_TIMEOUT_S = 600


def cache_root() -> str:
    """The node's runtime_env cache: in its session directory (private, checked)."""
    session = os.environ.get("ZRAY_SESSION_DIR") or os.path.join(user_tmp_dir(), "nodeless")
    return private_dir(session, "runtime_resources")


class _Deadline:
    def __init__(self, seconds):
        self.seconds = seconds
        self.at = None if seconds in (None, -1) else time.monotonic() + seconds

    def left(self) -> Optional[float]:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise RuntimeEnvSetupError(
                f"runtime_env setup did not finish within setup_timeout_seconds="
                f"{self.seconds} (runtime_env config)")
        return left


class _Entry:
    """One cache entry (a folder) and its lock file; ``hold`` keeps a shared lock."""

    def __init__(self, parent: str, name: str):
        self.path = os.path.join(parent, name)
        self.lock_path = self.path + ".lock"
        self.fd = -1

    def ready(self) -> bool:
        return os.path.exists(self.path + READY)

    def _lock(self, how: int, deadline: _Deadline) -> None:
        delay = 0.01
        while True:
            try:
                fcntl.flock(self.fd, how | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            left = deadline.left()
            time.sleep(min(delay, left) if left is not None else delay)  # waits for a lock
            delay = min(delay * 2, 0.2)

    def acquire(self, make, deadline: _Deadline) -> None:
        """Hold a shared lock on the entry, first making it (``make(tmp_path)``) under
        an exclusive one if it is not ready."""
        self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                self._lock(fcntl.LOCK_SH, deadline)
                if self.ready():
                    os.utime(self.path + READY)  # recently used (LRU)
                    return
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                self._lock(fcntl.LOCK_EX, deadline)
                if not self.ready():
                    shutil.rmtree(self.path, ignore_errors=True)
                    size = make(self.path)
                    with open(self.path + READY, "w") as f:
                        f.write(str(size))
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise


def _evict(parent: str, max_bytes: Optional[float], max_count: Optional[int]) -> None:
    """Delete the least recently used ready entries no process holds until within bounds."""
    entries = []
    for marker_name in os.listdir(parent):
        if not marker_name.endswith(READY):
            continue
        name = marker_name[:-len(READY)]
        marker = os.path.join(parent, marker_name)
        try:
            st = os.stat(marker)
            with open(marker) as f:
                size = int(f.read() or 0)
        except (OSError, ValueError):
            continue
        entries.append((st.st_mtime, name, size))
    entries.sort()
    total = sum(e[2] for e in entries)
    count = len(entries)
    for _, name, size in entries:
        if (max_bytes is None or total <= max_bytes) and (max_count is None or count <= max_count):
            break
        path = os.path.join(parent, name)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # in use
        try:
            os.unlink(path + READY)
            shutil.rmtree(path, ignore_errors=True)
            log.info("runtime_env cache: removed %s (%d bytes)", name, size)
        finally:
            os.close(fd)
        total -= size
        count -= 1


def _dir_size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


class RuntimeEnvSetup:
    """Sets this process up for one runtime_env (``apply``), once."""

    def __init__(self, client):
        self.client = client
        self.key: Optional[str] = None
        self.error: Optional[RuntimeEnvSetupError] = None
        self.held: list = []  # _Entry: shared locks kept for the life of the process
        self.env_updates: dict = {}  # os.environ changes the environment makes

    def apply(self, wire: dict) -> dict:
        """Set the process up for ``wire`` (options["renv"]); returns the os.environ
        changes to keep for every call. Raises RuntimeEnvSetupError."""
        key = wire.get("key") if isinstance(wire, dict) else None
        if self.key is not None:
            if key != self.key:  # the broker binds a process to one environment
                raise RuntimeEnvSetupError(
                    f"this executor was set up for runtime_env {self.key[:12]}, not {key!r:.20}")
            if self.error is not None:
                raise self.error
            return self.env_updates
        self.key = key
        t0 = time.monotonic()
        try:
            self._apply(wire)
        except RuntimeEnvSetupError as e:
            self.error = e
            raise
        except Exception as e:
            self.error = RuntimeEnvSetupError(f"runtime_env setup failed: {type(e).__name__}: {e}")
            raise self.error from None
        log.info("runtime_env %s set up in %.2fs", str(key)[:12], time.monotonic() - t0)
        return self.env_updates

    def _apply(self, wire: dict) -> None:
        timeout = wire.get("timeout", _DEFAULT_TIMEOUT_S)
        if type(timeout) not in (int, float):
            raise RuntimeEnvSetupError(f"bad setup_timeout_seconds {timeout!r:.40}")
        deadline = _Deadline(timeout)
        root = cache_root()
        paths = []
        pip = wire.get("pip")
        if pip is not None:
            venvs = private_dir(root, "venvs")
            site_dir = self._venv(venvs, pip, deadline)
            _evict(venvs, None, MAX_VENVS)
            paths.append(site_dir)
        pkgs = private_dir(root, "pkgs")
        mods = wire.get("py_modules") or []
        if not isinstance(mods, list):
            raise RuntimeEnvSetupError("bad py_modules in runtime_env")
        for m in mods:
            paths.append(self._package(pkgs, m, deadline))
        wd = None
        if wire.get("working_dir") is not None:
            wd = self._package(pkgs, wire["working_dir"], deadline)
        _evict(pkgs, CACHE_MB * 2**20, None)
        # sys.path: working_dir first, then py_modules, then the pip env, then the worker's.
        front = ([wd] if wd else []) + paths[1 if pip is not None else 0:]
        if pip is not None:
            before = set(sys.path)
            site.addsitedir(paths[0])  # also runs the .pth files of what was installed
            added = [p for p in sys.path if p not in before]
            sys.path[:] = [p for p in sys.path if p in before]
            front += added
        sys.path[:0] = front
        py_path = list(front)
        if os.environ.get("PYTHONPATH"):
            py_path.append(os.environ["PYTHONPATH"])
        self.env_updates["PYTHONPATH"] = os.pathsep.join(py_path)
        if wd:
            os.chdir(wd)
        hook = wire.get("hook")
        if hook is not None:
            self._run_hook(hook, deadline)

    # ------------------------------------------------------------- packages
    def _package(self, parent: str, item, deadline: _Deadline) -> str:
        """The folder a package ([sha, object id hex, single_root]) is unpacked in."""
        if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                or len(item[0]) != 64 or not isinstance(item[1], str)):
            raise RuntimeEnvSetupError(f"bad package reference in runtime_env: {item!r:.80}")
        sha, oid_hex, single = item
        int(sha, 16)
        entry = _Entry(parent, f"pkg_{sha}")

        def make(path: str) -> int:
            data = self._fetch(bytes.fromhex(oid_hex), sha, deadline)
            problem = unpack_problem(data)  # before anything is decompressed
            if problem is not None:
                raise RuntimeEnvSetupError(f"package pkg_{sha[:16]} (object {oid_hex}) "
                                           f"{problem}")
            # The cache is the node's, by content: what goes in must be what it is named.
            if not package_matches(sha, data):
                raise RuntimeEnvSetupError(f"package pkg_{sha[:16]} (object {oid_hex}) does "
                                           "not match its sha256")
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.mkdir(tmp, 0o700)
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    name = info.filename
                    if name.startswith("/") or ".." in name.split("/"):
                        raise RuntimeEnvSetupError(f"package pkg_{sha[:16]} has an unsafe "
                                                   f"path {name!r}")
                    zf.extract(info, tmp)
                    mode = (info.external_attr >> 16) & 0o777
                    if mode and not info.is_dir():
                        os.chmod(os.path.join(tmp, name), mode & 0o700 | 0o600)
            os.rename(tmp, path)
            return len(data)

        entry.acquire(make, deadline)
        self.held.append(entry)
        path = entry.path
        if single:
            subs = os.listdir(path)
            if len(subs) == 1 and os.path.isdir(os.path.join(path, subs[0])):
                path = os.path.join(path, subs[0])
        return path

    def _fetch(self, oid: bytes, sha: str, deadline: _Deadline) -> bytes:
        from zray._refs import ObjectRef

        try:
            data = self.client.get_values([ObjectRef(oid, b"", self.client)], deadline.left())[0]
        except RuntimeEnvSetupError:
            raise
        except Exception as e:
            raise RuntimeEnvSetupError(
                f"could not fetch package pkg_{sha[:16]} (object {oid.hex()}) from the "
                f"cluster: {type(e).__name__}: {e}") from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RuntimeEnvSetupError(f"package pkg_{sha[:16]} is not a zip file")
        return bytes(data)

    # ------------------------------------------------------------------ pip
    def _venv(self, parent: str, pip: dict, deadline: _Deadline) -> str:
        if (not isinstance(pip, dict) or not isinstance(pip.get("packages"), list)
                or pip.get("installer") not in ("pip", "uv")):
            raise RuntimeEnvSetupError(f"bad pip spec in runtime_env: {pip!r:.80}")
        packages = [str(p) for p in pip["packages"]]
        installer = pip["installer"]
        check = bool(pip.get("pip_check"))
        name = hashlib.sha256(json.dumps([installer, sorted(packages), check]).encode()
                              ).hexdigest()[:32]
        entry = _Entry(parent, f"venv_{name}")

        def make(path: str) -> int:
            self._install(path, installer, packages, check, deadline)
            return _dir_size(path)

        entry.acquire(make, deadline)
        self.held.append(entry)
        bindir = os.path.join(entry.path, "bin")
        self.env_updates["VIRTUAL_ENV"] = entry.path
        self.env_updates["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        return _site_packages(entry.path)

    def _install(self, path: str, installer: str, packages: list, check: bool,
                 deadline: _Deadline) -> None:
        uv = None
        if installer == "uv":
            uv = shutil.which("uv")
            if uv is None:
                raise RuntimeEnvSetupError(
                    "runtime_env 'uv' needs the uv command on the node's PATH, and this node "
                    "has none (install uv there, or use 'pip')")
        t0 = time.monotonic()
        self._run([sys.executable, "-m", "venv", "--without-pip", path], "creating the venv",
                  deadline)
        # The worker's own packages (pip among them) come after the venv's.
        base = [p for p in site.getsitepackages() + [site.getusersitepackages()]
                if os.path.isdir(p)]
        # (addsitedir, not a plain path line: the worker's own .pth files count too, e.g.
        # editable installs, for the venv's python in a subprocess)
        with open(os.path.join(_site_packages(path), "_zray_worker_site.pth"), "w") as f:
            f.write("".join(f"import site; site.addsitedir({p!r})\n" for p in base))
        python = os.path.join(path, "bin", "python")
        if uv is not None:
            cmd = [uv, "pip", "install", "--python", python, *packages]
        else:
            cmd = [python, "-m", "pip", "install", "--disable-pip-version-check",
                   "--no-input", *packages]
        self._run(cmd, f"{installer} install {' '.join(packages)}", deadline)
        if check:
            self._run([python, "-m", "pip", "check", "--disable-pip-version-check"],
                      "pip check", deadline)
        took = time.monotonic() - t0
        log.info("runtime_env: %s installed %s in %.1fs", installer, packages, took)
        # The node's record of what it installed, when and how long it took.
        fd = os.open(os.path.join(os.path.dirname(os.path.dirname(path)), "install.log"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "venv": path,
                                "installer": installer, "packages": packages,
                                "seconds": round(took, 3)}) + "\n")

    @staticmethod
    def _run(cmd: list, what: str, deadline: _Deadline) -> None:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the venv sees the worker's packages through its .pth
        env.pop("VIRTUAL_ENV", None)
        if sys.platform.startswith("linux"):
            # The installer dies with this executor (PDEATHSIG survives the exec).
            cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=deadline.left(), env=env)
        except subprocess.TimeoutExpired:
            deadline.left()  # raises the timeout error
            raise RuntimeEnvSetupError(f"{what}: timed out") from None
        except OSError as e:
            raise RuntimeEnvSetupError(f"{what} failed to start: {e}") from None
        if p.returncode != 0:
            out = p.stdout.decode(errors="replace").strip()
            raise RuntimeEnvSetupError(
                f"{what} failed (exit code {p.returncode}):\n{out[-3000:]}")

    # ----------------------------------------------------------------- hook
    @staticmethod
    def _run_hook(hook, deadline: _Deadline) -> None:
        """Run the hook on the main thread; past the deadline, SIGALRM interrupts it."""
        left = deadline.left()

        def overran(signum, frame):
            raise _HookTimeout()

        old = signal.signal(signal.SIGALRM, overran) if left is not None else None
        if left is not None:
            signal.setitimer(signal.ITIMER_REAL, left)
        try:
            if isinstance(hook, str):
                import importlib

                mod, _, fn = hook.rpartition(".")
                if not mod:
                    raise ValueError(f"{hook!r} is not a 'module.function' name")
                func = getattr(importlib.import_module(mod), fn)
            elif isinstance(hook, bytes):
                func = cloudpickle.loads(hook)
            else:
                raise ValueError(f"bad hook {hook!r:.40}")
            func()
        except _HookTimeout:
            raise RuntimeEnvSetupError(
                f"worker_process_setup_hook did not finish within setup_timeout_seconds="
                f"{deadline.seconds} (runtime_env config)") from None
        except Exception as e:
            raise RuntimeEnvSetupError(
                f"worker_process_setup_hook failed: {type(e).__name__}: {e}") from None
        finally:
            if left is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)


class _HookTimeout(BaseException):
    """Raised in the setup hook when it overruns setup_timeout_seconds."""


# argv: the parent's pid, then the command to exec once the kernel will SIGKILL it
# when its parent goes (and it exits at once if the parent is already gone).
_DIE_WITH_PARENT = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9, 0, 0, 0); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execv(sys.argv[2], sys.argv[2:])")


def _site_packages(venv: str) -> str:
    return sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv})
