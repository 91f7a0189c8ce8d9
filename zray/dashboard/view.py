"""What the dashboard knows of the cluster: broker REQ answers, cached, and shaped
into the JSON of the ``/api/`` routes (nodes, tasks, actors, objects, jobs, logs)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict

from zray import _protocol as P

TASK_EVENTS = 20000  # at most this many new event-log entries read per refresh
MAX_TASKS = 20000  # tasks the dashboard remembers (the oldest forgotten first)


class ClusterView:
    """Broker queries with a short cache; safe to call from many threads."""

    def __init__(self, client, ttl: float = 0.5):
        self.client = client
        self.ttl = ttl
        self._cache: dict = {}
        self._locks: dict = {}
        self._lock = threading.Lock()
        self._tasks: OrderedDict = OrderedDict()  # task id -> row, in first-seen order
        self._tasks_lock = threading.Lock()
        self._tasks_at = float("-inf")
        self._since = 0  # the event log's append count at the last look
        # tasks that ended, by end state, counted as their events are folded in (from
        # as far back as the event log reached when the dashboard first looked)
        self.ended = {"finished": 0, "failed": 0, "cancelled": 0}

    def ask(self, op: str, args: dict | None = None):
        key = (op, json.dumps(args, sort_keys=True))
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one request per key in flight; the others wait and share its answer
            hit = self._cache.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
            value = self.client.request(op, args, timeout=15)
            self._cache[key] = (time.monotonic(), value)
            return value

    def close(self):
        try:
            self.client.send(P.encode(P.Exit()))
        except Exception:
            pass
        self.client.close()

    # ------------------------------------------------------------- pages
    def nodes(self) -> list:
        mem = {n["node_id"]: n for n in self.ask("memory", {"top": 0})["nodes"]}
        out = []
        for n in self.ask("nodes"):
            res, av = n["Resources"], n["Available"]
            m = mem.get(n["NodeID"], {})
            out.append({
                "node_id": n["NodeID"], "alive": n["Alive"], "hostname": n["NodeManagerHostname"],
                "address": n["NodeManagerAddress"], "pid": n["Pid"], "labels": n["Labels"],
                "resources_total": res, "resources_available": av,
                "cpu": {"total": res.get("CPU", 0), "used": res.get("CPU", 0) - av.get("CPU", 0)},
                "gpu": {"total": res.get("GPU", 0), "used": res.get("GPU", 0) - av.get("GPU", 0)},
                "memory": {"total": res.get("memory", 0),
                           "used": res.get("memory", 0) - av.get("memory", 0)},
                "store": {"used": m.get("bytes_in_memory", 0), "limit": n["StoreLimit"],
                          "spilled": m.get("bytes_spilled", 0), "objects": m.get("objects", 0)},
                "executors": n["Executors"], "running_tasks": n["Running"],
            })
        return out

    def cluster(self) -> dict:
        st = self.ask("status")
        return {k: st[k] for k in st if k != "nodes"}

    def _refresh_tasks(self) -> None:
        """Fold the event-log entries appended since the last look into the task table."""
        with self._tasks_lock:
            if time.monotonic() - self._tasks_at < self.ttl:
                return
            r = self.client.request("recent_events", {"since": self._since,
                                                      "limit": TASK_EVENTS}, timeout=15)
            tasks = self._tasks
            for t, kind, rid, _old, new, reason, node, name in reversed(r["events"]):
                if kind != "task":
                    continue
                rec = tasks.get(rid)
                if rec is None:
                    rec = tasks[rid] = {"task_id": rid.hex(), "name": name, "state": new,
                                        "node_id": "", "submitted": t, "start_time": None,
                                        "end_time": None, "error": "", "attempts": 0}
                rec["state"] = new
                if node:
                    rec["node_id"] = node.hex()
                if new == "running":
                    rec["start_time"] = t
                    rec["attempts"] += 1
                elif new in ("finished", "failed", "cancelled"):
                    rec["end_time"] = t
                    self.ended[new] += 1
                    if new != "finished":
                        rec["error"] = reason
            while len(tasks) > MAX_TASKS:
                tasks.popitem(last=False)
            self._since = r["next"]
            self._tasks_at = time.monotonic()

    def ended_tasks(self) -> dict:
        """{finished, failed, cancelled}: tasks that ended, as far as the dashboard saw."""
        self._refresh_tasks()
        with self._tasks_lock:
            return dict(self.ended)

    def tasks(self, state: str | None = None, limit: int = 1000) -> dict:
        """Tasks the dashboard has seen in the event log (the newest ``MAX_TASKS``),
        newest first, with their state, node, how long they ran (or have been running)
        and a failed task's error."""
        self._refresh_tasks()
        now = time.time()
        counts: dict = {}
        rows = []
        with self._tasks_lock:
            for rec in reversed(self._tasks.values()):
                counts[rec["state"]] = counts.get(rec["state"], 0) + 1
                if (state is None or rec["state"] == state) and len(rows) < limit:
                    start = rec["start_time"]
                    rows.append({**rec, "duration_s": None if start is None
                                 else (rec["end_time"] or now) - start})
        return {"counts": counts, "tasks": rows,
                "total": counts.get(state, 0) if state else sum(counts.values())}

    def actors(self) -> list:
        return self.ask("actors")

    def objects(self, top: int = 100) -> dict:
        return self.ask("memory", {"top": top})

    def jobs(self) -> list:
        return self.ask("jobs")

    def placement_groups(self) -> list:
        return self.ask("state_list", {"resource": "placement_groups", "limit": 10000,
                                       "detail": True})["rows"]

    def state(self, resource: str, filters: list, limit: int, detail: bool) -> dict:
        """``zray.util.state``'s rows (Ray's field names), for /api/v0/<resource>."""
        return self.ask("state_list", {"resource": resource, "filters": filters,
                                       "limit": limit, "detail": detail})

    def summary(self, resource: str) -> dict:
        return self.ask("state_summary", {"resource": resource})


LOG_SUFFIXES = (".log", ".out", ".err")
TAIL_LINES = 2000


class LogFiles:
    """Log files by source: ``head`` (the broker's log dir, read by the broker),
    ``node:<id>`` (a node's agent and executor logs, read by that node through the
    broker: REQ node_logs, relayed as LOG_READ, so nodes on other hosts too), and
    this dashboard's own ``dashboard`` and ``jobs`` dirs, read here.

    Names only (no paths); the reading side (``zray._logfiles.serve``) takes regular
    files directly in its log dir.
    """

    def __init__(self, view, local: dict):
        self.view = view
        self.local = {k: v for k, v in local.items() if v}

    def _remote(self) -> dict:
        """source -> node id hex ("" for the broker itself)."""
        out = {"head": ""}
        try:
            for n in self.view.ask("nodes"):
                if n["Alive"]:
                    out[f"node:{n['NodeID']}"] = n["NodeID"]
        except Exception:
            pass
        return out

    def list(self) -> list:
        rows = []
        for source, node in self._remote().items():
            try:
                files = self.view.ask("node_logs", {"node_id": node, "op": "list",
                                                    "args": {}})["files"]
            except Exception as e:  # a node that cannot answer: say so, list the rest
                rows.append({"source": source, "name": None, "size": None,
                             "error": str(e)[:200]})
                continue
            rows += [{"source": source, "name": name, "size": size}
                     for name, size in files if name.endswith(LOG_SUFFIXES)]
        for source, d in self.local.items():
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            for name in names:
                path = os.path.join(d, name)
                if name.endswith(LOG_SUFFIXES) and os.path.isfile(path) \
                        and not os.path.islink(path):
                    rows.append({"source": source, "name": name,
                                 "size": os.path.getsize(path)})
        return rows

    def read(self, source: str, name: str, tail: int = 65536) -> str:
        """The end of one listed file (at most ``tail`` bytes, ``TAIL_LINES`` lines)."""
        if (not isinstance(name, str) or not name or "/" in name or name.startswith(".")
                or not name.endswith(LOG_SUFFIXES)):
            raise ValueError(f"bad log file name {name!r}")
        if source in self.local:
            path = os.path.join(self.local[source], name)
            if not os.path.isfile(path) or os.path.islink(path):
                raise FileNotFoundError(f"no log file {name!r} in {source}")
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - tail))
                return f.read().decode("utf-8", "replace")
        node = self._remote().get(source)
        if node is None:
            raise FileNotFoundError(f"no log source {source!r}")
        text = self.view.client.request("node_logs", {"node_id": node, "op": "tail",
                                                      "args": {"name": name,
                                                               "lines": TAIL_LINES}},
                                        timeout=15)["text"]
        return text[-tail:]
