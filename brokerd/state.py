"""Rows for the state API (``zray.util.state``, ``zray list|get|summary``), with Ray's
field names and state names.

::

    REQ state_list {resource, filters, limit, detail} --rows()--> filter --> first `limit`
    REQ state_summary {resource}                      --rows()--> counts by name and state

    tasks:   the live task table + the bounded transition log (finished tasks live on only
             there: their last move, its reason, times, node, and the spec it carried)
    actors:  the actor directory (dead actors stay in it)
    nodes:   the node table + the nodes that left it (NodeTable.gone, bounded)
    objects: the object directory;  jobs: the drivers' registered jobs (connected: RUNNING)
             and the bounded record of ended ones (SUCCEEDED, brokerd/jobhistory.py),
             merged with the job API's submissions (brokerd/submissions.py)

Every value in a row is a plain str/int/float/bool/None/list/dict (msgpack, then JSON).
Filters arrive from the wire: their shape is checked here and a bad one is an error
reply naming the problem. Owns nothing; reads the engine and its directories.
"""

from __future__ import annotations

import socket

from brokerd import renvstate
from zray import _protocol as P
from zray.util.state.common import COLUMNS, MAX_LIMIT, check_filters, matches

_HOST = socket.gethostname()

# Ray's names for zray's task / actor states.
TASK_STATE = {
    "waiting_args": "PENDING_ARGS_AVAIL", "queued": "PENDING_NODE_ASSIGNMENT",
    "assigned": "SUBMITTED_TO_WORKER", "running": "RUNNING", "finished": "FINISHED",
    "failed": "FAILED", "cancelled": "FAILED",  # Ray: FAILED with error_type TASK_CANCELLED
}
ACTOR_STATE = {"pending": "PENDING_CREATION", "alive": "ALIVE", "restarting": "RESTARTING",
               "dead": "DEAD"}
TASK_TYPE = {P.TASK: "NORMAL_TASK", P.ACTOR_CREATE: "ACTOR_CREATION_TASK",
             P.ACTOR_CALL: "ACTOR_TASK"}

# Why a task failed (the reason of its last move: its start) -> Ray's ErrorType name; the
# first match wins. A reason that matches none is an executor or node loss.
_ERROR_TYPES = (
    ("raised", "TASK_EXECUTION_EXCEPTION"), ("constructor raised", "TASK_EXECUTION_EXCEPTION"),
    ("the method raised", "TASK_EXECUTION_EXCEPTION"),  # a direct actor call (brokerd/routes.py)
    ("cancel", "TASK_CANCELLED"), ("actor", "ACTOR_DIED"),
    ("unschedulable", "TASK_UNSCHEDULABLE_ERROR"),
    ("argument is an error", "DEPENDENCY_RESOLUTION_FAILED"),
    ("argument lost", "OBJECT_LOST"), ("no process", "ACTOR_CREATION_FAILED"),
)

SUMMARY_RESOURCES = ("tasks", "actors", "objects")


def _hex(b) -> str | None:
    return b.hex() if b else None


def _ms(t) -> int | None:
    return int(t * 1000) if t else None


class StateView:
    def __init__(self, engine):
        self.engine = engine
        self.broker_host = _HOST  # the head node: the first node on the broker's host

    # ---------------------------------------------------------------- queries
    def list(self, args: dict) -> dict:
        resource = args.get("resource")
        if type(resource) is not str or resource not in COLUMNS:
            raise ValueError(f"unknown resource {resource!r:.40}; one of {sorted(COLUMNS)}")
        filters = check_filters(resource, args.get("filters"))
        limit = args.get("limit", 100)
        if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an int in 1..{MAX_LIMIT}, got {limit!r:.40}")
        detail = args.get("detail", False)
        if type(detail) is not bool:
            raise ValueError("detail must be a bool")
        rows = [r for r in getattr(self, "_" + resource)() if matches(r, filters)]
        keep = COLUMNS[resource][0] + (COLUMNS[resource][1] if detail else ())
        return {"rows": [{k: r.get(k) for k in keep} for r in rows[:limit]],
                "total": len(rows), "dropped_events": self.engine.moves.dropped}

    def summary(self, args: dict) -> dict:
        resource = args.get("resource")
        if resource not in SUMMARY_RESOURCES:
            raise ValueError(f"no summary of {resource!r:.40}; one of {SUMMARY_RESOURCES}")
        rows = getattr(self, "_" + resource)()
        groups: dict = {}
        if resource == "objects":
            for r in rows:
                g = groups.setdefault(r["call_site"], {
                    "total_objects": 0, "total_size_mb": 0.0, "total_num_workers": 0,
                    "total_num_nodes": 0, "task_state_counts": {}, "ref_type_counts": {}})
                g["total_objects"] += 1
                g["total_size_mb"] += (r["object_size"] or 0) / 1e6
                _count(g["task_state_counts"], r["task_status"])
                _count(g["ref_type_counts"], r["reference_type"])
                g.setdefault("_pids", set()).add(r["pid"])
                g.setdefault("_nodes", set()).update(r["locations"])
            for g in groups.values():
                g["total_num_workers"] = len(g.pop("_pids"))
                g["total_num_nodes"] = len(g.pop("_nodes"))
            return {"cluster": {"summary": groups, "total_objects": len(rows),
                                "total_size_mb": sum((r["object_size"] or 0) for r in rows) / 1e6,
                                "callsite_enabled": False, "summary_by": "callsite"}}
        key = "func_or_class_name" if resource == "tasks" else "class_name"
        for r in rows:
            name = r[key]
            g = groups.get(name)
            if g is None:
                g = groups[name] = {key: name, "state_counts": {}}
                if resource == "tasks":
                    g["type"] = r["type"]
            _count(g["state_counts"], r["state"])
        out = {"summary": groups, f"total_{resource}": len(rows),
               "summary_by": "func_name" if resource == "tasks" else "class"}
        if resource == "tasks":
            out["dropped_events"] = self.engine.moves.dropped
        return {"cluster": out}

    # ------------------------------------------------------------------ rows
    def _tasks(self) -> list:
        """Tasks in the order they were first seen: every task whose moves are still in the
        log, and every live task (a task waiting for its arguments has made no move yet)."""
        rows: dict = {}
        specs = self.engine.moves.specs
        direct, actors = self.engine.routes.direct_tasks, self.engine.actors.actors
        leased = self.engine.leases.lease_tasks  # (brokerd/leases.py)
        for t, kind, rid, _old, new, reason, node_id, name in self.engine.moves.events:
            if kind != "task":
                continue
            r = rows.get(rid)
            if r is None:
                r = rows[rid] = _task_row(specs.get(rid), t, rid, name)
                aid = direct.get(rid)
                if aid is not None and r["type"] is None:  # a direct actor call
                    actor = actors.get(aid)
                    r.update(type="ACTOR_TASK", actor_id=aid.hex(), func_or_class_name=name,
                             job_id=_hex(actor.job_id) if actor is not None else None)
                elif r["type"] is None and rid in leased:  # run on a leased executor
                    job, res, ex_cid, pid, parent = leased[rid]
                    r.update(type="NORMAL_TASK", job_id=_hex(job), worker_id=ex_cid.hex(),
                             worker_pid=pid, required_resources=P.from_units(res),
                             parent_task_id=_hex(parent))
            r["events"].append({"state": TASK_STATE[new], "created_ms": _ms(t)})
            r["state"] = TASK_STATE[new]
            if node_id:
                r["node_id"] = node_id.hex()
            if new == "running":
                r["start_time_ms"] = _ms(t)
                r["end_time_ms"] = None
            elif _old == "running" and new == "queued":  # a retry
                r["attempt_number"] += 1
            if new in ("finished", "failed", "cancelled"):
                r["end_time_ms"] = _ms(t)
                if new != "finished":
                    r["error_type"] = _error_type(reason)
                    r["error_message"] = reason
                else:
                    r["error_type"] = r["error_message"] = None
        for task in list(self.engine.tasks.values()):
            r = rows.get(task.task_id)
            if r is None:
                r = rows[task.task_id] = _task_row(task.spec, 0.0, task.task_id, "")
                r["state"] = TASK_STATE[task.state._value_]
            ex = task.executor
            if ex is None and task.actor is not None:
                ex = task.actor.executor
            if task.blocked and task.state._value_ == "running":
                r["state"] = "RUNNING_IN_RAY_GET"  # its code waits in get()
            if ex is not None and task.state._value_ in ("running", "assigned"):
                r["worker_id"] = ex.cid.hex()
                r["worker_pid"] = ex.pid
                r["node_id"] = ex.node.node_id.hex()
        return list(rows.values())

    def _actors(self) -> list:
        out = []
        for a in list(self.engine.actors.actors.values()):
            ex = a.executor
            state = ACTOR_STATE[a.state._value_]
            if state == "PENDING_CREATION" and a.create.state._value_ == "waiting_args":
                state = "DEPENDENCIES_UNREADY"
            out.append({
                "actor_id": a.actor_id.hex(), "class_name": a.class_name, "state": state,
                "job_id": a.job_id.hex(), "name": a.name, "ray_namespace": a.namespace,
                "node_id": ex.node.node_id.hex() if ex is not None else None,
                "pid": ex.pid if ex is not None else None,
                "is_detached": a.detached, "num_restarts": a.restarts,
                "death_cause": {"actor_died_error_context": {"error_message": a.death}}
                if a.death else None,
                "required_resources": P.from_units(a.create.resources),
                "repr_name": "",
            })
        return out

    def _nodes(self) -> list:
        nodes = self.engine.nodes.nodes
        head = next((n.node_id for n in nodes.values()
                     if n.alive and n.hostname == self.broker_host), None)
        rows = []
        rows = [_node_row(n, n.node_id == head) for n in list(nodes.values())]
        for n, t in list(self.engine.nodes.gone):
            rows.append(dict(_node_row(n, False), state="DEAD", end_time_ms=_ms(t),
                             state_message="the node left the cluster or was lost"))
        return rows

    def _objects(self) -> list:
        e = self.engine
        clients = e.clients
        nodes = e.nodes.nodes
        rows = []
        for o in list(e.objects.objects.values()):
            owner = clients.get(o.owner)
            if o.state._value_ == "ready":
                status = "FINISHED"
            else:
                task = e.tasks.get(o.oid[:P.TASK_ID_LEN])
                status = TASK_STATE[task.state._value_] if task is not None else "NIL"
            if o.actor:
                ref = "ACTOR_HANDLE"
            elif o.pins:
                ref = "USED_BY_PENDING_TASK" if o.state._value_ == "pending" or not o.contained \
                    else "CAPTURED_IN_OBJECT"
            elif o.locations:
                ref = "PINNED_IN_MEMORY"
            else:
                ref = "LOCAL_REFERENCE"
            node = nodes.get(owner.node_id) if owner is not None else None
            rows.append({
                "object_id": o.oid.hex(), "object_size": o.size, "task_status": status,
                "reference_type": ref, "call_site": "disabled",
                "type": {"driver": "DRIVER", "executor": "WORKER"}.get(
                    owner.kind if owner else "", "OWNER_GONE"),
                "pid": owner.pid if owner else None,
                "ip": (node.address or node.hostname) if node is not None else None,
                "state": o.state._value_, "locations": [k.hex() for k in o.locations],
                "spilled": bool(o.locations) and not any(
                    o.oid in nodes[k].lru for k in o.locations if k in nodes),
            })
        return rows

    def _jobs(self) -> list:
        e = self.engine
        rows = []
        for job, info in list(e.jobs.items()):
            c = e.clients.get(info["driver"])
            rows.append({"job_id": job.hex(), "type": "DRIVER", "status": "RUNNING",
                         "namespace": info["namespace"],
                         "driver_info": {"id": info["driver"].hex(),
                                         "pid": c.pid if c else None,
                                         "node_id": _hex(c.node_id) if c else None},
                         "start_time": info.get("start_ms"), "end_time": None,
                         "message": "the driver is connected"})
        rows = e.ended_jobs.rows() + rows  # ended ones (oldest first), then running
        subs = getattr(e, "submissions", None)  # (set by brokerd/queries.py)
        return subs.rows(rows) if subs is not None else rows

    def _runtime_envs(self) -> list:
        return renvstate.rows(self.engine)

    def _placement_groups(self) -> list:
        """Ray's PlacementGroupState rows: removed groups too, while the table keeps them."""
        t = self.engine.pgroups
        rows = []
        for pg in list(t.groups.values()):
            r = t.row(pg)
            rows.append({"placement_group_id": r["placement_group_id"], "name": r["name"],
                         "creator_job_id": pg.job.hex() if pg.job else None,
                         "state": r["state"], "strategy": r["strategy"],
                         "is_detached": r["is_detached"], "stats": r["stats"],
                         "bundles": [{"bundle_id": {"placement_group_id": r["placement_group_id"],
                                                    "bundle_index": i},
                                      "unit_resources": res,
                                      "node_id": r["bundles_to_node_id"].get(i)}
                                     for i, res in r["bundles"].items()]})
        return rows


    def _cluster_events(self) -> list:
        """Ray's cluster events, oldest first: nodes lost (ERROR), actors restarting
        (WARNING) or dead (ERROR), executor processes that died other than by retiring
        (WARNING), from the broker's bounded event log and its record of lost nodes."""
        rows = []
        for t, kind, rid, _old, new, reason, node_id, name in list(self.engine.moves.events):
            if kind == "actor" and new in ("restarting", "dead"):
                sev, src = ("WARNING" if new == "restarting" else "ERROR"), "GCS"
                msg = f"actor {name or rid.hex()} ({rid.hex()}) is {new.upper()}: {reason}"
            elif kind == "executor" and new == "dead" and reason and "idle" not in reason \
                    and "retired" not in reason:
                sev, src = "WARNING", "RAYLET"
                msg = f"worker {rid.hex()} died: {reason}"
            else:
                continue
            rows.append((t, sev, src, msg, {"id": rid.hex(), "state": new.upper(),
                                            "node_id": _hex(node_id)}))
        for n, t in list(self.engine.nodes.gone):
            rows.append((t, "ERROR", "GCS", f"node {n.node_id.hex()} ({n.hostname}) left the "
                         "cluster or was lost", {"node_id": n.node_id.hex()}))
        rows.sort(key=lambda r: r[0])
        return [{"event_id": f"{i:08x}", "severity": sev, "time": _ms(t),
                 "source_type": src, "message": msg, "custom_fields": fields}
                for i, (t, sev, src, msg, fields) in enumerate(rows)]

    def _workers(self) -> list:
        """Ray's WorkerState rows: the connected drivers (DRIVER) and every executor
        process (WORKER), starting ones included; a worker is listed while it lives."""
        e = self.engine
        nodes = e.nodes.nodes
        rows = []

        def where(node_id):
            node = nodes.get(node_id) if node_id else None
            return (node.address or node.hostname) if node is not None else None

        for c in list(e.clients.values()):
            if c.kind == "driver":
                rows.append({"worker_id": c.cid.hex(), "is_alive": True,
                             "worker_type": "DRIVER", "exit_type": None,
                             "node_id": _hex(c.node_id) or None, "ip": where(c.node_id),
                             "pid": c.pid, "exit_detail": None, "job_id": _hex(c.job_id),
                             "state": "connected", "actor_id": None, "current_task_id": None})
        for ex in list(e.executors.values()):
            c = e.clients.get(ex.cid)
            task = ex.task
            rows.append({"worker_id": ex.cid.hex(), "is_alive": ex.state._value_ != "dead",
                         "worker_type": "WORKER", "exit_type": None,
                         "node_id": ex.node.node_id.hex(), "ip": where(ex.node.node_id),
                         "pid": ex.pid or (c.pid if c is not None else None),
                         "exit_detail": None,
                         "job_id": _hex(task.spec.job) if task is not None else None,
                         "state": ex.state._value_,
                         "actor_id": _hex(ex.actor.actor_id) if ex.actor is not None else None,
                         "current_task_id": _hex(task.task_id) if task is not None else None})
        return rows


def _node_row(n, head: bool) -> dict:
    return {
        "node_id": n.node_id.hex(), "node_ip": n.address or n.hostname, "is_head_node": head,
        "state": "ALIVE" if n.alive else "DEAD", "state_message": None, "node_name": n.hostname,
        "resources_total": P.from_units(n.total), "labels": dict(n.labels),
        "resources_available": P.from_units(n.avail), "pid": n.pid,
        "executors": len(n.executors), "store_limit": n.store_limit, "end_time_ms": None,
        "log_dir": n.log_dir,
    }


def _task_row(spec, t: float, task_id: bytes, name: str) -> dict:
    """A task's row from its spec; without one (forgotten: a very old task), what its
    events say."""
    row = {
        "task_id": task_id.hex(), "attempt_number": 0, "name": name, "state": "NIL",
        "job_id": None, "actor_id": None, "type": None, "func_or_class_name": name,
        "parent_task_id": None, "node_id": None, "worker_id": None, "worker_pid": None,
        "error_type": None, "error_message": None, "required_resources": None,
        "creation_time_ms": _ms(t), "start_time_ms": None, "end_time_ms": None,
        "events": [], "language": "PYTHON",
    }
    if spec is not None:
        row.update(name=spec.name, func_or_class_name=spec.name, job_id=spec.job.hex(),
                   actor_id=_hex(spec.actor_id), type=TASK_TYPE.get(spec.kind, "NORMAL_TASK"),
                   parent_task_id=_hex(spec.parent),
                   required_resources=P.from_units(spec.resources))
    return row


def _error_type(reason: str) -> str:
    for text, name in _ERROR_TYPES:
        if reason.startswith(text):
            return name
    return "NODE_DIED" if "node" in reason else "WORKER_DIED"


def _count(d: dict, key) -> None:
    d[key] = d.get(key, 0) + 1
