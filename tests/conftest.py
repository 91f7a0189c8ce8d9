"""Shared fixtures for zray's tests.

Everything here uses real processes and real sockets: ``ray_local`` starts an
embedded cluster (broker, node agent, executors) with ``zray.init``; tests
that need a fresh cluster of their own run a driver script in a subprocess
with ``run_driver``.
"""

import os
import subprocess
import sys
import time

import psutil
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)

# Remote functions and exception classes defined at module level in a test
# module are pickled by reference (``test_tasks.MyError``), exactly as Ray
# pickles them; the executors must be able to import the test module, so the
# tests directory goes on the PYTHONPATH that every zray process inherits (a
# Ray user does the same with PYTHONPATH or runtime_env). Pytest itself puts
# this directory on sys.path of the test process only.
_pp = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if TESTS_DIR not in _pp:
    os.environ["PYTHONPATH"] = os.pathsep.join([TESTS_DIR] + _pp)


@pytest.fixture(scope="module")
def ray_local():
    """One embedded cluster per test module: 4 CPUs, 2 (logical) GPUs, custom=2."""
    import zray

    if zray.is_initialized():  # a previous module leaked a connection
        zray.shutdown()
    zray.init(num_cpus=4, num_gpus=2, resources={"custom": 2})
    try:
        yield zray
    finally:
        zray.shutdown()


def driver_env(**extra):
    """The environment for a subprocess driver: no inherited cluster address."""
    env = dict(os.environ)
    for key in ("ZRAY_ADDRESS", "RAY_ADDRESS"):
        env.pop(key, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@pytest.fixture
def run_driver(tmp_path):
    """Run a driver script in a fresh interpreter; returns CompletedProcess.

    ``run_driver(source, timeout=60)`` writes ``source`` to a file in
    tmp_path and runs it with this interpreter; stdout/stderr are captured as
    text. The whole process group is killed if it overruns ``timeout``.
    """
    counter = [0]

    def run(source: str, timeout: float = 60, **env):
        counter[0] += 1
        path = tmp_path / f"driver_{counter[0]}.py"
        path.write_text(source)
        proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
                                env=driver_env(**env), start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            out, err = proc.communicate()
            pytest.fail(f"driver script overran {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    return run


def is_alive(proc: psutil.Process) -> bool:
    """True if ``proc`` (the very process, not a reused pid) still runs; zombies are dead."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs, timeout: float = 10.0) -> list:
    """Poll until every psutil.Process in ``procs`` has exited; return the survivors."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if is_alive(p)]
    return alive


def describe(procs) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"pid={p.pid} {' '.join(p.cmdline())}")
        except psutil.Error:
            out.append(f"pid={p.pid} (gone)")
    return "; ".join(out)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (clean-up after a failed test)."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def poll_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Call ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# ``@pytest.mark.serial`` and the lock behind it (the suite runs in parallel with xdist).
from serial_lock import pytest_configure, pytest_runtest_protocol, pytest_unconfigure  # noqa: E402,F401,I001
