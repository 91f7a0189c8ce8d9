"""The broker's actor directory: creation, call queues, death and restarts."""

from __future__ import annotations

import logging

from brokerd.records import (
    Actor,
    ActorState,
    ExecState,
    Obj,
    Task,
    TaskState,
)
from zray import _protocol as P
from zray import exceptions
from zray._serialization import serialize_error

log = logging.getLogger("zray.broker")

ACTOR_EXIT_CODE = 13  # an executor exiting through exit_actor()


class ActorDirectory:
    """Mixin of Broker; see brokerd/broker.py for the state it shares."""

    # ----------------------------------------------------------------- actors
    def register_actor(self, task: Task, opts: dict):
        spec = task.spec
        actor_id = spec.actor_id
        actor = Actor(actor_id, task, spec.owner, spec.job,
                      name=opts.get("name") or "", namespace=opts.get("namespace") or "",
                      detached=opts.get("lifetime") == "detached",
                      max_restarts=opts.get("max_restarts", 0),
                      max_task_retries=opts.get("max_task_retries", 0),
                      handle_meta=opts.get("handle_meta", b""), class_name=spec.name)
        task.retries_left = 0
        self.actors[actor_id] = actor
        if actor.name:
            self.named[(actor.namespace, actor.name)] = actor_id

    def actor_created(self, task: Task, kind: int, frames):
        actor = self.actors.get(task.spec.actor_id)
        self.tasks.pop(task.task_id, None)
        task.state = TaskState.FINISHED
        if actor is None:
            return
        if kind == P.ERROR:
            actor.no_restart = True
            self.actor_dead(actor, "The actor's constructor raised:\n" + _err_text(frames))
            if actor.executor is not None:
                self.send(actor.executor.node.ident, P.encode(P.KillExec(actor.executor.cid)))
            return
        actor.state = ActorState.ALIVE
        for oid in task.returns:
            obj = self.objects.get(oid)
            if obj is not None:
                self.object_ready(obj, P.VALUE, frames)
        self.pump_actor(actor)

    def pump_actor(self, actor: Actor):
        if actor.state != ActorState.ALIVE:
            return
        ex = actor.executor
        q = actor.queue
        while q:
            task = q[0]
            if task.state == TaskState.WAITING_ARGS:
                break
            q.popleft()
            if task.state != TaskState.QUEUED:
                continue
            task.state = TaskState.RUNNING
            task.executor = ex
            actor.inflight[task.task_id] = task
            header, frames = self.exec_header(task, ex)
            self.send(P.inbox_ident(ex.cid), header, frames)

    def actor_process_died(self, actor: Actor, code: int, why: str):
        if actor.state == ActorState.DEAD:
            return
        actor.executor = None
        intentional = code == ACTOR_EXIT_CODE
        can_restart = (not actor.no_restart and not intentional
                       and (actor.max_restarts == -1 or actor.restarts < actor.max_restarts))
        if not can_restart:
            reason = ("The actor exited intentionally (exit_actor)." if intentional
                      else actor.death or f"The actor died: {why}.")
            self.actor_dead(actor, reason)
            return
        actor.restarts += 1
        actor.state = ActorState.RESTARTING
        log.warning("actor %s died (%s); restarting (%d/%s)", actor.class_name, why,
                    actor.restarts, actor.max_restarts)
        retry, fail = [], []
        for task in actor.inflight.values():
            if task.retries_left != 0:
                task.retries_left -= 1
                retry.append(task)
            else:
                fail.append(task)
        actor.inflight = {}
        for task in fail:
            self.fail_task(task, serialize_error(exceptions.ActorDiedError(
                f"The actor died while running {task.spec.name}: {why}", actor.actor_id.hex())))
        for task in reversed(retry):
            task.state = TaskState.QUEUED
            task.executor = None
            actor.queue.appendleft(task)
        create = actor.create
        create.state = TaskState.QUEUED
        create.executor = None
        self.tasks[create.task_id] = create
        for oid in create.returns:
            self.objects.setdefault(oid, Obj(oid, create.spec.owner))
        self.task_ready(create)

    def actor_dead(self, actor: Actor, reason: str):
        actor.state = ActorState.DEAD
        actor.death = reason
        err = serialize_error(exceptions.ActorDiedError(reason, actor.actor_id.hex()))
        calls = list(actor.inflight.values()) + list(actor.queue)
        actor.inflight = {}
        actor.queue.clear()
        for task in calls:
            if task.state not in (TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELLED):
                self.fail_task(task, err)
        create = actor.create
        if create.state in (TaskState.QUEUED, TaskState.WAITING_ARGS):
            create.state = TaskState.FAILED
            self.tasks.pop(create.task_id, None)
        if create.node is not None:
            self.release(create)
        if actor.name and self.named.get((actor.namespace, actor.name)) == actor.actor_id:
            del self.named[(actor.namespace, actor.name)]

    def kill_actor(self, actor: Actor, no_restart: bool, reason: str = "killed by zray.kill()"):
        if no_restart:
            actor.no_restart = True
            actor.death = f"The actor was {reason}." if not reason.startswith("The") else reason
        ex = actor.executor
        if ex is not None and ex.state != ExecState.DEAD:
            self.send(ex.node.ident, P.encode(P.KillExec(ex.cid)))
        if no_restart:
            # Dead from now on: calls made after kill() fail at once, not after the exit report.
            self.actor_dead(actor, actor.death)


def _err_text(frames) -> str:
    try:
        from zray._serialization import deserialize

        return str(deserialize(frames))
    except Exception:
        return "<unreadable error>"
