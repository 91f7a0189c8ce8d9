"""Sync task loops and the results that come back on result lanes (zray/_resultlane.py).

A task's result is pushed by its executor straight to an owner on the same node,
over a Unix stream that the thread waiting in ``get()`` reads itself; whatever
no thread waits for the owner's I/O thread reads. None of this may change what a
user sees: right values in a sync loop, errors with their tracebacks, large
values, results holding refs, timeouts, cancel, crashes and retries, several
threads, futures, ``wait()``, and results nobody waits for yet.

Run on Ray too (ZRAY_TEST_BACKEND=ray), except the checks of zray's own switch.
"""

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from _gates import after_file
from backend import BACKEND, local_cluster, pickle_by_value, ray
from conftest import driver_env, poll_until

pickle_by_value(__name__)
cluster = local_cluster(num_cpus=2)
zray_only = pytest.mark.skipif(BACKEND != "zray", reason="zray's own switch and internals")


@ray.remote
def echo(x):
    return x


@ray.remote
def square(x):
    return x * x


@ray.remote
def fail(msg):
    raise ValueError(msg)


@ray.remote
def big(n):
    return np.arange(n, dtype=np.int64)


@ray.remote
def holds_ref(x):
    return [ray.put(x)]


@ray.remote
def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


@ray.remote
def crash_once(marker):
    """Write this process's pid and hang the first time; return at once when run again."""
    if os.path.exists(marker):
        return "retried"
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(marker + ".tmp", marker)
    time.sleep(120)
    return "not killed"


@pytest.mark.timeout(120)
def test_sync_loop_gives_each_task_its_own_result(cluster):
    for i in range(500):
        assert ray.get(square.remote(i), timeout=60) == i * i


@pytest.mark.timeout(120)
def test_sync_loop_mixes_values_errors_large_values_and_refs(cluster):
    for i in range(30):
        assert ray.get(echo.remote(("v", i)), timeout=60) == ("v", i)
        with pytest.raises(ValueError, match=f"bad {i}") as err:
            ray.get(fail.remote(f"bad {i}"), timeout=60)
        assert "in fail" in str(err.value)  # the remote traceback names the function
        arr = ray.get(big.remote(300_000 + i), timeout=60)  # past the inline size: the store
        assert arr.shape == (300_000 + i,) and int(arr[-1]) == 300_000 + i - 1
        inner = ray.get(holds_ref.remote(i), timeout=60)  # a result holding a ref
        assert ray.get(inner[0], timeout=60) == i


@pytest.mark.timeout(120)
def test_sync_gets_from_several_threads(cluster):
    errors, done = [], []

    def loop(k):
        try:
            for i in range(150):
                assert ray.get(echo.remote((k, i)), timeout=60) == (k, i)
            done.append(k)
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors and sorted(done) == [0, 1, 2, 3]


@pytest.mark.timeout(120)
def test_timeout_then_the_value(cluster, tmp_path):
    gate = str(tmp_path / "gate")
    ref = after_file.remote(gate, "late")
    with pytest.raises(ray.exceptions.GetTimeoutError):
        ray.get(ref, timeout=0.3)
    assert ray.get(echo.remote("meanwhile"), timeout=60) == "meanwhile"
    with open(gate, "w") as f:
        f.write("go")
    assert ray.get(ref, timeout=60) == "late"


@pytest.mark.timeout(120)
def test_results_nobody_waits_for_yet_are_all_there_later(cluster):
    # Results pile up while the driver does not wait; then wait(), futures and get.
    refs = [square.remote(i) for i in range(2000)]
    poll_until(lambda: len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs),
               timeout=90, what="all 2,000 results ready")
    assert ray.get(refs, timeout=60) == [i * i for i in range(2000)]
    fut = square.remote(7).future()
    assert fut.result(timeout=60) == 49


@pytest.mark.timeout(120)
def test_await_and_wait_one_of_many(cluster, tmp_path):
    gate = str(tmp_path / "gate")
    slow = after_file.remote(gate, "slow")
    fast = echo.remote("fast")
    ready, not_ready = ray.wait([slow, fast], num_returns=1, timeout=60)
    assert ready == [fast] and not_ready == [slow]

    async def main():
        return await echo.remote("awaited")

    assert asyncio.run(main()) == "awaited"
    with open(gate, "w") as f:
        f.write("go")
    assert ray.get(slow, timeout=60) == "slow"


@pytest.mark.timeout(120)
def test_cancel_a_running_task_of_a_sync_loop(cluster):
    assert ray.get(echo.remote(1), timeout=60) == 1
    ref = sleep_then.remote(60, "not cancelled")
    time.sleep(0.5)  # (not synchronisation: a cancel before it starts is also a cancel)
    ray.cancel(ref)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
        ray.get(ref, timeout=60)
    for i in range(20):  # the loop goes on
        assert ray.get(square.remote(i), timeout=60) == i * i


@pytest.mark.timeout(180)
@pytest.mark.parametrize("retries", [1, 0])
def test_executor_killed_mid_task_retried_or_crashed(cluster, tmp_path, retries):
    assert ray.get(square.remote(3), timeout=60) == 9
    marker = str(tmp_path / "pid")
    ref = crash_once.options(max_retries=retries).remote(marker)
    poll_until(lambda: os.path.exists(marker), timeout=60, what="the task started")
    os.kill(int(open(marker).read()), 9)
    if retries:
        assert ray.get(ref, timeout=90) == "retried"
    else:
        with pytest.raises(ray.exceptions.WorkerCrashedError):
            ray.get(ref, timeout=90)
    for i in range(10):  # the sync loop goes on, on a fresh executor
        assert ray.get(square.remote(i), timeout=60) == i * i


@zray_only
@pytest.mark.timeout(120)
def test_results_come_on_lanes_and_the_switch_turns_them_off(cluster, tmp_path):
    from zray import _runtime

    client = _runtime.client
    for i in range(20):
        assert ray.get(echo.remote(i), timeout=60) == i
    assert client.results is not None and client.results.lanes  # executors connected
    script = tmp_path / "off.py"
    script.write_text(textwrap.dedent("""
        import zray as ray
        ray.init(num_cpus=1)
        from zray import _runtime
        assert _runtime.client.results is None
        @ray.remote
        def f(x):
            return x + 1
        assert [ray.get(f.remote(i), timeout=60) for i in range(50)] == list(range(1, 51))
        ray.shutdown()
        print("ok")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=90, env=driver_env(ZRAY_RESULT_LANES="0"))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


_OTHER_DRIVER = r"""
import sys
import {backend} as ray

ray.init(address=sys.argv[1])
tag = sys.argv[2]

@ray.remote
def echo(x):
    return x

for i in range(300):
    assert ray.get(echo.remote((tag, i)), timeout=60) == (tag, i)
print("ok", tag, flush=True)
"""


def _cluster_address() -> str:
    if BACKEND == "ray":
        return ray.get_runtime_context().gcs_address
    return ray._runtime.client.address


@pytest.mark.timeout(180)
def test_sync_loops_of_several_drivers_each_get_their_own_results(cluster):
    # The same executors run tasks of three drivers at once, each its own owner (this
    # one's results come on lanes; a driver that joined by address has no store of
    # the node, so the broker forwards its results, as on main).
    procs = [subprocess.Popen([sys.executable, "-c", _OTHER_DRIVER.format(backend=BACKEND),
                               _cluster_address(), tag], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=driver_env())
             for tag in ("a", "b")]
    try:
        for i in range(300):
            assert ray.get(echo.remote(("main", i)), timeout=60) == ("main", i)
        for p, tag in zip(procs, ("a", "b"), strict=True):
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0 and f"ok {tag}" in out, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@zray_only
def test_garbage_on_a_result_lane_is_dropped_and_the_driver_goes_on(cluster):
    """A peer that writes nonsense to the driver's result lane (well framed but not a
    message, a message of the wrong type, a frame longer than its body, raw bytes) is
    dropped; results keep coming on the lanes of real executors."""
    import socket

    import msgpack

    from zray import _lane, _runtime
    from zray import _protocol as P

    client = _runtime.client
    assert ray.get(echo.remote(0), timeout=60) == 0
    assert client.results is not None
    path = client.results.path
    bad = _lane.connect(path)
    bad.send(b"\xc1 not msgpack")
    bad.send(msgpack.packb([int(P.Msg.SUBMIT), "nope"]))
    bad.send(msgpack.packb([999, 1, 2, 3]))
    bad.flush()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(path)
    raw.sendall(b"\xff" * 64)  # a frame length far past anything that follows
    raw.close()
    for i in range(200):
        assert ray.get(echo.remote(i), timeout=60) == i
    bad.close()
