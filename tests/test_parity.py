"""Ray parity of job-level context inside tasks and actors (issue 9): namespaces and
inherited runtime_env. Each case is a fresh driver script, so that init() options
apply; ``ZRAY_TEST_BACKEND=ray`` runs the same scripts on Ray."""

import os
import textwrap

import pytest

BACKEND = os.environ.get("ZRAY_TEST_BACKEND", "zray")


def script(body: str, init: str = "") -> str:
    return f"import {BACKEND} as ray\nray.init({init})\n" + textwrap.dedent(body)


NAMESPACE_BODY = """
@ray.remote
class Named:
    def ping(self):
        return "pong"

@ray.remote
def find(name):
    return ray.get(ray.get_actor(name).ping.remote())

@ray.remote
def ns():
    return ray.get_runtime_context().namespace

@ray.remote
def make(name):
    a = Named.options(name=name, lifetime="detached").remote()
    ray.get(a.ping.remote())
    return True

@ray.remote
class Holder:
    def ns(self):
        return ray.get_runtime_context().namespace

a = Named.options(name="by_driver").remote()
assert ray.get(find.remote("by_driver"), timeout=60) == "pong"
driver_ns = ray.get_runtime_context().namespace
assert ray.get(ns.remote(), timeout=60) == driver_ns, (ray.get(ns.remote()), driver_ns)
assert ray.get(Holder.remote().ns.remote(), timeout=60) == driver_ns
assert ray.get(make.remote("by_task"), timeout=60)
assert ray.get(ray.get_actor("by_task").ping.remote(), timeout=60) == "pong"
ray.kill(ray.get_actor("by_task"))
print("OK", driver_ns)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("init", ["", "namespace='team'"], ids=["anonymous", "explicit"])
def test_namespace_is_the_jobs_inside_tasks_and_actors(run_driver, init):
    out = run_driver(script(NAMESPACE_BODY, init), timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
    if init:
        assert "OK team" in out.stdout


@pytest.mark.timeout(120)
def test_job_runtime_env_is_inherited_by_nested_tasks_and_actors(run_driver):
    body = """
    import os

    @ray.remote
    def leaf():
        return os.environ.get("ZZ"), os.environ.get("YY")

    @ray.remote
    def middle():
        return ray.get(leaf.remote())

    @ray.remote
    def middle_overrides():
        return ray.get(leaf.options(runtime_env={"env_vars": {"YY": "9"}}).remote())

    @ray.remote
    class Parent:
        def child(self):
            return ray.get(leaf.remote())

    assert ray.get(middle.remote(), timeout=60) == ("7", None), ray.get(middle.remote())
    assert ray.get(middle_overrides.remote(), timeout=60) == ("7", "9")
    assert ray.get(Parent.remote().child.remote(), timeout=60) == ("7", None)
    print("OK")
    """
    out = run_driver(script(body, 'runtime_env={"env_vars": {"ZZ": "7"}}'), timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


# ---------------------------------------------------------------------------
# Options that must work as in Ray, or be refused naming the option (issue 9)
# ---------------------------------------------------------------------------

def run_ok(run_driver, body: str, init: str = "num_cpus=2", timeout: float = 100):
    out = run_driver(script(body, init), timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "OK" in out.stdout, out.stdout[-2000:]
    return out


@pytest.mark.timeout(120)
def test_max_calls_replaces_the_process_without_losing_or_retrying_tasks(run_driver):
    body = """
    import os, time
    from collections import Counter

    @ray.remote(max_calls=2, max_retries=0)
    def pid(i, s=0.0):
        time.sleep(s)
        return os.getpid()

    # one after another: a process runs the function twice, then another takes over
    seq = [ray.get(pid.remote(i), timeout=60) for i in range(6)]
    assert max(Counter(seq).values()) <= 2 and len(set(seq)) >= 3, seq
    # many at once (tasks are sent ahead to busy processes): none lost, none retried
    # (max_retries=0: a retirement taken for a crash would fail a task)
    many = ray.get([pid.remote(i, 0.02) for i in range(24)], timeout=90)
    assert len(many) == 24 and max(Counter(many).values()) <= 2, Counter(many)
    # max_calls belongs to the function: .options() keeps it and may not set it
    bound = ray.get([pid.options(num_cpus=1).remote(i) for i in range(6)], timeout=60)
    assert max(Counter(bound).values()) <= 2, bound
    try:
        pid.options(max_calls=5)
        raise AssertionError("max_calls accepted in .options()")
    except ValueError as e:
        assert "max_calls" in str(e), e

    # as in Ray, a function that asks for a GPU gets a fresh process for each call
    @ray.remote(num_gpus=1)
    def gpu_pid():
        return os.getpid()

    gpu = [ray.get(gpu_pid.remote(), timeout=60) for _ in range(3)]
    assert len(set(gpu)) == 3, gpu

    try:
        ray.remote(max_calls=-1)(lambda: 1)
        raise AssertionError("max_calls=-1 accepted")
    except ValueError as e:
        assert "max_calls" in str(e), e
    print("OK")
    """
    run_ok(run_driver, body, "num_cpus=2, num_gpus=1")


@pytest.mark.timeout(120)
def test_options_refused_where_ray_refuses_them(run_driver):
    body = """
    def refused(make, name):
        try:
            make()
        except ValueError as e:
            assert name in str(e), (name, e)
            return
        raise AssertionError(f"{name} was accepted")

    @ray.remote
    def f():
        return 1

    class C:
        def m(self):
            return 1

    refused(lambda: ray.remote(max_calls=1)(C), "max_calls")  # not an actor option
    refused(lambda: ray.remote(C).options(concurrency_groups={"io": 1}), "concurrency_groups")
    refused(lambda: f.options(object_store_memory=1).remote(), "object_store_memory")
    refused(lambda: f.options(_metadata={"k": "v"}).remote(), "_metadata")
    refused(lambda: f.options(label_selector={"zone": "bad value!"}).remote(), "label")
    # on actors Ray takes object_store_memory with a DeprecationWarning and reserves nothing
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ray.remote(C).options(object_store_memory=10**15).remote()
    assert any(issubclass(w.category, DeprecationWarning) for w in caught), caught
    assert ray.get(a.m.remote(), timeout=60) == 1
    if ray.__name__ == "zray":
        refused(lambda: ray.remote(concurrency_groups=["io"])(C), "concurrency_groups")
        refused(lambda: ray.remote(max_pending_calls="x")(C), "max_pending_calls")
        refused(lambda: f.options(accelerator_type=3), "accelerator_type")
        refused(lambda: ray.method(retry_exceptions=[int])(C.m), "retry_exceptions")
    print("OK")
    """
    run_ok(run_driver, body)


@pytest.mark.timeout(120)
def test_concurrency_groups_on_a_threaded_actor(run_driver):
    body = """
    import threading, time

    @ray.remote(concurrency_groups={"io": 2, "compute": 1})
    class Worker:
        def __init__(self):
            self.lock = threading.Lock()
            self.active, self.peak = {}, {}
            self.pair = threading.Barrier(2)
            self.released = threading.Event()

        def _enter(self, group):
            with self.lock:
                self.active[group] = self.active.get(group, 0) + 1
                self.peak[group] = max(self.peak.get(group, 0), self.active[group])

        def _leave(self, group):
            with self.lock:
                self.active[group] -= 1

        @ray.method(concurrency_group="io")
        def io(self):
            self._enter("io")
            self.pair.wait(timeout=20)  # two io calls must run at once to pass
            time.sleep(0.05)
            self._leave("io")
            return "io"

        @ray.method(concurrency_group="compute")
        def release(self):
            self.released.set()
            return "released"

        def wait_for_release(self):  # the default group (one at a time)
            return self.released.wait(timeout=20)

        def peaks(self):
            return dict(self.peak)

    w = Worker.remote()
    assert ray.get([w.io.remote() for _ in range(4)], timeout=60) == ["io"] * 4
    # a default-group call blocked until a compute-group call runs: groups are apart
    blocked = w.wait_for_release.remote()
    assert ray.get(w.release.remote(), timeout=60) == "released"
    assert ray.get(blocked, timeout=60) is True
    # at call time a method can be sent to another group
    on_io = ray.get([w.io.remote(), w.io.remote(),
                     w.peaks.options(concurrency_group="io").remote()], timeout=60)
    assert on_io[:2] == ["io", "io"], on_io
    peaks = ray.get(w.peaks.remote(), timeout=60)
    assert peaks["io"] == 2, peaks
    if ray.__name__ == "zray":  # (Ray kills the actor for an unknown group)
        try:
            w.peaks.options(concurrency_group="nope")
            raise AssertionError("unknown group accepted")
        except ValueError as e:
            assert "nope" in str(e), e

        @ray.remote(concurrency_groups={"io": 1})
        class Bad:
            @ray.method(concurrency_group="other")
            def m(self):
                return 1

        try:
            Bad.remote()
            raise AssertionError("a method in an undefined group accepted")
        except ValueError as e:
            assert "other" in str(e), e
    print("OK")
    """
    run_ok(run_driver, body)


@pytest.mark.timeout(120)
def test_concurrency_groups_on_an_async_actor(run_driver):
    body = """
    import asyncio, threading, time

    @ray.remote(concurrency_groups={"io": 2})
    class Server:
        def __init__(self):
            self.active = self.peak = 0
            self.released = threading.Event()

        @ray.method(concurrency_group="io")
        async def io(self):
            self.active += 1
            self.peak = max(self.peak, self.active)
            deadline = time.monotonic() + 20
            while self.peak < 2 and time.monotonic() < deadline:  # two must overlap
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            self.active -= 1
            return self.peak

        async def block_loop(self):  # blocks the default group's event loop thread
            return self.released.wait(timeout=20)

        @ray.method(concurrency_group="io")
        async def release(self):
            self.released.set()
            return True

        async def get_peak(self):
            return self.peak

    s = Server.remote()
    assert max(ray.get([s.io.remote() for _ in range(5)], timeout=60)) == 2
    assert ray.get(s.get_peak.remote(), timeout=30) == 2  # never more than 2 in "io"
    # the io group has an event loop of its own: it runs while the default one is blocked
    blocked = s.block_loop.remote()
    assert ray.get(s.release.remote(), timeout=60) is True
    assert ray.get(blocked, timeout=60) is True
    print("OK")
    """
    run_ok(run_driver, body)


@pytest.mark.timeout(120)
def test_max_pending_calls_raises_pending_calls_limit_exceeded(run_driver):
    body = """
    import time

    @ray.remote
    class Slow:
        def slow(self, s=0.5):
            time.sleep(s)
            return 1

        @ray.method(num_returns=0)
        def fire(self):
            time.sleep(0.5)

    assert issubclass(ray.exceptions.PendingCallsLimitExceeded, ray.exceptions.RayError)
    a = Slow.options(max_pending_calls=2).remote()
    refs = [a.slow.remote(), a.slow.remote()]
    try:
        a.slow.remote()
        raise AssertionError("a third pending call was accepted")
    except ray.exceptions.PendingCallsLimitExceeded as e:
        assert "max_pending_calls" in str(e), e
    assert ray.get(refs, timeout=60) == [1, 1]
    assert ray.get(a.slow.remote(0), timeout=60) == 1  # room again once they finished
    # calls whose refs were dropped, and calls with no return, still count until done
    x, y = a.slow.remote(), a.slow.remote()
    del x, y
    try:
        a.slow.remote()
        raise AssertionError("dropped refs freed their calls' places")
    except ray.exceptions.PendingCallsLimitExceeded:
        pass
    b = Slow.options(max_pending_calls=1).remote()
    ray.get(b.slow.remote(0), timeout=60)
    b.fire.remote()
    try:
        b.fire.remote()
        raise AssertionError("a num_returns=0 call was not counted")
    except ray.exceptions.PendingCallsLimitExceeded:
        pass

    # the limit counts per calling process: a task holding the handle has its own count
    @ray.remote
    def caller(h):
        refs = [h.slow.remote(0.3), h.slow.remote(0.3)]
        try:
            h.slow.remote(0.3)
            return "no limit"
        except ray.exceptions.PendingCallsLimitExceeded:
            return ray.get(refs)

    c = Slow.options(max_pending_calls=2).remote()
    mine = [c.slow.remote(0.3), c.slow.remote(0.3)]
    assert ray.get(caller.remote(c), timeout=60) == [1, 1]
    assert ray.get(mine, timeout=60) == [1, 1]
    print("OK")
    """
    run_ok(run_driver, body)


@pytest.mark.timeout(120)
def test_method_max_task_retries_and_retry_exceptions(run_driver):
    body = """
    @ray.remote
    class Flaky:
        def __init__(self):
            self.n = 0

        @ray.method(retry_exceptions=True, max_task_retries=2)
        def until(self, k):
            self.n += 1
            if self.n < k:
                raise ValueError(f"attempt {self.n}")
            return self.n

        @ray.method(retry_exceptions=[KeyError])
        def value_error(self):
            self.n += 1
            raise ValueError("not in the list")

        def fails(self):
            self.n += 1
            raise ValueError("plain")

        def count(self):
            return self.n

    assert ray.get(Flaky.remote().until.remote(3), timeout=60) == 3  # 2 retries
    a = Flaky.remote()
    try:
        ray.get(a.until.remote(4), timeout=60)
        raise AssertionError("a 4th attempt ran")
    except ValueError as e:
        assert "attempt 3" in str(e), e
    b = Flaky.options(max_task_retries=5).remote()
    for call in (b.value_error, b.fails):  # not covered by retry_exceptions: once each
        try:
            ray.get(call.remote(), timeout=60)
        except ValueError:
            pass
    assert ray.get(b.count.remote(), timeout=60) == 2
    try:  # .options(retry_exceptions=) at call time, the actor's max_task_retries=5
        ray.get(b.fails.options(retry_exceptions=True).remote(), timeout=60)
    except ValueError:
        pass
    assert ray.get(b.count.remote(), timeout=60) == 2 + 6
    c = Flaky.remote()
    try:
        ray.get(c.fails.options(retry_exceptions=True, max_task_retries=1).remote(), timeout=60)
    except ValueError:
        pass
    assert ray.get(c.count.remote(), timeout=60) == 2
    print("OK")
    """
    run_ok(run_driver, body)


@pytest.mark.timeout(120)
def test_label_selector_and_accelerator_type(run_driver):
    body = """
    @ray.remote
    def f():
        return 1

    assert ray.nodes()[0]["Labels"]["zone"] == "a", ray.nodes()[0]["Labels"]
    assert "ray.io/node-id" in ray.nodes()[0]["Labels"]
    cases = [({"zone": "a"}, True), ({"zone": "b"}, False), ({"zone": "!b"}, True),
             ({"zone": "in(a, c)"}, True), ({"zone": "!in(a)"}, False),
             ({"other": "!x"}, True), ({"other": "x"}, False)]
    refs = [(sel, runs, f.options(label_selector=sel).remote()) for sel, runs in cases]
    for sel, runs, ref in refs:
        if runs:
            assert ray.get(ref, timeout=60) == 1, sel
    # a task no node can satisfy waits, as any infeasible task does
    for sel, runs, ref in refs:
        if not runs:
            assert ray.wait([ref], timeout=1.0)[0] == [], sel

    @ray.remote
    class A:
        def ping(self):
            return "pong"

    assert ray.get(A.options(label_selector={"zone": "a"}).remote().ping.remote(),
                   timeout=60) == "pong"
    stuck = A.options(label_selector={"zone": "b"}).remote()
    assert ray.wait([stuck.ping.remote()], timeout=1.0)[0] == []

    # accelerator_type asks for the resource accelerator_type:<name>, as in Ray
    assert ray.cluster_resources()["accelerator_type:X1"] == 1
    assert ray.get([f.options(accelerator_type="X1").remote() for _ in range(3)],
                   timeout=60) == [1, 1, 1]
    assert ray.wait([f.options(accelerator_type="Y2").remote()], timeout=1.0)[0] == []
    print("OK")
    """
    run_ok(run_driver, body, 'num_cpus=2, labels={"zone": "a"}, '
                             'resources={"accelerator_type:X1": 1}')


@pytest.mark.timeout(120)
def test_init_log_to_driver_and_logging_level(run_driver):
    body = """
    import logging, sys, time

    class Tee:  # records what reaches this driver's stdout/stderr
        def __init__(self, raw):
            self.raw, self.seen = raw, []
        def write(self, s):
            self.seen.append(s)
            return self.raw.write(s)
        def __getattr__(self, name):
            return getattr(self.raw, name)

    sys.stdout, sys.stderr = Tee(sys.stdout), Tee(sys.stderr)

    def printed():
        return "REMOTE-LINE-7731" in "".join(sys.stdout.seen + sys.stderr.seen)

    @ray.remote
    def talk():
        print("REMOTE-LINE-7731")
        return 1

    assert ray.get(talk.remote(), timeout=60) == 1
    assert logging.getLogger(ray.__name__).getEffectiveLevel() == LEVEL
    deadline = time.monotonic() + WAIT_S
    while not printed() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert printed() == EXPECT_PRINTED, EXPECT_PRINTED
    print("OK")
    """
    # log_to_driver=False: the remote line never shows (waited for as long as the
    # control case below may take to show it)
    run_ok(run_driver, "\n    LEVEL, WAIT_S, EXPECT_PRINTED = 10, 3, False" + body,
           "num_cpus=1, log_to_driver=False, logging_level='debug'")
    run_ok(run_driver, "\n    LEVEL, WAIT_S, EXPECT_PRINTED = 30, 30, True" + body,
           "num_cpus=1, logging_level=30")
    bad = run_driver(script("print('OK')", "num_cpus=1, logging_level='chatty'"), timeout=60)
    assert bad.returncode != 0 and "ValueError" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.timeout(120)
def test_init_temp_dir_local_mode_and_dashboard(run_driver, tmp_path):
    body = """
    import os, stat, tempfile
    base = os.path.join(tempfile.mkdtemp(prefix="zt", dir="/tmp"), "t")
    ctx = ray.init(num_cpus=1, _temp_dir=base, include_dashboard=False)
    session = ctx.address_info["session_dir"]
    assert session.startswith(base + os.sep), (session, base)
    if ray.__name__ == "zray":  # owner-only, as zray's own session dirs
        assert stat.S_IMODE(os.stat(session).st_mode) == 0o700, oct(os.stat(session).st_mode)
        assert stat.S_IMODE(os.stat(base).st_mode) == 0o700
    assert ray.get(ray.remote(lambda: 3).remote(), timeout=60) == 3
    ray.shutdown()

    def refused(exc, **kw):
        try:
            ray.init(num_cpus=1, **kw)
        except exc:
            return
        ray.shutdown()
        raise AssertionError(f"init({kw}) was accepted")

    refused(RuntimeError, local_mode=True)
    refused(ValueError, _temp_dir="relative/dir", include_dashboard=False)
    if ray.__name__ == "zray":  # a dashboard option without include_dashboard=True
        refused(ValueError, dashboard_port=8265)
        refused(ValueError, dashboard_host="0.0.0.0")
        refused(ValueError, _temp_dir="/" + "x" * 90)
    print("OK")
    """
    out = run_driver(f"import {BACKEND} as ray\n" + textwrap.dedent(body), timeout=100)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "OK" in out.stdout


@pytest.mark.timeout(30)
@pytest.mark.skipif(BACKEND == "ray", reason="zray refuses options Ray carries out")
def test_init_options_zray_does_not_carry_out_are_refused_by_name():
    import zray

    for name, value in [("logging_format", "%(message)s"), ("_system_config", {"x": 1}),
                        ("storage", "/tmp/s"), ("job_config", object()),
                        ("_enable_object_reconstruction", True)]:
        with pytest.raises(ValueError, match=name):
            zray.init(**{name: value})
        assert not zray.is_initialized()


@pytest.mark.timeout(120)
def test_a_ref_rebuilt_from_hex_after_its_last_ref_died_does_not_resolve(run_driver):
    """Ray: the object is freed (a get of the rebuilt ref times out); zray says at once
    that it was freed (ObjectLostError). Neither returns the old value."""
    body = """
    import gc
    r = ray.put(123)
    h = r.hex()
    del r
    gc.collect()
    rebuilt = ray.ObjectRef(bytes.fromhex(h))
    try:
        print("VALUE", ray.get(rebuilt, timeout=5))
    except (ray.exceptions.GetTimeoutError, ray.exceptions.ObjectLostError) as e:
        print("FREED", type(e).__name__)
    """
    out = run_driver(script(body, "num_cpus=1"), timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FREED" in out.stdout and "VALUE" not in out.stdout, out.stdout


@pytest.mark.timeout(120)
def test_a_ref_pickled_out_of_band_keeps_its_object(run_driver):
    """A ref pickled by the user (not through zray) can be loaded and read after every
    other ref is gone: the object is pinned, as Ray pins it."""
    body = f"""
    import gc
    from {BACKEND} import cloudpickle
    r = ray.put(list(range(10)))
    blob = cloudpickle.dumps(r)
    del r
    gc.collect()
    import time
    time.sleep(0.5)  # workload: let a (wrong) release reach the cluster
    print("VALUE", ray.get(cloudpickle.loads(blob), timeout=10))
    """
    out = run_driver(script(body, "num_cpus=1"), timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "VALUE [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in out.stdout, out.stdout + out.stderr[-2000:]
