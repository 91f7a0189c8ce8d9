"""A broker restart does not lose the cluster (issue 10 item 7).

A real cluster started with the CLI (``zray broker --state-dir`` and one
``zray worker``), a driver connected to it (this test process), then the
broker is killed with SIGKILL and started again on the same port with the same
state directory, as systemd would. What the user sees:

* the driver's tasks that were in flight finish with the right values, and
  so does a store-sized result that finished before the crash;
* the worker takes work again within seconds;
* a detached named actor is found by name with its state intact, and so is a
  non-detached actor of the driver that stayed connected;
* new tasks and actors work, and nothing is left running at the end.
"""

import os
import signal
import time

import numpy as np
import pytest
from conftest import poll_until, wait_gone
from test_cli_cluster import _free_port, _Procs

import zray


@zray.remote
def slow_square(x, delay):
    time.sleep(delay)
    return x * x


@zray.remote
def big_array(n):
    return np.arange(n, dtype=np.int64)


@zray.remote
def add(a, b):
    return a + b


@zray.remote
def whoami():
    return os.getpid()


@zray.remote
class Counter:
    def __init__(self, start=0):
        self.n = start
        self.pid = os.getpid()

    def incr(self, k=1):
        self.n += k
        return self.n

    def where(self):
        return self.pid


def _start_broker(procs, name, port, state):
    return procs.start(name, ["broker", "--host", "127.0.0.1", "--port", str(port),
                              "--state-dir", str(state)])


@pytest.mark.timeout(240)
def test_broker_kill9_and_restart_keeps_the_cluster(tmp_path):
    if zray.is_initialized():
        zray.shutdown()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    state = tmp_path / "state"
    procs = _Procs(tmp_path)
    try:
        broker = _start_broker(procs, "broker", port, state)
        procs.start("worker", ["worker", "--address", address, "--num-cpus", "2"])

        def connected():
            procs.check_running()
            try:
                zray.init(address=address)
                return True
            except ConnectionError:
                return False

        poll_until(connected, 60, interval=0.2, what="the driver to connect to the broker")
        try:
            poll_until(lambda: [n for n in zray.nodes() if n["Alive"]], 60, interval=0.1,
                       what="the worker to join")
            keeper = Counter.options(name="keeper", lifetime="detached").remote(100)
            assert zray.get(keeper.incr.remote(5), timeout=60) == 105
            mine = Counter.remote()
            assert zray.get(mine.incr.remote(1), timeout=60) == 1
            actor_pid = zray.get(keeper.where.remote(), timeout=60)
            big = big_array.remote(1_000_000)  # 8 MB: lives in the node's store
            zray.wait([big], timeout=60)
            small = zray.put(41)
            inflight = [slow_square.remote(i, 2.0) for i in range(6)]
            chained = add.remote(inflight[0], small)  # depends on an in-flight result
            time.sleep(0.5)  # (not synchronisation: lets some of them start before the crash)

            os.kill(broker.pid, signal.SIGKILL)
            broker.wait(10)
            del procs.procs["broker"]
            _start_broker(procs, "broker2", port, state)

            def listening():
                procs.check_running()
                return "listening on" in (tmp_path / "broker2.log").read_text(errors="replace")

            poll_until(listening, 60, interval=0.05, what="the new broker to listen")
            restarted = time.monotonic()

            # The worker takes work again within seconds.
            assert zray.get(whoami.remote(), timeout=60) > 0
            rejoin_s = time.monotonic() - restarted
            assert rejoin_s < 30, rejoin_s
            # In-flight tasks finish, with the right values.
            assert zray.get(inflight, timeout=90) == [i * i for i in range(6)]
            assert zray.get(chained, timeout=60) == 41
            # A store-sized result made before the crash is still there.
            arr = zray.get(big, timeout=60)
            assert arr.shape == (1_000_000,) and int(arr[-1]) == 999_999
            assert zray.get(small, timeout=30) == 41
            # The detached actor: found by name, same process, state intact.
            again = zray.get_actor("keeper")
            assert zray.get(again.incr.remote(1), timeout=60) == 106
            assert zray.get(again.where.remote(), timeout=30) == actor_pid
            # The driver's own actor lives on too.
            assert zray.get(mine.incr.remote(1), timeout=60) == 2
            # New work: tasks with dependencies and a new actor.
            assert zray.get(add.remote(add.remote(1, 2), 3), timeout=60) == 6
            fresh = Counter.remote(7)
            assert zray.get(fresh.incr.remote(), timeout=60) == 8
            print(f"worker took work again {rejoin_s:.1f}s after the broker restarted")
            zray.kill(again)
        finally:
            zray.shutdown()
        procs.check_running()
    finally:
        everything = procs.descendants()
        procs.kill_all()
        wait_gone(everything, 20)
