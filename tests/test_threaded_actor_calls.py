"""Threaded actors (max_concurrency > 1) under bursts of calls, end to end on real clusters.

A threaded actor's calls all travel on its lane (zray/_lane.py, zray/_direct.py) and
run on its call pool (workerd/callpool.py). These tests check what a user sees:
a burst's results are right whatever order the calls finish in, max_concurrency
still bounds how many run at once (and a blocked call never stops others from
starting), a call cancelled while it waits for a thread never runs, errors keep
their tracebacks, an actor whose handle and results are dropped ends after its
calls, and kill -9 of the actor's process settles every call in
flight: with ActorDiedError, or retried on the restarted actor, and promptly
even when the broker has not noticed the death (the caller's lane ended:
zray/_direct_watch.py).

The first tests also run on Ray (``ZRAY_TEST_BACKEND=ray``). Waiting is
poll-with-deadline or get with a timeout; sleeps inside actor methods are workload.
"""

import os
import signal
import threading
import time

import pytest
from backend import BACKEND, pickle_by_value, ray
from conftest import describe, kill_tree, poll_until, wait_gone

pickle_by_value(__name__)
pytestmark = pytest.mark.timeout(180)

RayActorError = ray.exceptions.RayActorError
ActorDiedError = ray.exceptions.ActorDiedError
RayTaskError = ray.exceptions.RayTaskError
TaskCancelledError = ray.exceptions.TaskCancelledError


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4)
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote(max_concurrency=8)
class Pool:
    def __init__(self):
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.squares = 0

    def pid(self):
        return os.getpid()

    def square(self, i):
        with self.lock:
            self.squares += 1
        return i * i

    def jitter(self, i):
        time.sleep((i * 7919 % 11) * 0.001)  # calls finish out of their order
        return i

    def crowd(self, n, timeout):
        """Count itself in; wait until ``n`` calls were running at once (or ``timeout``)."""
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        deadline = time.monotonic() + timeout
        while self.peak < n and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.02)  # overlap with the calls after us, were more allowed to run
        with self.lock:
            self.active -= 1
        return self.peak

    def stats(self):
        return {"peak": self.peak, "squares": self.squares}

    def started(self, path):
        """Append a line to ``path`` (the test counts the calls that started)."""
        with self.lock:
            with open(path, "a") as f:
                f.write("x\n")

    def hold(self, started, release, timeout=60):
        """Start, then wait until the file ``release`` exists (or ``timeout``)."""
        self.started(started)
        deadline = time.monotonic() + timeout
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "released"

    def boom(self, i):
        raise ValueError(f"bad input {i}")


def _lines(path) -> int:
    try:
        with open(path) as f:
            return len(f.readlines())
    except FileNotFoundError:
        return 0


def test_a_burst_of_calls_returns_every_result_in_any_finishing_order(cluster):
    a = Pool.remote()
    ray.get(a.pid.remote(), timeout=60)
    refs = [a.jitter.remote(i) for i in range(400)]
    assert ray.get(refs, timeout=120) == list(range(400))
    refs = [a.square.remote(i) for i in range(2000)]
    assert ray.get(refs, timeout=120) == [i * i for i in range(2000)]
    # the same burst, collected by wait() (the caller's I/O thread reads the replies)
    refs = [a.square.remote(i) for i in range(500)]
    ready, rest = ray.wait(refs, num_returns=len(refs), timeout=120)
    assert rest == []
    assert sorted(ray.get(ready, timeout=60)) == sorted(i * i for i in range(500))


def test_bursts_from_several_threads_at_once(cluster):
    a = Pool.remote()
    ray.get(a.pid.remote(), timeout=60)
    got, errors = {}, []

    def burst(k):
        try:
            got[k] = ray.get([a.square.remote(k * 1000 + i) for i in range(300)], timeout=120)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert errors == []
    for k in range(4):
        assert got[k] == [(k * 1000 + i) ** 2 for i in range(300)]


def test_max_concurrency_bounds_the_calls_running_at_once(cluster):
    a = Pool.options(max_concurrency=3).remote()
    ray.get(a.pid.remote(), timeout=60)
    peaks = ray.get([a.crowd.remote(3, 30) for _ in range(24)], timeout=120)
    # three ran at once (no call waited behind a blocked one), never a fourth
    assert ray.get(a.stats.remote(), timeout=60)["peak"] == 3
    assert max(peaks) == 3


def test_a_call_cancelled_while_it_waits_for_a_thread_never_runs(cluster, tmp_path):
    a = Pool.options(max_concurrency=2).remote()
    ray.get(a.pid.remote(), timeout=60)
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    held = [a.hold.remote(started, release) for _ in range(2)]
    poll_until(lambda: _lines(started) == 2, 60, what="both threads to be busy")
    queued = a.square.remote(5)
    ray.cancel(queued)
    with pytest.raises(TaskCancelledError):  # at once: both threads are still busy
        ray.get(queued, timeout=60)
    open(release, "w").close()
    assert ray.get(held, timeout=60) == ["released", "released"]
    assert ray.get(a.square.remote(6), timeout=60) == 36
    assert ray.get(a.stats.remote(), timeout=60)["squares"] == 1


def test_errors_in_a_burst_keep_their_tracebacks(cluster):
    a = Pool.remote()
    ray.get(a.pid.remote(), timeout=60)
    refs = [a.boom.remote(i) if i % 3 == 0 else a.square.remote(i) for i in range(60)]
    for i, ref in enumerate(refs):
        if i % 3:
            assert ray.get(ref, timeout=60) == i * i
            continue
        with pytest.raises(ValueError) as info:
            ray.get(ref, timeout=60)
        assert isinstance(info.value, RayTaskError)
        assert f"bad input {i}" in str(info.value)
        assert "in boom" in str(info.value)  # the actor's traceback


def test_an_actor_whose_handle_and_results_are_dropped_ends_after_its_calls(cluster):
    import psutil

    a = Pool.remote()
    pid = ray.get(a.pid.remote(), timeout=60)
    for i in range(5):
        a.square.remote(i)  # results dropped unread while the calls are in flight
    del a

    def gone():
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    poll_until(gone, 60, interval=0.1, what="the actor's process to end")


def test_kill_9_with_calls_in_flight_fails_each_with_actor_died(cluster, tmp_path):
    a = Pool.remote()
    pid = ray.get(a.pid.remote(), timeout=60)
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    running = [a.hold.remote(started, release) for _ in range(8)]
    queued = [a.square.remote(i) for i in range(20)]  # behind the 8 busy threads
    poll_until(lambda: _lines(started) == 8, 60, what="8 calls to run")
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    for ref in running + queued:
        with pytest.raises(RayActorError) as info:
            ray.get(ref, timeout=60)
        assert isinstance(info.value, ActorDiedError), info.value
    assert time.monotonic() - t0 < 60
    with pytest.raises(RayActorError):
        ray.get(a.square.remote(1), timeout=60)


def test_kill_9_with_retries_reruns_the_calls_on_the_restarted_actor(cluster, tmp_path):
    a = Pool.options(max_restarts=1, max_task_retries=-1).remote()
    pid = ray.get(a.pid.remote(), timeout=60)
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    running = [a.hold.remote(started, release) for _ in range(8)]
    queued = [a.square.remote(i) for i in range(20)]
    poll_until(lambda: _lines(started) == 8, 60, what="8 calls to run")
    os.kill(pid, signal.SIGKILL)
    open(release, "w").close()  # the reruns go straight through
    assert ray.get(running, timeout=120) == ["released"] * 8
    assert ray.get(queued, timeout=120) == [i * i for i in range(20)]
    assert ray.get(a.pid.remote(), timeout=60) != pid


# ------------------------------------------------------------------ a late broker
def _late_broker_cluster(tmp_path):
    from test_cli_cluster import _free_port, _Procs

    procs = _Procs(tmp_path)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    # the broker declares a silent node dead only after 300 s: its ROUTE comes late
    procs.env["ZRAY_NODE_TIMEOUT_S"] = "300"
    procs.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(port)])
    procs.start("node", ["worker", "--address", address, "--num-cpus", "2",
                         "--resources", '{"far": 1}'])
    procs.connect_driver(address, 60)
    poll_until(lambda: any(n["Alive"] for n in ray.nodes()), 60, what="the node")
    return procs


@pytest.mark.skipif(BACKEND == "ray", reason="a zray CLI cluster")
def test_a_dead_actor_is_noticed_from_its_lane_before_the_broker_knows(tmp_path):
    from zray import _runtime

    if ray.is_initialized():
        ray.shutdown()
    procs = _late_broker_cluster(tmp_path)
    try:
        a = Pool.options(resources={"far": 0.1}).remote()
        ray.get(a.pid.remote(), timeout=60)
        route = _runtime.client.direct.routes[a._actor_id]
        poll_until(lambda: route.state == "alive", 60, what="the actor's route")
        started, release = str(tmp_path / "started"), str(tmp_path / "release")
        running = [a.hold.remote(started, release, 120) for _ in range(4)]
        poll_until(lambda: _lines(started) == 4, 60, what="4 calls to run")
        assert route.lane is not None and all(
            c.lane is route.lane for c in route.inflight.values())
        # The node dies whole (its executors die with their agent): the broker hears
        # nothing for 300 s; the caller's lane ends now.
        kill_tree(procs.procs["node"].pid)
        t0 = time.monotonic()
        for ref in running:
            with pytest.raises(RayActorError) as info:
                ray.get(ref, timeout=100)
            assert isinstance(info.value, ActorDiedError), info.value
            assert "lane on this host closed" in str(info.value)
        assert time.monotonic() - t0 < 100  # (the broker would have said so after 300 s)
        assert route.state != "alive"  # new calls wait for the broker's word
        ray.shutdown()
        everything = procs.descendants()
        for p in procs.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.procs.values():
            p.wait(30)
        left = wait_gone(everything, 10)
        assert left == [], f"left behind: {describe(left)}"
    except BaseException:
        print(procs.logs())
        raise
    finally:
        if ray.is_initialized():
            ray.shutdown()
        procs.kill_all()
