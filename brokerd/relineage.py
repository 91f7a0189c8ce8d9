"""Lineage across a broker restart: the owner hands back the finished tasks of its stored
results, so a restarted broker can rebuild them if their node dies.

::

    owner's replay (zray/_reconnect.py), after the broker restarted:
        PUT oid, node_id            a stored result, by location (no lineage: a put object)
        LINEAGE spec + arg frames   the finished task that returned it --adopt()--> Task
                                    FINISHED, its arguments pinned, Obj.lineage = task
    node dies --> ObjectDirectory.node_lost --> engine._rebuild: runs the task again
                                    (as for a result made since the restart)

A broker keeps the lineage of the results made since it started (brokerd/engine.py
``_keep_lineage``); the object directory does not survive a restart, so the results
made before it come back from their owners as PUTs by location. Without their
lineage a node death after the restart (one that died while the broker was down and
is never back, say) loses them for good: a plain ObjectLostError although the owner
still holds the task (its replay log keeps it while a result lives in a store).

``adopt`` takes a LINEAGE only from the task's owner, only for a plain task whose
returns the owner put again by location and that has no lineage yet; what it cannot
keep (no retries, a placement group, an argument the restarted broker does not know,
the lineage budget spent) is written down in ``Obj.no_lineage`` so that the error a
get sees later says why. ``rebuild_skip_reason`` says why ``_rebuild`` passes over a
lost object.

Owns nothing: it builds a Task record and sets lineage fields of Obj records, through
the engine's object directory and its lineage budget.
"""

from __future__ import annotations

import logging

from brokerd.pgroups import pg_strategy
from brokerd.placement import check_strategy_options, strategy_key
from brokerd.records import ObjState, Task, TaskState
from zray import _protocol as P

log = logging.getLogger("zray.broker")

_PUT_INDEX = (0).to_bytes(4, "little")  # the index part of a put object's id


def rebuild_skip_reason(obj, task) -> str:
    """Why a lost object is not rebuilt by ``engine._rebuild`` ("" for a put object,
    which has no lineage in Ray either: ObjectLostError)."""
    if task is None:
        if obj.oid[P.TASK_ID_LEN:] == _PUT_INDEX:
            return ""
        return ("the broker keeps no task that can make it again (a streamed item, or a "
                "result made before a broker restart whose owner did not hand its task back)")
    name = task.spec.name
    if obj.state != ObjState.READY:
        return f"it was not ready when its node died (task {name} is {task.state.value})"
    return f"task {name} was not finished when its result was lost (it is {task.state.value})"


def adopt(engine, cid: bytes, m, frames) -> None:
    """LINEAGE from client ``cid``: keep the finished task ``m.spec`` as the lineage of
    its returns that the client put again by location after a broker restart."""
    spec = m.spec
    if spec.owner != cid or spec.task_id[:P.ID_LEN] != cid:
        raise P.ProtocolError("LINEAGE of a task the sender does not own")
    if spec.kind != P.TASK or spec.task_id in engine.tasks:
        return  # (an actor's results are not rebuilt; a task running here has its own)
    objects = engine.objects
    kept = []
    for oid in spec.return_ids():
        obj = objects.get(oid)
        if (obj is not None and obj.owner == cid and obj.lineage is None and obj.locations
                and obj.state == ObjState.READY and obj.kind == P.VALUE and not obj.lost):
            kept.append(obj)
    if not kept:
        return
    opts = spec.options
    why = ""
    retries = opts.get("max_retries")
    retries = retries if type(retries) is int else 0
    if retries == 0:
        why = f"task {spec.name} is not retryable (max_retries=0)"
    elif pg_strategy(opts) is not None:
        why = f"task {spec.name} ran in a placement group, whose lineage a broker restart drops"
    if not why:
        check_strategy_options(opts)  # (a ProtocolError: dropped and counted)
        resources = spec.resources
        task = Task(spec.task_id, P.TASK, spec, list(frames), resources, resources,
                    (tuple(sorted(resources.items())), strategy_key(opts)), spec.return_ids(),
                    state=TaskState.FINISHED, retries_left=retries)
        why = _pin_arguments(engine, cid, task)
        if not why and not objects.keep_lineage(task):
            why = "the lineage kept by the broker was at its limit (ZRAY_MAX_LINEAGE_BYTES)"
        if why:
            for oid in task.deps + task.holds:
                objects.unpin(oid)
        else:
            for obj in kept:
                obj.lineage = task
                task.lineage += 1
            log.debug("kept the lineage of %s handed back by its owner", spec.name)
            return
    for obj in kept:
        obj.no_lineage = why


def _pin_arguments(engine, cid: bytes, task: Task) -> str:
    """Pin the task's argument objects as a kept lineage does; "" or why it cannot."""
    objects, access = engine.objects, engine.access
    for _, oid in task.spec.deps:
        obj = objects.get(oid)
        if obj is None or not access.may_use(cid, oid):
            return (f"its task {task.spec.name}'s argument {oid.hex()} did not survive the "
                    f"broker restart")
        obj.pins += 1
        task.deps.append(oid)
    for oid in task.spec.nested:
        if access.may_use(cid, oid) and objects.pin(oid):
            task.holds.append(oid)
    return ""
