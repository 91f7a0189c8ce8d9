"""``zray.util.queue.Queue`` on a real local cluster: the queue's actor, producer and
consumer tasks and actors are real processes (no mocks).

Runs on zray and, with ``ZRAY_TEST_BACKEND=ray``, on Ray 2.60 to check that the
semantics match. Waiting is done with the queue's own timeouts and get/wait.
"""

import asyncio
import importlib
import queue as stdlib_queue
import time
import uuid

import pytest
from backend import BACKEND, local_cluster, pickle_by_value, ray

rq = importlib.import_module(BACKEND + ".util.queue")
Queue, Empty, Full = rq.Queue, rq.Empty, rq.Full

pickle_by_value(__name__)

pytestmark = pytest.mark.timeout(120)


cluster = local_cluster(num_cpus=4)


@ray.remote
def produce(q, items):
    for item in items:
        q.put(item)
    return len(items)


@ray.remote
def consume(q, n, timeout):
    return [q.get(timeout=timeout) for _ in range(n)]


@ray.remote
class AsyncConsumer:
    async def take(self, q, n):
        return [await q.get_async(timeout=60) for _ in range(n)]


def test_names_are_rays():
    assert issubclass(Empty, stdlib_queue.Empty)
    assert issubclass(Full, stdlib_queue.Full)
    assert ray.util.queue.Queue is Queue  # importing the backend makes util.queue available


def test_fifo_sizes_and_flags(cluster):
    q = Queue(maxsize=3)
    assert q.empty() and not q.full()
    assert q.size() == q.qsize() == len(q) == 0
    for i in range(3):
        q.put(i)
    assert q.full() and not q.empty() and len(q) == 3
    assert [q.get(), q.get_nowait(), q.get(block=False)] == [0, 1, 2]
    assert q.empty()
    q.shutdown()


def test_nowait_raises_empty_and_full(cluster):
    q = Queue(maxsize=1)
    with pytest.raises(Empty):
        q.get_nowait()
    with pytest.raises(stdlib_queue.Empty):
        q.get(block=False)
    q.put_nowait("x")
    with pytest.raises(Full):
        q.put_nowait("y")
    with pytest.raises(stdlib_queue.Full):
        q.put("y", block=False)
    assert q.get() == "x"
    q.shutdown()


def test_blocking_timeouts(cluster):
    q = Queue(maxsize=1)
    t0 = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout=0.3)
    assert time.monotonic() - t0 >= 0.25  # it did wait for the timeout
    q.put(1)
    with pytest.raises(Full):
        q.put(2, timeout=0.3)
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)
    with pytest.raises(ValueError, match="non-negative"):
        q.put(3, timeout=-1)
    assert q.get(timeout=5) == 1
    q.shutdown()


@pytest.mark.skipif(BACKEND == "ray", reason="Ray 2.60 raises Empty/Full with timeout=0 "
                    "even when an item (room) is there; zray does what queue.Queue does")
def test_zero_timeout_takes_what_is_there(cluster):
    q = Queue(maxsize=1)
    q.put(1, timeout=0)
    assert q.get(timeout=0) == 1
    with pytest.raises(Empty):
        q.get(timeout=0)
    q.shutdown()


def test_blocked_get_is_woken_by_a_producer_task(cluster):
    q = Queue()
    consumer = consume.remote(q, 3, 60)  # blocks in the queue's actor until items come
    ready, _ = ray.wait([consumer], timeout=0.5)
    assert not ready
    assert ray.get(produce.remote(q, ["a", "b", "c"])) == 3
    assert ray.get(consumer, timeout=60) == ["a", "b", "c"]
    q.shutdown()


def test_blocked_put_is_woken_by_a_consumer(cluster):
    q = Queue(maxsize=2)
    producer = produce.remote(q, list(range(6)))  # blocks when full
    got = [q.get(timeout=60) for _ in range(6)]
    assert got == list(range(6))
    assert ray.get(producer, timeout=60) == 6
    q.shutdown()


def test_batches(cluster):
    q = Queue(maxsize=4)
    q.put_nowait_batch([1, 2, 3])
    with pytest.raises(Full, match="Cannot add 2 items to queue of size 3 and maxsize 4"):
        q.put_nowait_batch([4, 5])
    assert q.qsize() == 3  # all or nothing
    with pytest.raises(Empty, match="Cannot get 4 items from queue of size 3"):
        q.get_nowait_batch(4)
    assert q.get_nowait_batch(2) == [1, 2]
    assert q.get_nowait_batch(0) == []
    with pytest.raises(TypeError, match="must be an int"):
        q.get_nowait_batch("2")
    with pytest.raises(ValueError, match="nonnegative"):
        q.get_nowait_batch(-1)
    with pytest.raises(TypeError, match="must be an Iterable"):
        q.put_nowait_batch(5)
    if BACKEND == "ray":  # Ray 2.60 cannot pickle a generator given as items
        q.put_nowait_batch([7, 8])
    else:
        q.put_nowait_batch(x for x in (7, 8))
    assert q.get_nowait_batch(3) == [3, 7, 8]
    q.shutdown()


def test_async_variants(cluster):
    q = Queue(maxsize=1)

    async def main():
        await q.put_async("a")
        with pytest.raises(Full):
            await q.put_async("b", block=False)
        with pytest.raises(Full):
            await q.put_async("b", timeout=0.1)
        assert await q.get_async() == "a"
        with pytest.raises(Empty):
            await q.get_async(block=False)
        with pytest.raises(Empty):
            await q.get_async(timeout=0.1)

    asyncio.run(main())
    q.shutdown()


def test_async_actor_consumer(cluster):
    q = Queue()
    c = AsyncConsumer.remote()
    taken = c.take.remote(q, 2)
    q.put_nowait_batch(["x", "y"])
    assert ray.get(taken, timeout=60) == ["x", "y"]
    q.shutdown()


def test_actor_options_and_shutdown(cluster):
    name = f"q-{uuid.uuid4().hex[:8]}"
    q = Queue(actor_options={"name": name, "num_cpus": 0})
    q.put("kept")
    same = ray.get_actor(name)
    assert ray.get(same.qsize.remote()) == 1
    q.shutdown()
    assert q.actor is None

    def gone():
        try:
            ray.get_actor(name)
            return False
        except ValueError:
            return True

    deadline = time.monotonic() + 30
    while not gone():
        assert time.monotonic() < deadline, "the queue's actor outlived shutdown()"
        time.sleep(0.05)
    q2 = Queue()
    a2 = q2.actor
    q2.shutdown(force=True)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a2.qsize.remote(), timeout=60)


def test_bad_options_are_errors(cluster):
    with pytest.raises((TypeError, ValueError)):
        Queue(actor_options={"no_such_option": 1})
