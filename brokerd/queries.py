"""REQ handlers: cluster info for the API and the CLI (status, memory, actors)."""

from __future__ import annotations

import logging
import time

from brokerd.records import (
    ActorState,
    ObjState,
    TaskState,
)
from zray import _protocol as P

log = logging.getLogger("zray.broker")


class Queries:
    """Mixin of Broker; see brokerd/broker.py for the state it shares."""

    # --------------------------------------------------------------- queries
    def on_req(self, cid, m: P.Req, frames):
        handler = getattr(self, "req_" + m.op, None)
        if handler is None:
            result, ok = f"unknown request {m.op!r:.40}", False
        else:
            try:
                result = handler(cid, m.args)
                ok = True
            except Exception as e:
                result, ok = f"{type(e).__name__}: {e}", False
        self.send(P.inbox_ident(cid), P.encode(P.Reply(m.req_id, ok, result)))

    def req_cluster_resources(self, cid, args):
        out: dict = {}
        for n in self.nodes.values():
            for r, u in n.total.items():
                out[r] = out.get(r, 0) + u
        return P.from_units(out)

    def req_available_resources(self, cid, args):
        out: dict = {}
        for n in self.nodes.values():
            for r, u in n.avail.items():
                if u > 0:
                    out[r] = out.get(r, 0) + u
        return P.from_units(out)

    def req_nodes(self, cid, args):
        return [{
            "NodeID": n.node_id.hex(), "Alive": n.alive, "NodeManagerHostname": n.hostname,
            "NodeManagerAddress": n.address or n.hostname, "Resources": P.from_units(n.total),
            "Available": P.from_units(n.avail), "Labels": n.labels, "Pid": n.pid,
            "Executors": len(n.executors), "Running": n.running, "StoreLimit": n.store_limit,
        } for n in self.nodes.values()]

    def req_status(self, cid, args):
        states: dict = {}
        for t in self.tasks.values():
            states[t.state.value] = states.get(t.state.value, 0) + 1
        return {
            "address": self.address, "uptime_s": time.time() - self.started,
            "nodes": self.req_nodes(cid, args), "tasks": states,
            "actors": sum(1 for a in self.actors.values() if a.state != ActorState.DEAD),
            "objects": len(self.objects),
            "object_bytes": sum(o.size for o in self.objects.values()),
            "clients": sum(1 for c in self.clients.values() if c.kind == "driver"),
        }

    def req_job_pending(self, cid, args):
        job = self.clients[cid].job_id if cid in self.clients else b""
        return sum(1 for t in self.tasks.values()
                   if t.spec.job == job and t.kind != P.ACTOR_CREATE
                   and t.state in (TaskState.WAITING_ARGS, TaskState.QUEUED, TaskState.ASSIGNED,
                                   TaskState.RUNNING))

    def req_memory(self, cid, args):
        """Per-node store use and the largest objects, for `zray memory`."""
        top = int((args or {}).get("top", 10))
        inline = [o for o in self.objects.values() if not o.locations and o.state == ObjState.READY]
        nodes = [{"node_id": n.node_id.hex(), "objects": len(n.lru), "bytes_in_memory": n.store_used,
                  "bytes_spilled": n.spilled, "store_limit": n.store_limit}
                 for n in self.nodes.values()]
        for nd in nodes:
            nid = bytes.fromhex(nd["node_id"])
            nd["objects"] = sum(1 for o in self.objects.values() if nid in o.locations)
        largest = sorted(self.objects.values(), key=lambda o: o.size, reverse=True)[:top]
        owners = {c.cid: c for c in self.clients.values()}
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
        actor_id = self.named.get((args.get("namespace") or "", args["name"]))
        if actor_id is None:
            return None
        a = self.actors[actor_id]
        return {"actor_id": a.actor_id, "handle_meta": a.handle_meta}

    def req_kill_actor(self, cid, args):
        actor = self.actors.get(args["actor_id"])
        if actor is None:
            raise ValueError("unknown actor")
        self.kill_actor(actor, bool(args.get("no_restart", True)))
        return True

    def req_list_named_actors(self, cid, args):
        all_ns = args.get("all_namespaces")
        ns = args.get("namespace") or ""
        return [{"name": n, "namespace": s} if all_ns else n
                for (s, n) in self.named if all_ns or s == ns]

    def req_actor_state(self, cid, args):
        a = self.actors.get(args["actor_id"])
        return None if a is None else {"state": a.state.value, "restarts": a.restarts, "death": a.death}
