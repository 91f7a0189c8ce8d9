"""``@pytest.mark.serial``: a test that runs while no other test of this run runs.

The suite runs in parallel (pytest-xdist, one process per worker). A few tests check
what a program does within a fixed time on the user's side (the seed's examples: an
actor method cancelled one second after it was sent, so it must have started by
then), which other tests' processes competing for the CPUs can push past. Those are
marked ``serial``: every test holds a shared lock while it runs, a serial one the
exclusive lock, so it waits for the tests running now to finish and the others wait
for it. It is a real file lock (``fcntl.flock``), shared by the workers of one run only:
the controller (or the only process, without xdist) makes a private directory for it
and the workers find it in ``$ZRAY_TESTS_LOCK_DIR``.

A second lock, the turnstile, keeps a waiting serial test from being starved by
shared holders that keep overlapping: each test passes through the turnstile before
taking the shared lock, and a serial test holds the turnstile while it waits and runs.

The lock is taken outside pytest-timeout's timer (this hook wraps it), so waiting for
the lock does not count against a test's timeout.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile

import pytest

LOCK_DIR_ENV = "ZRAY_TESTS_LOCK_DIR"
_made_here = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "serial: run while no other test of this run runs (see tests/serial_lock.py)")
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made the dir
        return
    path = tempfile.mkdtemp(prefix="zray-tests-lock-")  # 0700
    _made_here.append(path)
    os.environ[LOCK_DIR_ENV] = path  # xdist workers start after this and inherit it


def pytest_unconfigure(config):
    while _made_here:
        shutil.rmtree(_made_here.pop(), ignore_errors=True)


@contextlib.contextmanager
def _flock(name: str, mode: int):
    fd = os.open(os.path.join(os.environ[LOCK_DIR_ENV], name),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if not os.environ.get(LOCK_DIR_ENV):
        yield
        return
    if item.get_closest_marker("serial"):
        with _flock("turnstile", fcntl.LOCK_EX), _flock("tests", fcntl.LOCK_EX):
            yield
    else:
        with _flock("turnstile", fcntl.LOCK_EX):
            pass
        with _flock("tests", fcntl.LOCK_SH):
            yield
