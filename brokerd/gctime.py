"""How much of the broker's time the cyclic garbage collector takes.

::

    gc (any generation) --callbacks "start"/"stop"--> GcClock: collections and seconds per generation
                                                          |
                                 Broker.stats() <---------+  (REQ stats; logged at shutdown)

The broker is a long-lived server whose tables hold few reference cycles:
``tune()`` moves the start-up objects out of the collector's way
(``gc.freeze``) and collects the young generation less often. The clock is what
the thresholds were chosen from (docs/NOTES.md, "Performance II"): two
``perf_counter`` readings per collection, nothing per allocation.

Owns: the collector's settings in the broker process and its running totals.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("zray.broker")

# gen0 every 50,000 net allocations (a few thousand tasks), gen1 every 20 of those,
# gen2 (everything) every 100 gen1 runs, and then only if the long-lived objects
# grew by a quarter (CPython's own rule).
GC_THRESHOLD = (50_000, 20, 100)


class GcClock:
    """Collections and seconds spent in them, per generation, since ``start``."""

    def __init__(self):
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        gen = info.get("generation", 0)
        if 0 <= gen <= 2:
            self.count[gen] += 1
            self.seconds[gen] += time.perf_counter() - self._t0

    def start(self) -> "GcClock":
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def report(self) -> dict:
        return {"gc_collections": list(self.count),
                "gc_ms": [round(s * 1000, 1) for s in self.seconds]}


def tune() -> None:
    """After start-up: freeze what exists, collect the young generation less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
