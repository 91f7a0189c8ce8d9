"""REQ handlers: cluster information for the API and the CLI (status, memory, actors,
task events). Read-only except ``kill_actor``, which asks the engine.

Owns nothing. Reads the engine and its directories.
"""

from __future__ import annotations

import logging
import os
import time

from brokerd.engine import TaskEngine
from brokerd.pgroups import PlacementGroupQueries
from brokerd.records import ActorState, ObjState, TaskState
from brokerd.submissions import SubmissionTable
from zray import _protocol as P

log = logging.getLogger("zray.broker")

DEFERRED = object()  # a handler's result: the reply is sent later, not by answer()
_OPEN = (TaskState.WAITING_ARGS, TaskState.QUEUED, TaskState.ASSIGNED, TaskState.RUNNING)


class Queries(PlacementGroupQueries):
    def __init__(self, engine: TaskEngine, address: str, started: float, stats):
        self.engine = engine
        self.address = address
        self.started = started
        self.stats = stats  # () -> {"dropped": n, ...} from the broker loop
        engine.submissions = SubmissionTable()  # jobs of the job API (brokerd/submissions.py)

    def answer(self, cid: bytes, m: P.Req) -> P.Reply | None:
        handler = getattr(self, "req_" + m.op, None)
        if handler is None:
            return P.Reply(m.req_id, False, f"unknown request {m.op!r:.40}")
        args = m.args if isinstance(m.args, dict) else {}
        self.req_id = m.req_id  # the REQ being answered (a deferred answer needs it)
        try:
            result = handler(cid, args)
            if result is DEFERRED:  # answered later (node_logs: when the node answers)
                return None
            return P.Reply(m.req_id, True, result)
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
        if args.get("submission_id") is not None:  # a driver the job API started
            self.engine.submissions.link(self.engine.clients[cid].job_id,
                                         args["submission_id"])
        return True

    def req_job_submissions(self, cid, args):
        """The dashboard's records of the jobs it runs (list_jobs shows them)."""
        c = self.engine.clients.get(cid)
        if c is None or c.kind != "cli":
            raise PermissionError("only the dashboard's connection sends job submissions")
        return self.engine.submissions.update(args.get("jobs"))

    def req_pending_calls(self, cid, args):
        """How many of the caller's calls on an actor are unfinished (max_pending_calls)."""
        actor_id = args.get("actor_id")
        if not isinstance(actor_id, bytes):
            raise ValueError("pending_calls needs an actor_id (bytes)")
        return self.engine.pending_calls(cid, actor_id)

    def req_actor_route(self, cid, args):
        """Where the actor takes direct calls: pushed as ROUTE, now and on every change."""
        self.engine.routes.ask(cid, args.get("actor_id"))
        return True

    def req_actor_listen(self, cid, args):
        """An actor's executor says where it takes direct calls (brokerd/routes.py)."""
        self.engine.routes.listen(cid, args)
        return True

    def req_direct_stats(self, cid, args):
        """An actor's executor counts the direct calls it ran (the broker's books)."""
        self.engine.routes.stats(cid, args)
        return True

    def req_direct_cancel(self, cid, args):
        """ray.cancel of a direct call: the broker interrupts it on the executor."""
        self.engine.routes.cancel(cid, args)
        return True

    def req_direct_calls(self, cid, args):
        """Direct calls run so far: on one actor ({actor_id}) or in all."""
        actor_id = args.get("actor_id")
        return self.engine.routes.report(actor_id if isinstance(actor_id, bytes) else None)

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
        top = args.get("top", 10)
        if type(top) is not int:
            raise ValueError(f"memory: top must be an int, got {type(top).__name__}")
        top = max(0, min(top, 10000))
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

    # ---------------------------------------------------------------- dashboard
    # Read-only views for the dashboard process (zray/dashboard/): each is a slice
    # or a walk of tables the engine keeps anyway, so that a dashboard refreshing
    # every second costs the loop little (measured: benchmarks/dashboard_load.py).

    def req_recent_events(self, cid, args):
        """Event-log entries appended since ``since`` (a ``next`` from an earlier answer;
        0: from the start), at most the newest ``limit`` (<= 20000), newest first:
        {events: [[time, kind, id, from, to, reason, node id|nil, name], ...], next}.
        Only the new entries are walked, so a dashboard polling it costs little."""
        limit = args.get("limit", 5000)
        since = args.get("since", 0)
        if type(limit) is not int or not 0 < limit <= 20000:
            raise ValueError("recent_events: limit must be an int in 1..20000")
        if type(since) is not int or since < 0:
            raise ValueError("recent_events: since must be an int >= 0")
        moves = self.engine.moves
        events = moves.events
        want = min(limit, len(events), max(0, moves.appended - since))
        out = []
        for e in reversed(events):
            if len(out) >= want:
                break
            out.append(list(e))
        return {"events": out, "next": moves.appended}

    def req_actors(self, cid, args):
        """Every actor the broker knows, with its state and restarts."""
        out = []
        for a in self.engine.actors.actors.values():
            ex = a.executor
            out.append({"actor_id": a.actor_id.hex(), "class_name": a.class_name,
                        "name": a.name, "namespace": a.namespace, "state": a.state.value,
                        "restarts": a.restarts, "max_restarts": a.max_restarts,
                        "death": a.death, "detached": a.detached, "job_id": a.job_id.hex(),
                        "node_id": ex.node.node_id.hex() if ex is not None else "",
                        "pid": ex.pid if ex is not None else 0})
        return out

    def req_jobs(self, cid, args):
        """Connected drivers' jobs: [{job_id, namespace, driver_pid}, ...]."""
        clients = self.engine.clients
        return [{"job_id": j.hex(), "namespace": info["namespace"],
                 "driver_pid": clients[info["driver"]].pid if info["driver"] in clients else 0}
                for j, info in self.engine.jobs.items()]

    def req_metrics_report(self, cid, args):
        """A process's user metrics (zray.util.metrics), checked field by field."""
        from brokerd.metrics import report_cost

        c = self.engine.clients.get(cid)
        if c is None or c.kind not in ("driver", "executor"):
            raise PermissionError("only drivers and executors report metrics")
        series = args.get("series")
        self.user_metrics.put(cid, series, report_cost(series))
        return True

    def req_metrics(self, cid, args):
        """Built-in cluster metrics and every process's last user metrics report."""
        from brokerd.metrics import cluster_metrics

        return {"cluster": cluster_metrics(self.engine), "user": self.user_metrics.all()}

    @property
    def user_metrics(self):
        store = self.__dict__.get("_user_metrics")
        if store is None:
            from brokerd.metrics import UserMetrics

            store = self.__dict__["_user_metrics"] = UserMetrics()
        return store

    # ------------------------------------------------ state API (brokerd/state.py)
    def req_state_list(self, cid, args):
        """Rows of one resource for ``zray.util.state.list_*``: {rows, total,
        dropped_events}."""
        from brokerd.state import StateView

        return StateView(self.engine).list(args)

    def req_state_summary(self, cid, args):
        """Counts by name and state for ``zray.util.state.summarize_*``."""
        from brokerd.state import StateView

        return StateView(self.engine).summary(args)

    def req_event_log(self, cid, args):
        """The bounded transition log's size, capacity and drop count."""
        moves = self.engine.moves
        return {"events": len(moves.events), "capacity": moves.events.maxlen,
                "dropped": moves.dropped}


    session_dir = ""  # the broker's session dir (set by the Broker), for req_log_dirs

    def req_log_dirs(self, cid, args):
        """Where logs are, for `zray logs`: the broker's and each node's log directory,
        with the host it is on (paths on that host)."""
        import socket

        return {
            "broker": {"host": socket.gethostname(), "pid": os.getpid(),
                       "log_dir": os.path.join(self.session_dir, "logs")
                       if self.session_dir else ""},
            "nodes": [{"node_id": n.node_id.hex(), "host": n.hostname, "pid": n.pid,
                       "log_dir": n.log_dir} for n in self.engine.nodes.nodes.values()],
        }

    # ------------------------------------------- log files, relayed to nodes (zray logs)
    req_id = 0

    @property
    def relays(self) -> dict:
        """relay id -> (asking cid, its req_id, node id, time asked): LOG_READs in flight."""
        if "_relays" not in self.__dict__:
            self._relays, self._next_relay = {}, 0
        return self._relays

    def req_node_logs(self, cid, args):
        """Read log files: of a node (``node_id`` hex: relayed as LOG_READ, answered when
        the node sends LOG_DATA) or of the broker itself (``node_id`` ""); ``op`` and
        ``args`` as ``zray._logfiles.serve`` takes them."""
        from zray import _logfiles

        node_hex, op, largs = args.get("node_id"), args.get("op"), args.get("args") or {}
        if not isinstance(node_hex, str) or not isinstance(op, str) or not isinstance(largs,
                                                                                      dict):
            raise ValueError("node_logs needs node_id (hex str), op (str) and args (dict)")
        if node_hex == "":
            if op == "task":  # a search of every executor log: nodes do that, off their loop
                raise ValueError("search a node's logs for a task: give its node_id")
            return _logfiles.serve(os.path.join(self.session_dir, "logs")
                                   if self.session_dir else "", op, largs)
        try:
            node = self.engine.nodes.nodes.get(bytes.fromhex(node_hex))
        except ValueError:
            node = None
        if node is None:
            raise ValueError(f"no node {node_hex[:40]} in the cluster")
        now = time.monotonic()
        relays = self.relays
        if len(relays) > 1000:  # answers that never came (the node died): forget them
            for k in [k for k, v in relays.items() if now - v[3] > 60]:
                del relays[k]
        self._next_relay += 1
        relay = self._next_relay
        relays[relay] = (cid, self.req_id, node.node_id, now)
        self.engine.out.send(node.ident, P.encode(P.LogRead(relay, op, largs)))
        return DEFERRED

    def log_data(self, node_id: bytes, m: P.LogData) -> None:
        """A node's answer to LOG_READ: the REPLY of the REQ it was relayed for."""
        asked = self.relays.get(m.req_id)
        if asked is None or asked[2] != node_id:
            raise P.ProtocolError("LOG_DATA that answers nothing asked of this node")
        del self.relays[m.req_id]
        cid, req_id = asked[0], asked[1]
        if cid in self.engine.clients:
            self.engine.out.send(P.inbox_ident(cid), P.encode(P.Reply(req_id, m.ok, m.result)))

    # ------------------------------------------------ leased executors (brokerd/leases.py)
    def req_task_lease(self, cid, args):
        """Lend the caller an idle executor on its node for its sync tasks, or None."""
        return self.engine.leases.grant(cid, args)

    def req_lease_books(self, cid, args):
        """The leased executor's tasks since its last report (the state API's rows)."""
        self.engine.leases.books(cid, args)
        return True

    def req_lease_end(self, cid, args):
        """The leased executor ends its lease (with its last books): back to the pool."""
        self.engine.leases.books(cid, args, end=True)
        return True

    def req_lease_return(self, cid, args):
        """The holder gives its lease back (it wants one for another function)."""
        self.engine.leases.give_back(cid, args)
        return True

    def req_lease_cancel(self, cid, args):
        """ray.cancel of a leased task: the broker interrupts it on the leased executor."""
        self.engine.leases.cancel(cid, args)
        return True

    def req_task_leases(self, cid, args):
        """Leases granted, ended and active, tasks run on them, requests refused."""
        return self.engine.leases.report()
