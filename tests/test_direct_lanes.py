"""Lanes (zray/_lane.py): direct actor calls on one host over a Unix stream socket.

The first tests run on zray or on Ray (``ZRAY_TEST_BACKEND=ray``): what a user sees
of calls from many threads, of results too large for a socket buffer, of futures,
and of a thread whose call's executor died. The rest are zray's own: the lane is
the path the calls took, a lane message that is not one closes that lane and
nothing else, and the framing itself on a socket pair.

Waiting is get with a timeout or poll-with-deadline; sleeps in actor methods are
workload.
"""

import asyncio
import os
import signal
import socket
import threading

import pytest
from backend import BACKEND, local_cluster, pickle_by_value, ray
from conftest import poll_until

pytestmark = pytest.mark.timeout(180)
pickle_by_value(__name__)
cluster = local_cluster(num_cpus=4)
zray_only = pytest.mark.skipif(BACKEND != "zray", reason="zray's lanes")


@ray.remote
class Log:
    def __init__(self):
        self.seen = []

    def add(self, who, i):
        self.seen.append((who, i))
        return (who, i)

    def entries(self):
        return self.seen

    def pid(self):
        return os.getpid()

    def echo(self, x):
        return x

    def sleep(self, s, marker):
        import time

        open(marker, "w").close()  # the call started
        time.sleep(s)
        return s


def test_calls_from_many_threads_keep_each_threads_order(cluster):
    log = Log.remote()
    ray.get(log.pid.remote(), timeout=60)
    n, errors = 150, []

    def caller(who):
        try:
            batch = []
            for i in range(n):
                if i % 5 == 4:  # now and then a sync call, else calls in flight
                    assert ray.get(log.add.remote(who, i), timeout=60) == (who, i)
                else:
                    batch.append((i, log.add.remote(who, i)))
            for i, ref in batch:
                assert ray.get(ref, timeout=60) == (who, i)
        except BaseException as e:  # noqa: B036 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(f"t{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    seen = ray.get(log.entries.remote(), timeout=60)
    assert len(seen) == 4 * n
    for k in range(4):  # each thread's calls ran in the order it made them
        assert [i for w, i in seen if w == f"t{k}"] == list(range(n))


def test_values_larger_than_a_socket_buffer_both_ways(cluster):
    log = Log.remote()
    big = os.urandom(3 << 20)
    assert ray.get(log.echo.remote(big), timeout=60) == big
    # many in flight at once, none read until all are sent
    refs = [log.echo.remote(bytes([i]) * (600 << 10)) for i in range(12)]
    got = ray.get(refs, timeout=120)
    assert [(v[:1], len(v)) for v in got] == [(bytes([i]), 600 << 10) for i in range(12)]


def test_futures_and_await_of_direct_results(cluster):
    log = Log.remote()
    ray.get(log.pid.remote(), timeout=60)
    futs = [log.add.remote("f", i).future() for i in range(20)]
    assert [f.result(timeout=60) for f in futs] == [("f", i) for i in range(20)]

    async def main():
        return [await log.add.remote("a", i) for i in range(20)]

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [("a", i) for i in range(20)]
    ready, rest = ray.wait([log.add.remote("w", 0)], timeout=60)
    assert len(ready) == 1 and not rest


def test_a_thread_whose_actor_died_mid_call_recovers(cluster, tmp_path):
    marker = str(tmp_path / "started")
    log = Log.options(max_restarts=1).remote()
    pid = ray.get(log.pid.remote(), timeout=60)
    for i in range(20):  # the lane to the first process is in use
        assert ray.get(log.add.remote("before", i), timeout=60) == ("before", i)
    out = {}

    def blocked():
        try:
            out["value"] = ray.get(log.sleep.remote(30, marker), timeout=90)
        except Exception as e:  # what this thread sees of the death
            out["error"] = e

    t = threading.Thread(target=blocked)
    t.start()
    poll_until(lambda: os.path.exists(marker), 30, what="the call to start")
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    assert not t.is_alive()
    assert isinstance(out.get("error"), ray.exceptions.RayActorError), out
    # the same thread kind of code goes on against the restarted actor
    new_pid = poll_until(lambda: _pid_or_none(log), 60, what="the restarted actor")
    assert new_pid != pid
    for i in range(20):
        assert ray.get(log.add.remote("after", i), timeout=60) == ("after", i)


def _pid_or_none(log):
    try:
        return ray.get(log.pid.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return None


@ray.remote
class AsyncEcho:
    async def echo(self, x):
        return x

    async def nap(self, s, x):
        await asyncio.sleep(s)
        return x


def test_async_actor_sync_calls_large_values_and_overlap(cluster):
    a = AsyncEcho.remote()
    for i in range(50):
        assert ray.get(a.echo.remote(i), timeout=60) == i
    big = os.urandom(4 << 20)  # more than the socket takes at once: the loop's writer
    assert ray.get(a.echo.remote(big), timeout=60) == big
    # a slow call does not hold up a quick one made after it (an async actor)
    slow = a.nap.remote(2.0, "slow")
    assert ray.get(a.nap.remote(0.0, "quick"), timeout=60) == "quick"
    ready, _ = ray.wait([slow], timeout=0)
    assert not ready
    assert ray.get(slow, timeout=60) == "slow"


# ------------------------------------------------------------------ zray only
@zray_only
def test_calls_take_the_lane_and_a_bad_lane_message_only_closes_that_lane(cluster):
    from zray import _lane, _runtime

    log = Log.remote()
    ray.get(log.pid.remote(), timeout=60)
    direct = _runtime.client.direct
    route = poll_until(lambda: _alive_route(direct, log), 30, what="the actor's route")
    assert ray.get(log.add.remote("x", 0), timeout=60) == ("x", 0)
    assert route.lane is not None and not route.lane_failed  # the call went on the lane
    path = _lane.lane_path(route.address)
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0  # a private dir

    # someone (of this user) writes garbage to the actor's lane: that lane closes
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(30)
    raw.connect(path)
    raw.sendall(b"\xff\xff\xff\xff" + b"\0" * 64)
    assert raw.recv(10) == b""  # closed by the executor
    raw.close()
    # a well-framed message that is not a call: dropped, the lane stays
    other = _lane.connect(path)
    other.send(b"not msgpack")
    other.send(b"\x81\xa1x\x01")
    assert ray.get(log.add.remote("x", 1), timeout=60) == ("x", 1)  # ours lives on
    other.close()
    assert ray.get(log.entries.remote(), timeout=60) == [("x", 0), ("x", 1)]


def _alive_route(direct, actor):
    route = direct.routes.get(actor._actor_id)
    return route if route is not None and route.state == "alive" else None


@zray_only
def test_lane_framing_on_a_socket_pair():
    from zray import _lane

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    la, lb = _lane.Lane(a), _lane.Lane(b)
    sizes = [0, 1, 100, 70_000, 5 << 20]
    msgs = [(b"h%d" % i, [os.urandom(n), b"x"]) for i, n in enumerate(sizes)]
    got = []
    pending = []
    for header, frames in msgs:
        if not la.send(header, frames):
            pending.append(1)
        while la.pending():  # the reader drains while the writer flushes
            got.extend(lb.read())
            la.flush()
    while len(got) < len(msgs):
        got.extend(lb.read())
    assert [[bytes(p) for p in m] for m in got] == [[h, *f] for h, f in msgs]
    assert pending  # the 5 MiB one did not fit the socket at once

    la.sock.send(b"\0\0\0\0")  # a message of 0 frames: not a lane message
    with pytest.raises(_lane.LaneClosed):
        while True:
            lb.read()
    la.close()
    lb.close()
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    c.setblocking(False)
    lc = _lane.Lane(c)
    d.close()
    with pytest.raises(_lane.LaneClosed):
        lc.read()  # EOF
    lc.close()
