"""``/metrics``: the cluster's built-in gauges and every process's user metrics in
Prometheus text format (prometheus_client), read from the broker at scrape time.

Built-in names follow Ray's: ``ray_tasks{State}``, ``ray_actors{State}``,
``ray_cluster_active_nodes``, ``ray_object_store_memory{NodeId}``,
``ray_spill_manager_spilled_bytes{NodeId}``, plus ``ray_scheduler_queue_depth``,
``ray_executors{NodeId}`` and ``ray_objects``. User metrics keep the name given to
``zray.util.metrics`` (Ray adds a ``ray_`` prefix: so does zray). A process's
reports replace each other; the same series from several processes is summed
(counters and histograms) or shows the most recent report (gauges).

``ray_tasks{State}`` counts the broker's live tasks by state, and, for FINISHED,
FAILED and CANCELLED, the tasks the dashboard saw end in the event log (from as
far back as the log reached when it first looked); ``ray_actors`` counts the
actor directory (dead actors stay in it).
"""

from __future__ import annotations

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)


class ClusterCollector:
    def __init__(self, view):
        self.view = view

    def collect(self):
        m = self.view.ask("metrics")
        c = m["cluster"]
        # a task that ended has left the broker's tables: its end state is counted from
        # the event log the dashboard folds in
        c["tasks"] = {**c["tasks"], **self.view.ended_tasks()}
        yield from _cluster(c)
        yield from _user(m["user"])


def registry_for(view) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ClusterCollector(view))
    return reg


def _cluster(c: dict):
    g = GaugeMetricFamily("ray_tasks", "Tasks by state", labels=["State"])
    for state, n in sorted(c["tasks"].items()):
        g.add_metric([state.upper()], n)
    yield g
    g = GaugeMetricFamily("ray_actors", "Actors by state", labels=["State"])
    for state, n in sorted(c["actors"].items()):
        g.add_metric([state.upper()], n)
    yield g
    yield GaugeMetricFamily("ray_scheduler_queue_depth",
                            "Tasks waiting for resources or arguments", value=c["queue_depth"])
    yield GaugeMetricFamily("ray_cluster_active_nodes", "Alive nodes", value=c["alive_nodes"])
    yield GaugeMetricFamily("ray_objects", "Objects the broker tracks", value=c["objects"])
    per_node = (("ray_object_store_memory", "Bytes of objects in the node's store", "store_used"),
                ("ray_object_store_limit_bytes", "The node's store size", "store_limit"),
                ("ray_spill_manager_spilled_bytes", "Bytes the node spilled to disk", "spilled"),
                ("ray_executors", "Executor processes on the node", "executors"),
                ("ray_running_tasks", "Tasks running on the node", "running"))
    for name, doc, key in per_node:
        g = GaugeMetricFamily(name, doc, labels=["NodeId"])
        for n in c["nodes"]:
            if n["alive"]:
                g.add_metric([n["node_id"]], n[key])
        yield g


def _user(reports: list):
    merged: dict = {}  # name -> [kind, desc, keys, bounds, {tags: value}]
    for _cid, _t, series in sorted(reports, key=lambda r: r[1]):  # oldest report first
        for name, kind, desc, keys, samples, bounds in series:
            cur = merged.get(name)
            if cur is None:
                cur = merged[name] = [kind, desc, keys, bounds, {}]
            elif cur[0] != kind or cur[2] != keys or cur[3] != bounds:
                continue  # the same name defined differently elsewhere: keep the first
            values = cur[4]
            for tags, value in samples:
                tags = tuple(tags)
                if kind == "gauge" or tags not in values:
                    values[tags] = value
                elif kind == "counter":
                    values[tags] += value
                else:
                    old = values[tags]
                    values[tags] = [[a + b for a, b in zip(old[0], value[0], strict=True)],
                                    old[1] + value[1]]
    for name, (kind, desc, keys, bounds, values) in sorted(merged.items()):
        full = name if name.startswith("ray_") else "ray_" + name
        if kind == "counter":
            fam = CounterMetricFamily(full, desc or name, labels=keys)
            for tags, v in values.items():
                fam.add_metric(list(tags), v)
        elif kind == "gauge":
            fam = GaugeMetricFamily(full, desc or name, labels=keys)
            for tags, v in values.items():
                fam.add_metric(list(tags), v)
        else:
            fam = HistogramMetricFamily(full, desc or name, labels=keys)
            for tags, (counts, total) in values.items():
                cum, buckets = 0, []
                for b, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
                    cum += n
                    buckets.append((b, cum))
                fam.add_metric(list(tags), buckets, total)
        yield fam
