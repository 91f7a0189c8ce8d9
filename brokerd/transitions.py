"""Every state change of a task, actor or executor goes through ``Transitions.move``.

::

    engine / actor directory --move(record, new_state, reason)--> legal? --yes--> record.state = new
                                                                    |             event log (bounded)
                                                                    +--no---> counted, logged, not applied

The tables below list the legal moves, as Dask's scheduler lists its
transitions: a move that is not in them is a bug somewhere in the broker, and
applying it anyway would hide that bug behind a corrupt record. The event log
(time, record kind, id, from, to, reason, node, name) is what the ``task_events``
query, the state API (``brokerd/state.py``), the timeline, the dashboard and the tests
read. It is bounded: ``dropped`` counts the events that fell off its old end. Beside
it, ``specs`` keeps the spec of each task seen (bounded too, oldest tasks forgotten
first), so that the state API can still say what a finished task was.

Owns: the move tables, the event log and the illegal-move counter. Touches
only the ``state`` field of the records it is given.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Optional

import msgpack

from brokerd.records import Actor, ActorState, ExecState, Executor, Task, TaskState
from zray import _protocol as P

log = logging.getLogger("zray.broker")

T, A, E = TaskState, ActorState, ExecState

TASK_MOVES = {
    T.WAITING_ARGS: {T.QUEUED, T.FAILED, T.CANCELLED},
    # QUEUED -> WAITING_ARGS: an argument was lost with its node and is being rebuilt.
    T.QUEUED: {T.RUNNING, T.ASSIGNED, T.FAILED, T.CANCELLED, T.WAITING_ARGS},
    # ASSIGNED: sent ahead to a busy executor; it starts when that executor is free.
    T.ASSIGNED: {T.RUNNING, T.QUEUED, T.FAILED, T.CANCELLED},
    # RUNNING -> QUEUED: a retry (error with retries left, executor or node death).
    T.RUNNING: {T.FINISHED, T.FAILED, T.CANCELLED, T.QUEUED},
    # FINISHED -> QUEUED / WAITING_ARGS: run again to rebuild a lost result (lineage).
    T.FINISHED: {T.QUEUED, T.WAITING_ARGS},
    T.FAILED: set(),
    T.CANCELLED: set(),
}
# An actor's creation task runs again when the actor restarts.
CREATE_MOVES = {**TASK_MOVES, T.FINISHED: {T.QUEUED}}

ACTOR_MOVES = {
    A.PENDING: {A.ALIVE, A.RESTARTING, A.DEAD},
    A.ALIVE: {A.RESTARTING, A.DEAD},
    # RESTARTING -> RESTARTING: the new process died too, before its constructor returned.
    A.RESTARTING: {A.ALIVE, A.RESTARTING, A.DEAD},
    A.DEAD: set(),
}

EXEC_MOVES = {
    E.STARTING: {E.IDLE, E.ACTOR, E.DEAD},
    E.IDLE: {E.BUSY, E.ACTOR, E.DEAD},
    E.BUSY: {E.IDLE, E.DEAD},
    E.ACTOR: {E.DEAD},
    E.DEAD: set(),
}

def _log_len() -> int:
    """ZRAY_EVENT_LOG_LEN: how many events the log keeps (default 100,000)."""
    text = os.environ.get("ZRAY_EVENT_LOG_LEN") or "100000"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"ZRAY_EVENT_LOG_LEN must be a positive integer, got {text!r}")
    return n


EVENT_LOG_LEN = _log_len()


class SpecLog(dict):
    """task id -> its TaskSpec, kept as the packed bytes it came in where there are any
    (one untracked object per task instead of five containers the garbage collector
    walks on every pass: 200,000 of them in a busy broker); ``get`` unpacks."""

    def get(self, rid, default=None):
        v = dict.get(self, rid, default)
        if type(v) is bytes:
            return P.TaskSpec._make(msgpack.unpackb(v, raw=False, strict_map_key=False))
        return v


def _fast(table: dict) -> dict:
    """The table as {state name: tuple of next states}: looked up by the member's plain
    ``_value_`` string and searched by identity (hashing an Enum member, or reading its
    ``.value`` property, runs Python code: it was most of a move's cost)."""
    return {old._value_: tuple(new) for old, new in table.items()}


_TASK, _CREATE, _ACTOR, _EXEC = (_fast(t) for t in (TASK_MOVES, CREATE_MOVES, ACTOR_MOVES,
                                                      EXEC_MOVES))


class Transitions:
    def __init__(self, maxlen: int = EVENT_LOG_LEN):
        # (time, kind, id, from, to, reason, node id, name): kind "task" | "actor" |
        # "executor"; name: a task's or actor's name, for the timeline
        self.events: deque = deque(maxlen=maxlen)
        # task id -> TaskSpec, in the order tasks were first seen; at 2 * maxlen the older
        # half goes (the log holds at most maxlen tasks' events)
        self.specs: SpecLog = SpecLog()
        self.spec_cap = 2 * maxlen
        self.appended = 0  # events ever logged: appended - len(events) fell off the log
        self.illegal = 0
        self.now = time.time()  # set by the broker once per loop turn (time.time per move cost)

    def move(self, rec, new, reason: str = "", node_id: Optional[bytes] = None) -> bool:
        """Set ``rec.state = new`` if the move is legal and log it; else count it."""
        old = rec.state._value_
        cls = type(rec)
        if cls is Task:
            table, kind, rid = (_CREATE if rec.kind == P.ACTOR_CREATE else _TASK), "task", rec.task_id
            spec = rec.spec
            name = spec.name
            specs = self.specs
            specs[rid] = rec.spec_bytes or spec
            if len(specs) > self.spec_cap:
                self._forget_specs()
            if node_id is None:
                if rec.node is not None:
                    node_id = rec.node.node_id
                elif rec.actor is not None and rec.actor.executor is not None:  # a call
                    node_id = rec.actor.executor.node.node_id
        elif cls is Executor:
            table, kind, rid, name = _EXEC, "executor", rec.cid, ""
            node_id = rec.node.node_id
        elif cls is Actor:
            table, kind, rid, name = _ACTOR, "actor", rec.actor_id, rec.class_name
        else:
            raise TypeError(f"no state machine for {cls.__name__}")
        if new not in table[old]:
            self.illegal += 1
            log.error("illegal %s transition %s -> %s for %s (%s): not applied",
                      kind, old, new._value_, rid.hex(), reason)
            return False
        rec.state = new
        self.events.append((self.now, kind, rid, old, new._value_, reason, node_id, name))
        self.appended += 1
        return True

    def _forget_specs(self) -> None:
        specs = self.specs
        keep = list(specs.items())[len(specs) - self.spec_cap // 2:]
        self.specs = SpecLog(keep)

    @property
    def dropped(self) -> int:
        """Events that fell off the old end of the bounded log."""
        return self.appended - len(self.events)

    def history(self, rid: bytes) -> list:
        """[(from, to, reason), ...] of one record, oldest first (while still in the log)."""
        return [(e[3], e[4], e[5]) for e in self.events if e[2] == rid]

    def task_moves(self) -> list:
        """[[time, task id, name, from, to, node id], ...] of every task still in the log."""
        return [[e[0], e[2], e[7], e[3], e[4], e[6]] for e in self.events if e[1] == "task"]
