"""The route directory for direct actor calls: where each actor's executor takes calls.

::

    actor's executor --REQ actor_listen {address, host, ordered, tcp_address?}--> listen()
                                         (before the creation's DONE, on the same socket)
    caller --REQ actor_route {actor_id}--> ask(): ROUTE now, and the caller is remembered
    caller --REQ direct_cancel {actor_id, task_id, force}--> INTERRUPT to the executor
    actor ALIVE / RESTARTING / DEAD (brokerd/actors.py) --changed()--> ROUTE to every caller
                                                                      that asked
    actor's executor --REQ direct_stats {calls, failed, events, dropped}--> counts, and
                       each call's RUNNING/FINISHED|FAILED into the event log (state API)

Owns: ``listening`` (actor id -> (executor cid, address, host, ordered, tcp address:
"" unless callers on other hosts can reach it, zray/_xhost.py)), ``askers``
(actor id -> cids) and the direct-call counters. The calls themselves never pass
through the broker (zray/_direct.py, workerd/direct.py): it only answers where.
Sends: ROUTE.
"""

from __future__ import annotations

import logging

from brokerd.outbox import Outbox
from brokerd.records import ActorState
from zray import _protocol as P

log = logging.getLogger("zray.broker")

_STATES = {ActorState.ALIVE: "alive", ActorState.RESTARTING: "restarting",
           ActorState.DEAD: "dead"}


class ActorRoutes:
    def __init__(self, out: Outbox, engine):
        self.out = out
        self.engine = engine
        self.listening: dict = {}  # actor id -> (executor cid, address, host, ordered, tcp)
        self.askers: dict = {}  # actor id -> {cid}: told again on every change
        self.calls: dict = {}  # actor id -> direct calls its executor reported run
        self.failed: dict = {}  # actor id -> ... of which raised
        self.total_calls = 0
        self.direct_tasks: dict = {}  # task id -> actor id: direct calls in the event log

    def listen(self, cid: bytes, args: dict) -> None:
        """An actor's executor says where it takes direct calls."""
        ex = self.engine.executors.get(cid)
        actor = ex.actor if ex is not None else None
        if actor is None:
            raise ValueError("actor_listen: only the executor hosting an actor may say where")
        address, host, ordered = args.get("address"), args.get("host"), args.get("ordered")
        tcp = args.get("tcp_address", "")  # callers on other hosts: zray/_xhost.py
        if (type(address) is not str or not address.startswith("ipc://") or len(address) > 200
                or type(host) is not str or len(host) > 255 or type(ordered) is not bool
                or type(tcp) is not str or (tcp and not P._is_tcp_endpoint(tcp))
                or len(tcp) > 200 or set(args) - {"address", "host", "ordered", "tcp_address"}):
            raise ValueError("actor_listen: {address: ipc://..., host: str, ordered: bool, "
                             "tcp_address: tcp://host:port or absent}")
        self.listening[actor.actor_id] = (cid, address, host, ordered, tcp)

    def ask(self, cid: bytes, actor_id) -> None:
        """A caller's first use of a handle: tell it where the actor is, and of changes."""
        if type(actor_id) is not bytes:
            raise ValueError("actor_route needs an actor_id (bytes)")
        actor = self.engine.actors.get(actor_id)
        if actor is not None and actor.state != ActorState.DEAD:
            askers = self.askers.setdefault(actor_id, set())
            if len(askers) < 100_000:
                askers.add(cid)
        self.out.send(P.inbox_ident(cid), P.encode(self.route(actor_id, actor)))

    def route(self, actor_id: bytes, actor) -> P.Route:
        if actor is None:
            return P.Route(actor_id, "dead", "", "", False, 0,
                           "The actor is not known to the cluster.")
        state = _STATES.get(actor.state, "pending")
        where = self.listening.get(actor_id)
        ex = actor.executor
        if state == "alive" and where is not None and ex is not None and ex.cid == where[0]:
            return P.Route(actor_id, state, where[1], where[2], where[3], actor.restarts, "",
                           where[4])
        if state == "alive":
            state = "pending"  # alive, but takes no direct calls: the broker path only
        return P.Route(actor_id, state, "", "", False, actor.restarts, actor.death)

    def changed(self, actor, reason: str = "") -> None:
        """The actor moved (ALIVE again, RESTARTING) or died: tell every caller that asked."""
        actor_id = actor.actor_id
        if actor.state != ActorState.ALIVE:
            self.listening.pop(actor_id, None)
        askers = self.askers.get(actor_id)
        if actor.state == ActorState.DEAD:
            self.askers.pop(actor_id, None)
            self.calls.pop(actor_id, None)
            self.failed.pop(actor_id, None)
        if not askers:
            return
        route = self.route(actor_id, actor)
        if reason and not route.reason:
            route = route._replace(reason=reason)
        header = P.encode(route)
        clients = self.engine.clients
        for cid in list(askers):
            if cid in clients:
                self.out.send(P.inbox_ident(cid), header)
            else:
                askers.discard(cid)

    def stats(self, cid: bytes, args: dict) -> None:
        """An actor's executor reports the direct calls it ran since its last report."""
        ex = self.engine.executors.get(cid)
        actor = ex.actor if ex is not None else None
        calls, failed = args.get("calls"), args.get("failed")
        if actor is None or type(calls) is not int or type(failed) is not int \
                or not 0 <= failed <= calls < 1 << 40:
            raise ValueError("direct_stats: {calls: int, failed: int} from an actor's executor")
        aid = actor.actor_id
        self._events(ex, aid, args.get("events", []), args.get("dropped", 0))  # (checks first)
        self.calls[aid] = self.calls.get(aid, 0) + calls
        self.failed[aid] = self.failed.get(aid, 0) + failed
        self.total_calls += calls

    def _events(self, ex, actor_id: bytes, events, dropped) -> None:
        """The calls' task events, into the broker's event log (state API, timeline):
        RUNNING at their start, FINISHED or FAILED at their end, as the broker's own
        calls have. Each one is checked; the report's bad ones are dropped."""
        if type(events) is not list or len(events) > 5000 or type(dropped) is not int \
                or dropped < 0:
            raise ValueError("direct_stats: events must be a list of at most 5000, "
                             "dropped an int")
        moves = self.engine.moves
        log_, node_id = moves.events, ex.node.node_id
        for e in events:  # all checked before any is logged: a bad report changes nothing
            if (type(e) is not list or len(e) != 5 or type(e[0]) is not bytes
                    or len(e[0]) != P.TASK_ID_LEN or type(e[1]) is not str or len(e[1]) > 512
                    or type(e[2]) is not float or type(e[3]) is not float
                    or type(e[4]) is not bool):
                raise ValueError("direct_stats: an event is [task id, name, start, end, failed]")
        for task_id, name, t0, t1, failed in events:
            log_.append((t0, "task", task_id, "queued", "running", "", node_id, name))
            log_.append((t1, "task", task_id, "running", "failed" if failed else "finished",
                         "the method raised" if failed else "", node_id, name))
            self.direct_tasks[task_id] = actor_id
        moves.appended += 2 * (len(events) + dropped)
        if len(self.direct_tasks) > 200_000:  # (as bounded as the event log)
            for k in list(self.direct_tasks)[:100_000]:
                del self.direct_tasks[k]

    def cancel(self, cid: bytes, args: dict) -> None:
        """ray.cancel of a direct call: interrupt it on the actor's executor, as the
        broker does for its own calls. Only the call's submitter may (its task id
        starts with the submitter's cid)."""
        task_id, force = args.get("task_id"), args.get("force")
        if (type(task_id) is not bytes or len(task_id) != P.TASK_ID_LEN
                or task_id[:P.ID_LEN] != cid or type(force) is not bool):
            raise ValueError("direct_cancel: {actor_id, task_id: a call of yours, force: bool}")
        actor = self.engine.actors.get(args.get("actor_id"))
        ex = actor.executor if actor is not None else None
        if ex is not None:
            self.out.send(P.inbox_ident(ex.cid), P.encode(P.Interrupt(task_id, force)))

    def report(self, actor_id=None) -> dict:
        if actor_id is not None:
            return {"calls": self.calls.get(actor_id, 0), "failed": self.failed.get(actor_id, 0)}
        return {"calls": self.total_calls, "actors_listening": len(self.listening)}
