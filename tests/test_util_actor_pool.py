"""``ActorPool`` on real actors of a real local cluster (no mocks).

Runs on zray and, with ``ZRAY_TEST_BACKEND=ray``, on Ray 2.60 to check that the
semantics match. Sleeps inside actor methods are workload (to make one call slower
than another); waiting is done with get/wait and their timeouts.
"""

import importlib
import os
import time

import pytest
from backend import BACKEND, local_cluster, pickle_by_value, ray

from_util = importlib.import_module(BACKEND + ".util")
ActorPool = from_util.ActorPool

pickle_by_value(__name__)

pytestmark = pytest.mark.timeout(120)


cluster = local_cluster(num_cpus=4)


@ray.remote(num_cpus=0)
class Doubler:
    def double(self, v, delay=0.0):
        if delay:
            time.sleep(delay)
        if v == "boom":
            raise ValueError("bad value")
        return 2 * v

    def pid(self):
        return os.getpid()

    def die(self):
        os._exit(1)


def _started(*actors):
    """The actors, once each has started (so that which one answers first depends on
    the work given to it, not on how long a loaded machine took to start it)."""
    ray.get([a.pid.remote() for a in actors], timeout=60)
    return list(actors)


def test_import_path_is_rays():
    assert from_util.ActorPool is ActorPool
    assert ray.util.ActorPool is ActorPool


def test_map_keeps_order_and_uses_every_actor(cluster):
    actors = [Doubler.remote() for _ in range(2)]
    pool = ActorPool(actors)
    # the first value is the slowest: map still returns results in input order
    out = list(pool.map(lambda a, v: a.double.remote(v, 0.5 if v == 1 else 0), [1, 2, 3, 4]))
    assert out == [2, 4, 6, 8]
    pids = set(pool.map(lambda a, v: a.pid.remote(), range(6)))
    assert len(pids) == 2


def test_map_unordered_gives_every_result(cluster):
    pool = ActorPool(_started(Doubler.remote(), Doubler.remote()))
    out = list(pool.map_unordered(lambda a, v: a.double.remote(v, 1.0 if v == 1 else 0),
                                  [1, 2, 3, 4]))
    assert sorted(out) == [2, 4, 6, 8]
    assert out[-1] == 2  # the slow one finishes last (the other actor did the rest)


def test_submit_get_next_has_next(cluster):
    pool = ActorPool([Doubler.remote()])
    assert not pool.has_next()
    pool.submit(lambda a, v: a.double.remote(v), 1)
    pool.submit(lambda a, v: a.double.remote(v), 2)  # waits for the only actor
    assert pool.has_next()
    assert not pool.has_free()
    assert pool.get_next() == 2
    assert pool.has_next()
    assert pool.get_next() == 4
    assert not pool.has_next()
    assert pool.has_free()
    with pytest.raises(StopIteration, match="No more results to get"):
        pool.get_next()
    with pytest.raises(StopIteration):
        pool.get_next_unordered()


def test_get_next_timeout(cluster):
    pool = ActorPool([Doubler.remote()])
    pool.submit(lambda a, v: a.double.remote(v, 3.0), 5)
    with pytest.raises(TimeoutError, match="Timed out waiting for result"):
        pool.get_next(timeout=0.1)
    assert pool.has_next()  # still pending: not dropped
    assert pool.get_next(timeout=60) == 10


def test_get_next_ignore_if_timedout_skips_the_result(cluster):
    pool = ActorPool([Doubler.remote(), Doubler.remote()])
    pool.submit(lambda a, v: a.double.remote(v, 3.0), 1)
    pool.submit(lambda a, v: a.double.remote(v), 2)
    with pytest.raises(TimeoutError, match="has been ignored"):
        pool.get_next(timeout=0.05, ignore_if_timedout=True)
    assert pool.get_next(timeout=60) == 4
    assert not pool.has_next()


def test_get_next_unordered_timeout_and_order(cluster):
    pool = ActorPool(_started(Doubler.remote(), Doubler.remote()))
    pool.submit(lambda a, v: a.double.remote(v, 2.0), 1)
    pool.submit(lambda a, v: a.double.remote(v), 2)
    assert pool.get_next_unordered(timeout=60) == 4
    with pytest.raises(TimeoutError):
        pool.get_next_unordered(timeout=0.01)
    assert pool.get_next_unordered() == 2
    # an unordered read past a pending result: an ordered read is then refused
    pool.submit(lambda a, v: a.double.remote(v, 2.0), 3)
    pool.submit(lambda a, v: a.double.remote(v), 4)
    assert pool.get_next_unordered(timeout=60) == 8
    with pytest.raises(ValueError, match="not allowed to call get_next"):
        pool.get_next()
    assert pool.get_next_unordered() == 6


def test_get_next_after_an_in_order_unordered_read(cluster):
    pool = ActorPool(_started(Doubler.remote(), Doubler.remote()))
    pool.submit(lambda a, v: a.double.remote(v), 1)
    pool.submit(lambda a, v: a.double.remote(v, 1.0), 2)
    assert pool.get_next_unordered(timeout=60) == 2
    # the unordered read took the first submission: the next in order is still there
    assert pool.get_next() == 4


def test_errors_reach_the_caller_and_the_actor_stays(cluster):
    pool = ActorPool([Doubler.remote()])
    pool.submit(lambda a, v: a.double.remote(v), "boom")
    pool.submit(lambda a, v: a.double.remote(v), 7)
    with pytest.raises(ValueError, match="bad value"):
        pool.get_next()
    assert pool.get_next() == 14  # the actor served the next submission


def test_dead_actor_leaves_the_pool(cluster):
    a, b = Doubler.remote(), Doubler.remote()
    pool = ActorPool([a, b])
    pool.submit(lambda actor, v: actor.die.remote(), None)  # goes to b (popped last)
    with pytest.raises(ray.exceptions.RayActorError):
        pool.get_next(timeout=60)
    assert pool.pop_idle() == a
    assert pool.pop_idle() is None  # b died: it was not handed back


def test_pop_idle_and_push(cluster):
    a, b = Doubler.remote(), Doubler.remote()
    pool = ActorPool([a])
    assert pool.has_free()
    assert pool.pop_idle() == a
    assert not pool.has_free()
    assert pool.pop_idle() is None
    pool.submit(lambda actor, v: actor.double.remote(v), 21)  # no actor: waits
    assert not pool.has_next()
    pool.push(b)  # the waiting submission runs on b
    assert pool.has_next()
    assert pool.get_next(timeout=60) == 42
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(b)


def test_fn_returning_several_refs(cluster):
    pool = ActorPool([Doubler.remote()])
    pool.submit(lambda a, v: [a.double.remote(v), a.double.remote(v + 1)], 1)
    assert pool.get_next() == [2, 4]
    if BACKEND == "ray":  # Ray 2.60's get_next_unordered raises TypeError on a list
        return
    pool.submit(lambda a, v: [a.double.remote(v), a.double.remote(v + 1)], 5)
    assert pool.get_next_unordered(timeout=60) == [10, 12]


def test_map_drops_unread_results(cluster):
    pool = ActorPool([Doubler.remote()])
    pool.submit(lambda a, v: a.double.remote(v), 100)
    out = list(pool.map(lambda a, v: a.double.remote(v), [1, 2]))
    assert out == [2, 4]
