"""The actor directory: actors, their names, their call queues, death and restarts.

::

    SUBMIT(ACTOR_CREATE) --register()--> Actor PENDING --created()--> ALIVE
    SUBMIT(ACTOR_CALL) --> actor.queue --next_calls()--> calls the engine sends, in order
    its process died --process_died()--> RESTARTING (calls retried or failed) or DEAD
    kill() / its owner gone --> DEAD: every queued and running call fails with ActorDiedError

Owns: ``actors``, ``named`` and every field of Actor records; actor state
changes go through ``Transitions``. Never moves a task: it returns the calls
to send, to retry or to fail, and the engine moves them. Sends: KILL_EXEC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from brokerd.outbox import Outbox
from brokerd.records import Actor, ActorState, ExecState, Task, TaskState
from brokerd.transitions import Transitions
from zray import _protocol as P

log = logging.getLogger("zray.broker")

_OPEN = (TaskState.WAITING_ARGS, TaskState.QUEUED, TaskState.ASSIGNED, TaskState.RUNNING)


@dataclass
class Death:
    """What an actor's death or restart means for its calls."""

    fail: list = field(default_factory=list)  # calls to fail with ActorDiedError(reason)
    retry: list = field(default_factory=list)  # calls to queue again, in order
    restart: bool = False  # queue the creation task again
    dead: bool = False  # gone for good: its creation task is settled too
    reason: str = ""  # why it died (ActorDiedError's text)


class ActorDirectory:
    def __init__(self, out: Outbox, moves: Transitions):
        self.out = out
        self.moves = moves
        self.actors: dict[bytes, Actor] = {}
        self.named: dict[tuple, bytes] = {}
        self.recovery = None  # brokerd.restart.Recovery: actors are durable records
        self.routes = None  # brokerd.routes.ActorRoutes: callers told of moves and deaths

    def get(self, actor_id: bytes):
        if type(actor_id) is not bytes:  # from a REQ's args: any msgpack value
            return None
        return self.actors.get(actor_id)

    def register(self, task: Task) -> Actor:
        spec = task.spec
        opts = spec.options
        actor = Actor(spec.actor_id, task, spec.owner, spec.job,
                      name=str(opts.get("name") or ""), namespace=str(opts.get("namespace") or ""),
                      detached=opts.get("lifetime") == "detached",
                      max_restarts=_int(opts.get("max_restarts")),
                      max_task_retries=_int(opts.get("max_task_retries")),
                      handle_meta=opts.get("handle_meta", b""), class_name=spec.name)
        self.actors[actor.actor_id] = actor
        if actor.name:
            self.named[(actor.namespace, actor.name)] = actor.actor_id
        if self.recovery is not None:
            self.recovery.actor_saved(actor)
        return actor

    def lookup(self, namespace: str, name: str):
        actor_id = self.named.get((namespace, name))
        return None if actor_id is None else self.actors.get(actor_id)

    def created(self, actor: Actor) -> None:
        self.moves.move(actor, ActorState.ALIVE, "constructor returned")
        if self.routes is not None:
            self.routes.changed(actor)
        if self.recovery is not None:
            self.recovery.actor_saved(actor)  # with the process that hosts it

    def next_calls(self, actor: Actor) -> list:
        """Calls to send to the actor now, in submission order (a call waiting for its
        arguments holds back the ones behind it)."""
        if actor.state != ActorState.ALIVE:
            return []
        q = actor.queue
        out = []
        while q:
            task = q[0]
            if task.state == TaskState.WAITING_ARGS:
                break
            q.popleft()
            if task.state == TaskState.QUEUED:
                actor.inflight[task.task_id] = task
                out.append(task)
        return out

    def process_died(self, actor: Actor, code: int, why: str) -> Death:
        if actor.state == ActorState.DEAD:
            return Death()
        actor.executor = None
        intentional = code == P.ACTOR_EXIT_CODE
        can_restart = (not actor.no_restart and not intentional
                       and (actor.max_restarts == -1 or actor.restarts < actor.max_restarts))
        if not can_restart:
            reason = ("The actor exited intentionally (exit_actor)." if intentional
                      else actor.death or f"The actor died: {why}.")
            return self.dead(actor, reason)
        actor.restarts += 1
        self.moves.move(actor, ActorState.RESTARTING, why)
        if self.routes is not None:
            self.routes.changed(actor, why)
        if self.recovery is not None:
            self.recovery.actor_saved(actor)
        log.warning("actor %s died (%s); restarting (%d/%s)", actor.class_name, why,
                    actor.restarts, actor.max_restarts)
        d = Death(restart=True, reason=why)
        for task in actor.inflight.values():
            if task.retries_left != 0:
                task.retries_left -= 1
                d.retry.append(task)
            else:
                d.fail.append(task)
        actor.inflight = {}
        for task in reversed(d.retry):
            actor.queue.appendleft(task)
        return d

    def dead(self, actor: Actor, reason: str) -> Death:
        """The actor is gone for good: its calls fail; its name is free again."""
        if actor.state == ActorState.DEAD:
            return Death()
        self.moves.move(actor, ActorState.DEAD, reason)
        actor.death = reason
        if self.routes is not None:
            self.routes.changed(actor)
        if self.recovery is not None:
            self.recovery.actor_gone(actor)
        calls = [t for t in list(actor.inflight.values()) + list(actor.queue)
                 if t.state in _OPEN]
        actor.inflight = {}
        actor.queue.clear()
        if actor.name and self.named.get((actor.namespace, actor.name)) == actor.actor_id:
            del self.named[(actor.namespace, actor.name)]
        return Death(fail=calls, dead=True, reason=reason)

    def kill(self, actor: Actor, no_restart: bool, reason: str = "killed by zray.kill()") -> Death:
        if no_restart:
            actor.no_restart = True
            actor.death = reason if reason.startswith("The") else f"The actor was {reason}."
        ex = actor.executor
        if ex is not None and ex.state != ExecState.DEAD:
            self.out.send(ex.node.ident, P.encode(P.KillExec(ex.cid)))
        if no_restart:
            # Dead from now on: calls made after kill() fail at once, not after the exit report.
            return self.dead(actor, actor.death)
        return Death()


def _int(v) -> int:
    return v if type(v) is int else 0
