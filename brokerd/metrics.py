"""Metrics the broker hands the dashboard: built-in cluster gauges, and the last
user-metrics report (``zray.util.metrics``) of every driver and executor.

::

    Counter.inc() in a task --> the process's registry --every 0.5 s, if changed-->
        REQ metrics_report {series} --> check_report (every field) --> UserMetrics[cid]
    dashboard /metrics --> REQ metrics --> {cluster, user} --> Prometheus text

A report is plain msgpack data (names, tag values, numbers), never pickled; a
malformed one is refused with an error naming what is wrong. Each process's
report replaces its previous one (counters are cumulative in the process), so
the broker holds one report per process, at most ``MAX_PROCS`` of them: the
oldest reporter is forgotten first.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict

from brokerd.records import ActorState, TaskState

KINDS = ("counter", "gauge", "histogram")
MAX_SERIES = 500  # metrics in one report
MAX_SAMPLES = 1000  # tag combinations of one metric
MAX_TAGS = 20
MAX_BOUNDARIES = 100
MAX_PROCS = 512
# Memory: a report may hold at most MAX_REPORT_COST (its strings' lengths plus
# _ITEM per string or number: about what it costs in the broker), and all the kept
# reports together at most MAX_TOTAL_COST (the oldest reporters are forgotten first),
# so a flood of reports from many connections cannot grow the broker without bound.
MAX_REPORT_COST = 8 << 20
MAX_TOTAL_COST = 128 << 20
_ITEM = 64
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}\Z")
_TAG = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,99}\Z")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_report(series) -> list:
    """The report if every field is well formed; ValueError naming the first bad one."""
    report_cost(series)
    return series


def report_cost(series) -> int:
    """What a report costs the broker to keep (see MAX_REPORT_COST), if every field is
    well formed; ValueError naming the first bad one, or the report being too big."""
    if not isinstance(series, list) or len(series) > MAX_SERIES:
        raise ValueError(f"series must be a list of at most {MAX_SERIES} metrics")
    cost = 0
    for s in series:
        if cost > MAX_REPORT_COST:
            break
        if not isinstance(s, list) or len(s) != 6:
            raise ValueError("a metric is [name, kind, description, tag_keys, samples, boundaries]")
        name, kind, desc, keys, samples, bounds = s
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r:.60}")
        if kind not in KINDS:
            raise ValueError(f"metric {name}: kind must be one of {KINDS}")
        if not isinstance(desc, str) or len(desc) > 2000:
            raise ValueError(f"metric {name}: description must be a string")
        if (not isinstance(keys, list) or len(keys) > MAX_TAGS
                or not all(isinstance(k, str) and _TAG.match(k) for k in keys)):
            raise ValueError(f"metric {name}: bad tag_keys")
        if not isinstance(bounds, list) or len(bounds) > MAX_BOUNDARIES or not all(map(_num, bounds)):
            raise ValueError(f"metric {name}: boundaries must be numbers")
        if kind == "histogram" and (not bounds or sorted(bounds) != bounds):
            raise ValueError(f"metric {name}: a histogram needs increasing boundaries")
        if not isinstance(samples, list) or len(samples) > MAX_SAMPLES:
            raise ValueError(f"metric {name}: at most {MAX_SAMPLES} samples")
        cost += (len(name) + len(desc) + sum(map(len, keys))
                 + _ITEM * (3 + len(keys) + len(bounds)))
        for sample in samples:
            if not isinstance(sample, list) or len(sample) != 2:
                raise ValueError(f"metric {name}: a sample is [tag values, value]")
            tags, value = sample
            if (not isinstance(tags, list) or len(tags) != len(keys)
                    or not all(isinstance(t, str) and len(t) <= 1000 for t in tags)):
                raise ValueError(f"metric {name}: tag values must match tag_keys")
            if kind == "histogram":
                if (not isinstance(value, list) or len(value) != 2
                        or not isinstance(value[0], list) or len(value[0]) != len(bounds) + 1
                        or not all(isinstance(c, int) and c >= 0 for c in value[0])
                        or not _num(value[1])):
                    raise ValueError(f"metric {name}: a histogram sample is [[counts], sum]")
            elif not _num(value):
                raise ValueError(f"metric {name}: value must be a number")
            cost += sum(map(len, tags)) + _ITEM * (2 + len(tags) + (
                len(value[0]) if kind == "histogram" else 0))
            if cost > MAX_REPORT_COST:
                break
    if cost > MAX_REPORT_COST:
        raise ValueError(f"the report is too big: over {MAX_REPORT_COST >> 20} MiB of "
                         "metric names, tags and values (use fewer tag combinations)")
    return cost


class UserMetrics:
    """The last report of each process, oldest reporter evicted first."""

    def __init__(self, max_procs: int = MAX_PROCS, max_cost: int = MAX_TOTAL_COST):
        self.reports: OrderedDict = OrderedDict()
        self.max_procs = max_procs
        self.max_cost = max_cost
        self.cost = 0  # of the reports kept (report_cost)

    def put(self, cid: bytes, series: list, cost: int = 0) -> None:
        old = self.reports.pop(cid, None)
        if old is not None:
            self.cost -= old[2]
        self.reports[cid] = (time.time(), series, cost)
        self.cost += cost
        while len(self.reports) > self.max_procs or (self.cost > self.max_cost
                                                     and len(self.reports) > 1):
            self.cost -= self.reports.popitem(last=False)[1][2]

    def all(self) -> list:
        """[[reporter cid hex, time, series], ...]"""
        return [[cid.hex(), t, s] for cid, (t, s, _c) in self.reports.items()]


def cluster_metrics(engine) -> dict:
    """Built-in gauges: tasks and actors by state, queue depth, nodes, executors, store."""
    tasks = {s.value: 0 for s in TaskState}
    for t in engine.tasks.values():
        tasks[t.state._value_] += 1
    actors = {s.value: 0 for s in ActorState}
    for a in engine.actors.actors.values():
        actors[a.state._value_] += 1
    nodes = []
    for n in engine.nodes.nodes.values():
        nodes.append({"node_id": n.node_id.hex(), "alive": n.alive,
                      "executors": len(n.executors), "store_used": n.store_used,
                      "store_limit": n.store_limit, "spilled": n.spilled, "running": n.running})
    return {"tasks": tasks, "actors": actors,
            "queue_depth": tasks["queued"] + tasks["waiting_args"],
            "nodes": nodes, "alive_nodes": sum(1 for n in nodes if n["alive"]),
            "objects": len(engine.objects.objects)}
