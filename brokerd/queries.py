"""REQ handlers: cluster information for the API and the CLI (status, memory, actors,
task events). Read-only except ``kill_actor``, which asks the engine.

Owns nothing. Reads the engine and its directories.
"""

from __future__ import annotations

import logging
import time

from brokerd.engine import TaskEngine
from brokerd.records import ActorState, ObjState, TaskState
from zray import _protocol as P

log = logging.getLogger("zray.broker")

_OPEN = (TaskState.WAITING_ARGS, TaskState.QUEUED, TaskState.ASSIGNED, TaskState.RUNNING)


class Queries:
    def __init__(self, engine: TaskEngine, address: str, started: float, stats):
        self.engine = engine
        self.address = address
        self.started = started
        self.stats = stats  # () -> {"dropped": n, ...} from the broker loop

    def answer(self, cid: bytes, m: P.Req) -> P.Reply:
        handler = getattr(self, "req_" + m.op, None)
        if handler is None:
            return P.Reply(m.req_id, False, f"unknown request {m.op!r:.40}")
        args = m.args if isinstance(m.args, dict) else {}
        try:
            return P.Reply(m.req_id, True, handler(cid, args))
        except Exception as e:
            return P.Reply(m.req_id, False, f"{type(e).__name__}: {e}")

    def req_cluster_resources(self, cid, args):
        return self.engine.nodes.totals()

    def req_available_resources(self, cid, args):
        return self.engine.nodes.totals(avail=True)

    def req_nodes(self, cid, args):
        return [{
            "NodeID": n.node_id.hex(), "Alive": n.alive and not n.reconnecting,
            "NodeManagerHostname": n.hostname,
            "NodeManagerAddress": n.address or n.hostname, "Resources": P.from_units(n.total),
            "Available": P.from_units(n.avail), "Labels": n.labels, "Pid": n.pid,
            "Executors": len(n.executors), "Running": n.running, "StoreLimit": n.store_limit,
        } for n in self.engine.nodes.nodes.values()]

    def req_status(self, cid, args):
        e = self.engine
        states: dict = {}
        for t in e.tasks.values():
            states[t.state.value] = states.get(t.state.value, 0) + 1
        objects = e.objects.objects
        return {
            "address": self.address, "uptime_s": time.time() - self.started,
            "nodes": self.req_nodes(cid, args), "tasks": states,
            "actors": sum(1 for a in e.actors.actors.values() if a.state != ActorState.DEAD),
            "objects": len(objects),
            "object_bytes": sum(o.size for o in objects.values()),
            "clients": sum(1 for c in e.clients.values() if c.kind == "driver"),
            "illegal_transitions": e.moves.illegal,
            **self.stats(),
        }

    def req_job_pending(self, cid, args):
        e = self.engine
        job = e.clients[cid].job_id if cid in e.clients else b""
        return sum(1 for t in e.tasks.values()
                   if t.spec.job == job and t.kind != P.ACTOR_CREATE and t.state in _OPEN)

    def req_register_job(self, cid, args):
        ns = args.get("namespace")
        if not isinstance(ns, str) or len(ns) > 1024:
            raise ValueError("namespace must be a string")
        self.engine.register_job(cid, ns, args.get("log_to_driver") is not False)
        return True

    def req_pending_calls(self, cid, args):
        """How many of the caller's calls on an actor are unfinished (max_pending_calls)."""
        actor_id = args.get("actor_id")
        if not isinstance(actor_id, bytes):
            raise ValueError("pending_calls needs an actor_id (bytes)")
        return self.engine.pending_calls(cid, actor_id)

    def req_job_info(self, cid, args):
        """A job's namespace, for its tasks and actors (the caller must belong to it)."""
        job = args.get("job")
        c = self.engine.clients.get(cid)
        if c is None or (c.kind != "executor" and c.job_id != job):
            raise PermissionError("a client may only ask about its own job")
        info = self.engine.jobs.get(job) if isinstance(job, bytes) else None
        return {"namespace": info["namespace"]} if info else None

    def req_task_events(self, cid, args):
        """The transitions of one task, actor or executor (by id), oldest first, while
        they are still in the bounded event log: [[from, to, reason], ...]."""
        rid = args.get("id")
        if not isinstance(rid, bytes):
            raise ValueError("task_events needs an id (bytes)")
        return [list(e) for e in self.engine.moves.history(rid)]

    def req_timeline(self, cid, args):
        """Every task transition still in the event log, oldest first, for
        zray.timeline(): [[time, task id, name, from, to, node id], ...]."""
        return self.engine.moves.task_moves()

    def req_memory(self, cid, args):
        """Per-node store use and the largest objects, for `zray memory`."""
        e = self.engine
        top = max(0, min(int(args.get("top", 10)), 10000))
        objects = e.objects.objects
        inline = [o for o in objects.values() if not o.locations and o.state == ObjState.READY]
        nodes = []
        for n in e.nodes.nodes.values():
            nodes.append({"node_id": n.node_id.hex(),
                          "objects": sum(1 for o in objects.values() if n.node_id in o.locations),
                          "bytes_in_memory": n.store_used, "bytes_spilled": n.spilled,
                          "store_limit": n.store_limit})
        largest = sorted(objects.values(), key=lambda o: o.size, reverse=True)[:top]
        owners = e.clients
        return {
            "nodes": nodes,
            "inline_objects": len(inline),
            "inline_bytes": sum(o.size for o in inline),
            "largest": [{"object_id": o.oid.hex(), "size": o.size, "owner": o.owner.hex(),
                         "owner_kind": owners[o.owner].kind if o.owner in owners else "gone",
                         "owner_pid": owners[o.owner].pid if o.owner in owners else 0,
                         "nodes": [k.hex() for k in o.locations], "state": o.state.value}
                        for o in largest],
        }

    def req_get_actor(self, cid, args):
        a = self.engine.actors.lookup(str(args.get("namespace") or ""), str(args.get("name")))
        if a is None:
            return None
        return {"actor_id": a.actor_id, "handle_meta": a.handle_meta,
                "handle_owner": b"" if a.detached else a.owner}

    def req_kill_actor(self, cid, args):
        actor = self.engine.actors.get(args.get("actor_id"))
        if actor is None:
            raise ValueError("unknown actor")
        self.engine.kill_actor(actor, bool(args.get("no_restart", True)))
        return True

    def req_list_named_actors(self, cid, args):
        all_ns = args.get("all_namespaces")
        ns = args.get("namespace") or ""
        return [{"name": n, "namespace": s} if all_ns else n
                for (s, n) in self.engine.actors.named if all_ns or s == ns]

    def req_actor_state(self, cid, args):
        a = self.engine.actors.get(args.get("actor_id"))
        return None if a is None else {"state": a.state.value, "restarts": a.restarts,
                                       "death": a.death}
