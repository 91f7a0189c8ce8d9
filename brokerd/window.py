"""How many tasks the broker sends ahead to a busy pool executor: its *window*.

::

    DONE (plain task) --observe(fid, now - task.started)--> RunTimes: per function, the
                                                            moving average of its run time
    placement pass (brokerd/placement.py _prefetch) --window(ex, now)--> how many tasks
        ``ex`` may hold ahead (``Executor.ahead``, ASSIGNED) -- 1, or WINDOW when the task it
        runs is of a short function and has not run long; --short(fid)--> may this task
        go beyond the first slot

A busy executor is sent the next queued task of its shape before it is done, so it
starts it the moment the last ends instead of waiting a round trip through the broker
(one task ahead: the default, for any function). For a function whose runs are short
(a moving average under SHORT_S, learnt from its DONEs) the broker sends up to WINDOW
tasks ahead: the executor then gets several EXECs in one message (the outbox sends a
turn's messages to one client as one BATCH) and answers several DONEs in one message
(workerd/executor.py), a few wake-ups per batch instead of per task.

Head-of-line blocking stays bounded: only short functions ride beyond the first slot,
behind a task that is itself of a short function and has not been running for longer
than LONG_S (an unusually slow call of a usually fast function gets no more tasks
piled behind it). A task sent ahead has not started: it can still be cancelled (the
executor skips it), is handed back when its executor blocks in ``get``, and is queued
again elsewhere if its executor dies or retires (brokerd/engine.py).

The run time seen here is the broker's clock from the start (or promotion from
ASSIGNED) of a task to its DONE, so it includes the hop; DONEs that come together
make the earlier ones look longer and the later ones shorter: the average is what
counts. Owns: the averages, by function id (bounded by MAX_FUNCTIONS).
"""

from __future__ import annotations

import os

from brokerd.records import Executor

# ZRAY_EXEC_WINDOW=1 turns the window off (one task ahead, as for long functions).
WINDOW = max(1, int(os.environ.get("ZRAY_EXEC_WINDOW") or 8))
SHORT_S = 0.002  # a function whose average run is under this is short
LONG_S = 0.02  # a short function's call running this long gets nothing more behind it
ALPHA = 0.25  # weight of the newest run in the moving average
MAX_FUNCTIONS = 10_000


class RunTimes:
    """The moving average of each plain function's run time, as the broker sees it."""

    def __init__(self):
        self.avg: dict = {}  # fid -> seconds

    def observe(self, fid: bytes, seconds: float) -> None:
        avg = self.avg
        old = avg.get(fid)
        if old is None:
            if len(avg) >= MAX_FUNCTIONS:  # functions come and go: start over
                avg.clear()
            avg[fid] = seconds
        else:
            avg[fid] = old + ALPHA * (seconds - old)

    def short(self, fid: bytes) -> bool:
        t = self.avg.get(fid)
        return t is not None and t < SHORT_S

    def window(self, ex: Executor, now: float) -> int:
        """How many tasks ``ex`` may hold ahead now: 1, or WINDOW while it runs a short
        function's task that has not been running long."""
        cur = ex.task
        if (WINDOW == 1 or cur is None or not self.short(cur.spec.fid)
                or now - cur.started > LONG_S):
            return 1
        return WINDOW
