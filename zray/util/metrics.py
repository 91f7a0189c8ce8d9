"""User metrics, as Ray's ``ray.util.metrics``: ``Counter``, ``Gauge``, ``Histogram``.

::

    Counter("jobs_done", tag_keys=("queue",)).inc(tags={"queue": "a"})   (task, actor, driver)
        --> this process's registry: name -> series {tag values: value}
        --> a reporter thread, every REPORT_S while something changed (and at exit):
            REQ metrics_report {series: [[name, kind, description, tag_keys,
                                           [[tag values, value], ...], boundaries], ...]}
        --> the broker keeps each process's last report (brokerd/metrics.py checks it)
        --> the dashboard's /metrics: Prometheus text, ``ray_`` + name

Only names, strings and numbers travel: never pickled. Counters and histograms
are cumulative in their process; the dashboard sums them across processes.
A metric pickles as its definition (name, description, tag keys, boundaries),
so one made in the driver and used in tasks records in each executor.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
from typing import Optional

log = logging.getLogger("zray")

REPORT_S = 0.5
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class _Registry:
    """This process's series, by metric name, and the thread that reports them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.series: dict = {}  # name -> [kind, description, tag_keys, boundaries, {tags: v}]
        self.dirty = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def define(self, kind, name, description, tag_keys, boundaries):
        with self.lock:
            cur = self.series.get(name)
            if cur is None:
                self.series[name] = [kind, description, list(tag_keys), list(boundaries), {}]
            elif cur[0] != kind or cur[2] != list(tag_keys) or cur[3] != list(boundaries):
                raise ValueError(f"metric {name!r} is already defined in this process as a "
                                 f"{cur[0]} with tag_keys {tuple(cur[2])}"
                                 + (f" and boundaries {cur[3]}" if cur[3] else ""))

    def record(self, name, tags: tuple, fn):
        with self.lock:
            values = self.series[name][4]
            values[tags] = fn(values.get(tags))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="zray-metrics",
                                               daemon=True)
                self.thread.start()
                atexit.register(self.flush)
        self.dirty.set()

    def snapshot(self) -> list:
        with self.lock:
            return [[name, kind, desc, keys, [[list(t), v] for t, v in values.items()], bounds]
                    for name, (kind, desc, keys, bounds, values) in self.series.items()
                    if values]

    def flush(self) -> None:
        from zray import _runtime

        client = _runtime.client
        if client is None or client.closed or not self.dirty.is_set():
            return
        self.dirty.clear()
        try:
            client.request("metrics_report", {"series": self.snapshot()}, timeout=10)
        except Exception as e:  # the broker refused it or is gone: say so, keep going
            log.warning("metrics report not taken: %s", e)

    def _run(self):
        while True:
            self.dirty.wait()
            self.flush()
            threading.Event().wait(REPORT_S)


_registry = _Registry()


class Metric:
    """What Counter, Gauge and Histogram share: a name, a description, tag keys and
    default tags."""

    _kind = ""

    def __init__(self, name: str, description: str = "", tag_keys: Optional[tuple] = None,
                 _boundaries: tuple = ()):
        if not isinstance(name, str) or not name:
            raise ValueError("Empty name is not allowed. Please provide a metric name.")
        if not _NAME.match(name):
            raise ValueError(f"Invalid metric name: {name!r}. Metric names can only contain "
                             "letters, numbers and _, and cannot start with a number.")
        if not isinstance(description, str):
            raise TypeError(f"description must be a str, got {type(description).__name__}")
        tag_keys = tag_keys or ()
        if not isinstance(tag_keys, tuple):
            raise TypeError(f"tag_keys should be a tuple type, got: {type(tag_keys)}")
        for key in tag_keys:
            if not isinstance(key, str):
                raise TypeError(f"Tag keys must be str, got {type(key)}.")
            if not _NAME.match(key):
                raise ValueError(f"Invalid tag key {key!r}: letters, numbers and _ only")
        self._name = name
        self._description = description
        self._tag_keys = tag_keys
        self._default_tags: dict = {}
        _registry.define(self._kind, name, description, tag_keys, _boundaries)

    def set_default_tags(self, default_tags: dict) -> "Metric":
        """Tags used when a record does not give them; returns the metric."""
        for key, val in default_tags.items():
            if key not in self._tag_keys:
                raise ValueError(f"Unrecognized tag key {key}.")
            if not isinstance(val, str):
                raise TypeError(f"Tag values must be str, got {type(val)}.")
        self._default_tags = dict(default_tags)
        return self

    @property
    def info(self) -> dict:
        return {"name": self._name, "description": self._description,
                "tag_keys": self._tag_keys, "default_tags": self._default_tags}

    def _tags(self, tags: Optional[dict]) -> tuple:
        final = dict(self._default_tags)
        if tags:
            for key, val in tags.items():
                if key not in self._tag_keys:
                    raise ValueError(f"Unrecognized tag key {key}.")
                if not isinstance(val, str):
                    raise TypeError(f"Tag values must be str, got {type(val)}.")
            final.update(tags)
        missing = [k for k in self._tag_keys if k not in final]
        if missing:
            raise ValueError(f"Missing value for tag key(s): {','.join(missing)}.")
        return tuple(final[k] for k in self._tag_keys)


def _number(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be int or float, got {type(value)}.")


class Counter(Metric):
    """A cumulative count that only goes up."""

    _kind = "counter"

    def inc(self, value: float = 1.0, tags: Optional[dict] = None) -> None:
        _number(value)
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        _registry.record(self._name, self._tags(tags), lambda old: (old or 0) + value)

    def __reduce__(self):
        return Counter, (self._name, self._description, self._tag_keys)


class Gauge(Metric):
    """A value that is set (goes up and down)."""

    _kind = "gauge"

    def set(self, value: Optional[float], tags: Optional[dict] = None) -> None:
        if value is None:  # as in Ray: a no-op
            return
        _number(value)
        _registry.record(self._name, self._tags(tags), lambda old: value)

    def __reduce__(self):
        return Gauge, (self._name, self._description, self._tag_keys)


class Histogram(Metric):
    """Observations counted in buckets bounded by ``boundaries`` (increasing, > 0)."""

    _kind = "histogram"

    def __init__(self, name: str, description: str = "", boundaries: Optional[list] = None,
                 tag_keys: Optional[tuple] = None):
        if boundaries is None or len(boundaries) == 0:
            raise ValueError("boundaries argument should be provided when using the Histogram "
                             'class. e.g., Histogram("name", boundaries=[1.0, 2.0])')
        for i, b in enumerate(boundaries):
            _number(b)
            if b <= 0:
                raise ValueError(f"Invalid `boundaries` argument at index {i}, {boundaries}. "
                                 "Use positive values for the arguments.")
        if list(boundaries) != sorted(boundaries) or len(set(boundaries)) != len(boundaries):
            raise ValueError(f"boundaries must increase, got {boundaries}")
        self.boundaries = list(boundaries)
        super().__init__(name, description, tag_keys, tuple(self.boundaries))

    def observe(self, value: float, tags: Optional[dict] = None) -> None:
        _number(value)
        bounds = self.boundaries
        i = next((k for k, b in enumerate(bounds) if value <= b), len(bounds))

        def add(old):
            counts, total = old if old is not None else ([0] * (len(bounds) + 1), 0.0)
            counts = list(counts)
            counts[i] += 1
            return [counts, total + value]

        _registry.record(self._name, self._tags(tags), add)

    @property
    def info(self) -> dict:
        return {**super().info, "boundaries": self.boundaries}

    def __reduce__(self):
        return Histogram, (self._name, self._description, self.boundaries, self._tag_keys)


__all__ = ["Counter", "Gauge", "Histogram", "Metric"]
