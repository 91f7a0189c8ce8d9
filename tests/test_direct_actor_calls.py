"""Direct actor calls (zray/_direct.py, workerd/direct.py), end to end on real clusters.

A plain actor call goes from the caller straight to the actor's executor once the
broker has said where it listens; calls with ObjectRef arguments, generator calls
and calls made before the route is known go through the broker. These tests drive
both paths, mixed, from several callers, through deaths, restarts and cancels, on
a local cluster and on a 2-node CLI cluster over TCP with CURVE; one checks that
direct calls cost the broker (nearly) no messages, another that
``ZRAY_DIRECT_ACTOR_CALLS=0`` sends everything through the broker again.

Waiting is poll-with-deadline or get with a timeout; sleeps inside actor methods
are workload.
"""

import asyncio
import json
import os
import signal
import threading
import time

import pytest
import zmq
from conftest import kill_tree, poll_until
from test_cli_cluster import _free_port, _Procs

import zray as ray
from zray import _runtime
from zray.exceptions import (
    ActorDiedError,
    RayActorError,
    RayTaskError,
    TaskCancelledError,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4)
    try:
        yield
    finally:
        ray.shutdown()


def _direct_calls(actor=None) -> int:
    """Direct calls the broker has been told of (executors report about once a second)."""
    if _runtime.client.direct is None:
        return 1 << 30  # (switched off: nothing to count)
    args = {"actor_id": actor._actor_id} if actor is not None else {}
    return _runtime.client.request("direct_calls", args)["calls"]


def _wait_direct(actor, timeout: float = 30):
    """Wait until this process calls ``actor`` directly (its route is known)."""
    ray.get(actor.__ray_ready__.remote(), timeout=60)
    direct = _runtime.client.direct
    if direct is None:  # ZRAY_DIRECT_ACTOR_CALLS=0: the same tests, through the broker
        return

    def alive():
        route = direct.routes.get(actor._actor_id)
        return route is not None and route.state == "alive"

    poll_until(alive, timeout, what="the actor's route")


@ray.remote
class Log:
    def __init__(self):
        self.seen = []

    def add(self, who, i, value=None):
        self.seen.append((who, i))
        return (who, i, value)

    def entries(self):
        return list(self.seen)

    def pid(self):
        return os.getpid()

    def slow(self, i, delay=0.2):
        time.sleep(delay)
        return i

    def boom(self):
        raise ValueError("boom 81c2")

    def stream(self, who, n):
        for i in range(n):
            time.sleep(0.01)
            self.seen.append((who, f"item{i}"))
            yield i


@ray.remote
def mixed_caller(log, who, n):
    """Calls ``log`` from an executor: plain calls and calls with a ref argument."""
    refs = []
    for i in range(n):
        if i % 3 == 1:
            refs.append(log.add.remote(who, i, ray.put(i)))  # a ref: the broker path
        else:
            refs.append(log.add.remote(who, i, i))
    return ray.get(refs, timeout=60)


@ray.remote
def double(x):
    return x * 2


@ray.remote
def get_inner(box):
    return ray.get(box[0], timeout=30)


def test_order_holds_across_direct_and_broker_paths_from_several_callers(cluster):
    log = Log.remote()
    _wait_direct(log)
    before = _direct_calls(log)
    n = 30
    callers = [mixed_caller.remote(log, f"task{k}", n) for k in range(2)]
    mine = []
    for i in range(n):
        if i % 4 == 2:
            mine.append(log.add.remote("driver", i, ray.put(i)))  # broker path
        else:
            mine.append(log.add.remote("driver", i, i))  # direct
    assert ray.get(mine, timeout=60) == [("driver", i, i) for i in range(n)]
    for k, c in enumerate(callers):
        assert ray.get(c, timeout=60) == [(f"task{k}", i, i) for i in range(n)]
    seen = ray.get(log.entries.remote(), timeout=30)
    for who in ("driver", "task0", "task1"):
        assert [i for w, i in seen if w == who] == list(range(n)), (who, seen)
    # The driver's plain calls went direct (22 of its 30; the tasks' may have gone before
    # they learnt the route). Executors report their counts about once a second.
    poll_until(lambda: _direct_calls(log) - before >= n // 2, 30, what="direct calls reported")


def test_a_streaming_call_keeps_its_place_among_direct_calls(cluster):
    log = Log.remote()
    _wait_direct(log)
    gen = log.stream.remote("s", 5)  # a generator: the broker path
    after = log.add.remote("s", "after")  # direct, held until the stream ended
    assert [ray.get(r, timeout=30) for r in gen] == list(range(5))
    assert ray.get(after, timeout=30) == ("s", "after", None)
    seen = [i for w, i in ray.get(log.entries.remote(), timeout=30) if w == "s"]
    assert seen == [f"item{i}" for i in range(5)] + ["after"], seen


def test_a_direct_result_escapes_to_a_task_and_into_a_stored_value(cluster):
    log = Log.remote()
    _wait_direct(log)
    r = log.slow.remote(21, 0.3)  # direct; not here yet when it escapes below
    assert ray.get(double.remote(r), timeout=60) == 42
    box = ray.put([log.slow.remote(5, 0.2)])
    assert ray.get(get_inner.remote(box), timeout=60) == 5
    # a direct result passed to another actor call (a ref argument: the broker path)
    r2 = log.add.remote("driver", 0, 7)
    assert ray.get(log.add.remote("driver", 1, r2), timeout=60) == ("driver", 1,
                                                                   ("driver", 0, 7))
    # errors come back as today's RayTaskError
    with pytest.raises(RayTaskError, match="boom 81c2"):
        ray.get(log.boom.remote(), timeout=30)
    err = log.boom.remote()
    with pytest.raises(RayTaskError, match="boom 81c2"):
        ray.get(double.remote(err), timeout=30)
    # refs dropped before their results come: nothing breaks, nothing is asked of the broker
    for i in range(50):
        log.add.remote("drop", i)
    assert ray.get(log.add.remote("driver", 2), timeout=30) == ("driver", 2, None)


def test_ray_kill_mid_stream_fails_the_calls_in_flight(cluster):
    log = Log.remote()
    _wait_direct(log)
    refs = [log.slow.remote(i, 0.1) for i in range(40)]
    assert ray.get(refs[0], timeout=30) == 0
    ray.kill(log)
    results = []
    for r in refs[1:]:
        try:
            results.append(ray.get(r, timeout=30))
        except ActorDiedError:
            results.append("died")
    assert "died" in results
    assert all(v == "died" for v in results[results.index("died"):]), results
    with pytest.raises(ActorDiedError):
        ray.get(log.slow.remote(0, 0), timeout=30)


def test_kill_9_of_the_executor_restarts_and_retries(cluster):
    log = Log.options(max_restarts=1, max_task_retries=-1).remote()
    _wait_direct(log)
    pid = ray.get(log.pid.remote(), timeout=30)
    refs = [log.slow.remote(i, 0.05) for i in range(40)]
    assert ray.get(refs[0], timeout=30) == 0
    os.kill(pid, signal.SIGKILL)
    assert ray.get(refs, timeout=90) == list(range(40))  # retried on the new process
    assert ray.get(log.pid.remote(), timeout=30) != pid
    _wait_direct(log)  # the caller learnt where it went
    assert ray.get([log.slow.remote(i, 0) for i in range(20)], timeout=30) == list(range(20))
    # Its last life: killed again, the calls in flight fail with RayActorError.
    pid = ray.get(log.pid.remote(), timeout=30)
    refs = [log.slow.remote(i, 0.05) for i in range(20)]
    assert ray.get(refs[0], timeout=30) == 0
    os.kill(pid, signal.SIGKILL)
    failed = 0
    for r in refs[1:]:
        try:
            ray.get(r, timeout=60)
        except RayActorError:
            failed += 1
    assert failed > 0
    with pytest.raises(RayActorError):
        ray.get(log.slow.remote(0, 0), timeout=60)


def test_kill_9_without_retries_gives_actor_unavailable_then_recovers(cluster):
    log = Log.options(max_restarts=1).remote()
    _wait_direct(log)
    pid = ray.get(log.pid.remote(), timeout=30)
    slow = log.slow.remote(1, 30)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RayActorError) as info:
        ray.get(slow, timeout=60)
    assert type(info.value).__name__ == "ActorUnavailableError", info.value
    assert ray.get(log.slow.remote(3, 0), timeout=60) == 3


def test_cancel_a_queued_direct_call(cluster):
    log = Log.remote()
    _wait_direct(log)
    first = log.slow.remote(1, 2)
    queued = log.slow.remote(2, 2)
    ray.cancel(queued)
    with pytest.raises(TaskCancelledError):
        ray.get(queued, timeout=30)
    assert ray.get(first, timeout=30) == 1
    assert ray.get(log.slow.remote(3, 0), timeout=30) == 3


@ray.remote
class AsyncWaiter:
    def __init__(self):
        self.event = None

    async def wait(self):
        if self.event is None:
            self.event = asyncio.Event()
        await self.event.wait()
        return "woke"

    async def set(self):
        if self.event is None:
            self.event = asyncio.Event()
        self.event.set()
        return "set"

    async def sleep(self, s):
        await asyncio.sleep(s)
        return s


@ray.remote(max_concurrency=2)
class Threaded:
    def __init__(self):
        self.event = threading.Event()

    def wait(self):
        return self.event.wait(30)

    def set(self):
        self.event.set()
        return True


def test_async_and_threaded_actors_keep_running_calls_concurrently(cluster):
    a = AsyncWaiter.remote()
    _wait_direct(a)
    w = a.wait.remote()
    assert ray.wait([w], timeout=0.3)[0] == []
    assert ray.get(a.set.remote(), timeout=30) == "set"
    assert ray.get(w, timeout=30) == "woke"
    # cancelling a running async call interrupts it
    s = a.sleep.remote(30)
    assert ray.wait([s], timeout=0.3)[0] == []
    ray.cancel(s)
    with pytest.raises(TaskCancelledError):
        ray.get(s, timeout=30)

    t = Threaded.remote()
    _wait_direct(t)
    w = t.wait.remote()
    assert ray.get(t.set.remote(), timeout=30) is True
    assert ray.get(w, timeout=30) is True


def test_direct_calls_cost_the_broker_nearly_no_messages(cluster):
    if _runtime.client.direct is None:
        pytest.skip("ZRAY_DIRECT_ACTOR_CALLS=0")
    log = Log.remote()
    _wait_direct(log)
    client = _runtime.client
    sent0 = client.request("status")["sent_messages"]
    for i in range(1000):
        assert ray.get(log.add.remote("driver", i), timeout=30) == ("driver", i, None)
    sent = client.request("status")["sent_messages"] - sent0
    # through the broker each call costs it at least an EXEC and an OBJ (2,000 messages)
    assert sent < 100, sent
    poll_until(lambda: _direct_calls(log) >= 1000, 30, what="the calls to be reported")


def test_a_bad_message_on_the_direct_socket_is_dropped_not_fatal(cluster):
    if _runtime.client.direct is None:
        pytest.skip("ZRAY_DIRECT_ACTOR_CALLS=0")
    log = Log.remote()
    _wait_direct(log)
    address = _runtime.client.direct.routes[log._actor_id].address
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    try:
        for junk in ([b"not msgpack \xc1"], [b"\x92\x05\xc0"], [b"\x93\x47\x90\xa0"]):
            s.send_multipart(junk)
    finally:
        s.close(0)
    assert ray.get(log.add.remote("driver", 1), timeout=30) == ("driver", 1, None)


def test_switch_off_sends_every_call_through_the_broker(run_driver):
    src = """
import zray as ray
ray.init(num_cpus=1)

@ray.remote
class C:
    def f(self, i):
        return i

c = C.remote()
assert ray.get(c.f.remote(0), timeout=60) == 0
assert ray._runtime.client.direct is None
sent0 = ray._runtime.client.request("status")["sent_messages"]
assert ray.get([c.f.remote(i) for i in range(300)], timeout=60) == list(range(300))
print("SENT", ray._runtime.client.request("status")["sent_messages"] - sent0)
ray.shutdown()
"""
    out = run_driver(src, timeout=90, ZRAY_DIRECT_ACTOR_CALLS="0")
    assert out.returncode == 0, out.stderr
    sent = int(out.stdout.split("SENT")[1].split()[0])
    assert sent >= 300, out.stdout


@ray.remote
class Pinned:
    def node(self):
        return ray.get_runtime_context().get_node_id()

    def pid(self):
        return os.getpid()

    def echo(self, x):
        return x


@ray.remote
class Relay:
    """An actor on one node calling an actor on the other (an executor as the caller)."""

    def call(self, other, n):
        return [ray.get(other.echo.remote(i), timeout=60) for i in range(n)]


def test_cross_node_direct_calls_on_a_curve_cli_cluster(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = _Procs(tmp_path)
    try:
        procs.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(port)])
        procs.start("workerA", ["worker", "--address", address, "--num-cpus", "2",
                                "--resources", json.dumps({"nodeA": 1})])
        procs.start("workerB", ["worker", "--address", address, "--num-cpus", "2",
                                "--resources", json.dumps({"nodeB": 1})])
        procs.connect_driver(address, 60)
        try:
            poll_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 60,
                       what="2 alive nodes")
            b = Pinned.options(resources={"nodeB": 0.1}, max_restarts=1).remote()
            a = Relay.options(resources={"nodeA": 0.1}).remote()
            _wait_direct(b)
            node_b = ray.get(b.node.remote(), timeout=60)
            assert ray.get([b.echo.remote(i) for i in range(200)], timeout=60) == list(range(200))
            assert ray.get(a.call.remote(b, 100), timeout=60) == list(range(100))
            # (each caller's first call goes through the broker: the route is not known yet)
            poll_until(lambda: _direct_calls(b) >= 250, 30, what="direct calls reported")
            # kill -9 of the executor on node B: a call in flight fails, the actor restarts
            pid = ray.get(b.pid.remote(), timeout=30)
            slow = b.echo.remote(1)
            ray.get(slow, timeout=30)
            os.kill(pid, signal.SIGKILL)

            def restarted():
                try:  # a call sent before the caller heard of the death fails with
                    return ray.get(b.pid.remote(), timeout=60) != pid  # ActorUnavailableError
                except RayActorError as e:
                    assert type(e).__name__ == "ActorUnavailableError", e
                    return False

            poll_until(restarted, 60, what="the actor to restart")
            assert ray.get(b.node.remote(), timeout=60) == node_b
            _wait_direct(b)
            assert ray.get(b.echo.remote("again"), timeout=30) == "again"
        finally:
            ray.shutdown()
    finally:
        procs.kill_all()
        for p in procs.procs.values():
            kill_tree(p.pid)
