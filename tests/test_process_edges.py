"""Processes at the edges: tasks that fork, init() from a short-lived thread,
refs used after shutdown(), and exceptions Python builds in unusual ways."""

import builtins
import textwrap

import psutil
import pytest
from conftest import describe, wait_gone

import zray
from zray.exceptions import RayTaskError

FORK_DRIVER = textwrap.dedent("""
    import os, sys, time, psutil, zray

    zray.init(num_cpus=1)

    @zray.remote
    def forker(mode):
        pid = os.fork()
        if pid == 0:  # the child: a copy of the executor
            if mode == "exit":
                sys.exit(7)
            if mode == "raise":
                raise ValueError("in the child")
            if mode == "return":
                return "the child must not report this"
            if mode == "print-exit":
                print("child says hi")
                sys.exit(0)
            if mode == "sleep":
                time.sleep(1000)
        if mode == "sleep":
            return pid
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    @zray.remote
    def ping():
        return os.getpid()

    t0 = time.monotonic()
    codes = {m: zray.get(forker.remote(m), timeout=20)
             for m in ("exit", "raise", "return", "print-exit")}
    print("CODES", codes, "in %.1fs" % (time.monotonic() - t0), flush=True)
    sleeper = zray.get(forker.remote("sleep"), timeout=20)
    print("SLEEPER", sleeper, flush=True)
    print("EXECUTOR OK", zray.get(ping.remote(), timeout=20), flush=True)

    # A child of the driver that exits through sys.exit (so atexit runs there)
    # must not shut down the parent's session or cluster.
    ref = zray.put(41)
    pid = os.fork()
    if pid == 0:
        try:
            zray.get(ref)
        except zray.exceptions.RaySystemError as e:
            print("CHILD GET REFUSED", "forked" in str(e), flush=True)
        sys.exit(3)
    _, status = os.waitpid(pid, 0)
    print("DRIVER CHILD", os.waitstatus_to_exitcode(status), flush=True)
    print("PARENT OK", zray.get(ping.remote(), timeout=20) > 0, zray.get(ref), flush=True)

    zray.shutdown()
    gone = not psutil.pid_exists(sleeper) or psutil.Process(sleeper).status() == "zombie"
    deadline = time.monotonic() + 10
    while not gone and time.monotonic() < deadline:
        time.sleep(0.05)
        gone = not psutil.pid_exists(sleeper) or psutil.Process(sleeper).status() == "zombie"
    print("SLEEPER GONE", gone, flush=True)
""")


@pytest.mark.timeout(90)
def test_fork_in_task_does_not_hang_or_leak(run_driver):
    res = run_driver(FORK_DRIVER, timeout=75)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    # The child's sys.exit code reaches the parent's waitpid; an exception ends it
    # with 1; a child that returns ends with 0 and never reports a result.
    assert "CODES {'exit': 7, 'raise': 1, 'return': 0, 'print-exit': 0}" in out, out + res.stderr
    assert "EXECUTOR OK" in out and "CHILD GET REFUSED True" in out, out
    assert "DRIVER CHILD 3" in out and "PARENT OK True 41" in out, out + res.stderr
    assert "SLEEPER GONE True" in out, out + res.stderr
    pid = int(out.split("SLEEPER ", 1)[1].split()[0])
    try:
        left = wait_gone([psutil.Process(pid)], timeout=5)
    except psutil.NoSuchProcess:
        left = []
    assert not left, describe(left)


THREAD_INIT_DRIVER = textwrap.dedent("""
    import threading, time, psutil, zray

    t = threading.Thread(target=lambda: zray.init(num_cpus=1))
    t.start()
    t.join()  # the thread that started the cluster is gone
    time.sleep(1.0)

    @zray.remote
    def f(x):
        return x * 2

    print("RESULT", zray.get(f.remote(21), timeout=20), flush=True)
    kids = psutil.Process().children()
    print("CLUSTER", len(kids), all(k.is_running() for k in kids), flush=True)
    zray.shutdown()
    print("LEFT", len(psutil.Process().children(recursive=True)), flush=True)
""")


@pytest.mark.timeout(60)
def test_init_from_a_thread_that_ends(run_driver):
    res = run_driver(THREAD_INIT_DRIVER, timeout=50)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "RESULT 42" in res.stdout, res.stdout + res.stderr
    assert "CLUSTER 2 True" in res.stdout and "LEFT 0" in res.stdout, res.stdout


AFTER_SHUTDOWN_DRIVER = textwrap.dedent("""
    import time, psutil, zray
    from zray.exceptions import RaySystemError

    zray.init(num_cpus=1)

    @zray.remote
    def f(x=0):
        return x + 1

    small, task = zray.put(1), f.remote()
    big = zray.put(b"x" * 500_000)
    assert zray.get(task, timeout=20) == 1
    zray.shutdown()

    calls = {
        "get": lambda: zray.get(small),
        "get-list": lambda: zray.get([task, big], timeout=60),
        "get-big": lambda: zray.get(big),
        "wait": lambda: zray.wait([small], timeout=60),
        "cancel": lambda: zray.cancel(task),
        "future": lambda: small.future(),
    }
    for name, call in calls.items():
        t0 = time.monotonic()
        try:
            call()
            print(name, "RETURNED")
        except RaySystemError as e:
            print(name, "RAISED %.2f" % (time.monotonic() - t0), "shut down" in str(e))
    print("INITIALIZED", zray.is_initialized(),
          len(psutil.Process().children(recursive=True)))

    # A new session does not resolve an old ref either (nor hang on it).
    zray.init(num_cpus=1)
    for name, call in (("new-get", lambda: zray.get(small, timeout=60)),
                       ("new-arg", lambda: f.remote(small))):
        try:
            call()
            print(name, "RETURNED")
        except RaySystemError as e:
            print(name, "RAISED", "shut down" in str(e))
    print("NEW SESSION", zray.get(f.remote(41), timeout=20))
    zray.shutdown()
""")


@pytest.mark.timeout(60)
def test_get_after_shutdown_raises_at_once(run_driver):
    res = run_driver(AFTER_SHUTDOWN_DRIVER, timeout=50)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    for name in ("get", "get-list", "get-big", "wait", "cancel", "future"):
        line = next((ln for ln in out.splitlines() if ln.startswith(name + " ")), "")
        assert "RAISED" in line and line.endswith("True"), out
        assert float(line.split()[2]) < 1.0, line  # at once, not after a timeout
    assert "INITIALIZED False 0" in out, out  # no new cluster was started behind our back
    assert "new-get RAISED True" in out and "new-arg RAISED True" in out, out
    assert "NEW SESSION 42" in out, out


# ------------------------------------------------------ exceptions with odd __new__


def _raise(name):
    """Raise a built-in exception whose constructor or __new__ is unusual."""
    if name == "MemoryError":
        raise MemoryError("out of memory")
    if name == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if name == "FileNotFoundError":
        open("/nonexistent/zray-test-file")
    if name == "ConnectionResetError":
        raise ConnectionResetError(104, "Connection reset by peer")
    if name == "BlockingIOError":
        raise BlockingIOError(11, "try again", 5)
    if name == "UnicodeDecodeError":
        b"\xff".decode("utf-8")
    if name == "UnicodeEncodeError":
        "\xff".encode("ascii")
    if name == "RecursionError":
        raise RecursionError("too deep")
    if name == "StopIteration":
        raise StopIteration(5)
    if name == "ExceptionGroup":
        raise builtins.ExceptionGroup("several", [ValueError(1), TypeError(2)])  # 3.11+
    if name == "SyntaxError":
        compile("x y", "f.py", "exec")
    if name == "GeneratorExit":
        raise GeneratorExit
    raise AssertionError(name)


@zray.remote(max_retries=0)
def raise_builtin(name):
    _raise(name)


ODD = ["MemoryError", "KeyboardInterrupt", "FileNotFoundError", "ConnectionResetError",
       "BlockingIOError", "UnicodeDecodeError", "UnicodeEncodeError", "RecursionError",
       "StopIteration", "SyntaxError", "GeneratorExit"]
ODD += ["ExceptionGroup"] if hasattr(builtins, "ExceptionGroup") else []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ODD)
def test_builtin_exceptions_reach_the_caller(ray_local, name):
    cls = getattr(builtins, name)
    with pytest.raises(RayTaskError) as info:
        ray_local.get(raise_builtin.remote(name), timeout=30)
    err = info.value
    assert isinstance(err, cls), type(err).__mro__
    assert type(err.cause) is cls
    assert f"{name}: " in str(err) and "raise_builtin" in str(err), str(err)
    if issubclass(cls, OSError):
        assert err.errno == err.cause.errno is not None
    if name == "UnicodeDecodeError":
        assert err.encoding == "utf-8" and err.reason == err.cause.reason
    if name == "ExceptionGroup":
        assert [type(e) for e in err.exceptions] == [ValueError, TypeError]


@pytest.mark.timeout(60)
def test_memory_error_is_catchable_as_memory_error(ray_local):
    """The issue's repro: a task's MemoryError used to surface as a TypeError."""
    try:
        ray_local.get(raise_builtin.remote("MemoryError"), timeout=30)
    except MemoryError as e:
        assert isinstance(e, RayTaskError) and "out of memory" in e.traceback_str
    else:
        pytest.fail("no error")
