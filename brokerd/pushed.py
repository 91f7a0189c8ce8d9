"""Results an executor pushed straight to their owner: sent again if it dies.

::

    executor --OBJ (PUSH, ipc, workerd/results.py push_results)--> owner on its node
    executor --DONE (pushed=[True, ...])--> broker: note() the oids on the executor
    executor dies (killed: zray.kill, its actor's last handle gone, force cancel,
    a crash) --> executor_dead --> redeliver(): each noted result the owner still
    wants goes to it from the broker

Why: zmq queues a push in the executor's socket and sends it from its I/O thread.
A process SIGKILLed right after its DONE (the broker ends an actor whose handles
are all gone as soon as its last call is DONE) can die with the push unsent: the
broker, told it went, never sends it, and the owner's get() hangs. The owner takes
a second copy of a value it already has as a no-op, so sending again is safe.

Actor calls' results are not pushed any more (workerd/results.py ``pushable``): a
caller that got a pushed value could kill the actor before the broker had its DONE.

Only an executor's last 64 pushes are kept (``Executor.pushed``, a bounded deque): a
push older than that has long left its socket (it goes out within milliseconds).
"""

from __future__ import annotations

import logging

from brokerd.records import ObjState

log = logging.getLogger("zray.broker")

def note(ex, returns: list, pushed) -> None:
    """DONE from ``ex``: remember the results of ``returns`` that it pushed itself."""
    if ex is None:
        return
    recent = ex.pushed
    for oid, went in zip(returns, pushed, strict=False):
        if went:
            recent.append(oid)


def redeliver(objects, clients, ex) -> int:
    """``ex`` is dead: send its recent pushes again from here. Returns how many went."""
    recent = ex.pushed
    n = 0
    while recent:
        obj = objects.get(recent.popleft())
        if (obj is None or obj.released or obj.state != ObjState.READY
                or obj.owner not in clients):
            continue
        objects.deliver(obj.owner, obj, False)
        n += 1
    if n:
        log.debug("executor %s died: sent %d of its pushed results again", ex.cid.hex(), n)
    return n
