"""Results an executor pushed straight to their owner are not lost when it is killed.

An executor hands a broker-path call's result to an owner on its node itself (one
hop: workerd/results.py ``push_results``) and tells the broker so in its DONE; the
broker then does not send it. zmq sends that push later, from the executor's I/O
thread: an executor SIGKILLed right after its DONE (the broker ends an actor as soon
as its last handle is gone and its last call is DONE; ``zray.kill``) can die with
the push unsent, and the owner's ``get`` used to hang (a CI flake of
tests/test_dag.py::test_class_node_one_actor_per_execution, 1 result of 3 never
came). The broker now sends an executor's recent pushes again when it dies
(brokerd/pushed.py).

Since then actor calls' results are no longer pushed (workerd/results.py ``pushable``:
a caller that killed the actor after it got a pushed value could overtake the DONE,
tests/test_kill_after_result.py): these tests now check that the results of an
actor's calls still reach their owner when it ends or is killed right after them,
whichever way the results go; the redelivery still serves plain tasks' pushes.

That race needs a loaded machine to lose a push. These tests make it certain
instead: the actor's own code makes its executor report later pushes as sent
without sending them (exactly what a push lost with its process looks like to the
broker and the owner); everything else is the real cluster. zray-only: the direct
push is zray's own optimisation.
"""

import os

import pytest
from backend import BACKEND, local_cluster, ray
from conftest import poll_until

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(BACKEND != "zray", reason="zray's own push of results")]

cluster = local_cluster(num_cpus=2)


@ray.remote
class Lossy:
    def lose_later_pushes(self, _):
        """From now on this executor's pushes are 'sent' but never leave (this call's
        own result, the first push, still goes). Called with an ObjectRef argument: it
        goes through the broker (a direct call's result never goes through it)."""
        from zray import _runtime

        client = _runtime.executor.results.client
        real, count = client.push_direct, [0]

        def push_direct(owner, header, frames):
            count[0] += 1
            return real(owner, header, frames) if count[0] == 1 else True

        client.push_direct = push_direct
        return os.getpid()

    def double(self, x):
        return 2 * x


def _finished(ref) -> bool:
    from zray.util.state import get_task

    task = get_task(ref.task_id().hex())
    return task is not None and task["state"] == "FINISHED"


def test_last_result_of_an_actor_whose_handles_are_gone(cluster):
    actor = Lossy.remote()
    ray.get(actor.lose_later_pushes.remote(ray.put(None)), timeout=60)
    # an ObjectRef argument: the call goes through the broker (no direct call)
    ref = actor.double.remote(ray.put(21))
    del actor  # its last handle: the broker ends it once the call is DONE
    assert ray.get(ref, timeout=30) == 42


def test_result_of_a_finished_call_survives_kill(cluster):
    actor = Lossy.remote()
    before = actor.double.remote(ray.put(1))
    assert ray.get(before, timeout=60) == 2
    ray.get(actor.lose_later_pushes.remote(ray.put(None)), timeout=60)
    ref = actor.double.remote(ray.put(50))
    poll_until(lambda: _finished(ref), 60, what="the call FINISHED in the broker's books")
    ray.kill(actor)
    assert ray.get(ref, timeout=30) == 100
    assert ray.get(before, timeout=30) == 2  # a value sent twice is still the one value

