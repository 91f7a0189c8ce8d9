"""How many tasks the broker sends ahead to a busy pool executor: its *window*.

::

    DONE (plain task) --observe(fid, now - task.started)--> RunTimes: per function, the
                                                            moving average of its run time
    placement pass (brokerd/placement.py _prefetch) --window(ex, now)--> how many tasks
        ``ex`` may hold ahead (``Executor.ahead``, ASSIGNED): 0 behind a call that has run
        longer than LONG_S, 1, or WINDOW behind a short function's call;
        --short(fid)--> may this task go beyond the first slot
    an executor goes idle, nothing queued for its shape (brokerd/engine.py _recall)
        --stalled(execs, now)--> RECALL to the executors whose tasks wait behind a long call

A busy executor is sent the next queued task of its shape before it is done, so it
starts it the moment the last ends instead of waiting a round trip through the broker
(one task ahead, for any function). For a function whose runs are short (a moving
average under SHORT_S, learnt from its DONEs) the broker sends up to WINDOW tasks
ahead: the executor then gets several EXECs in one message (the outbox sends a turn's
messages to one client as one BATCH) and answers several DONEs in one message
(workerd/held.py): a few wake-ups per batch instead of several per task.

Head-of-line blocking stays bounded: only short functions ride beyond the first slot,
behind a call of a short function, and nothing at all is sent behind a call that has
run longer than LONG_S (it may run for minutes; an unusually slow call of a usually
fast function included). What was sent before it turned long is RECALLed when an
executor of the same shape goes idle with nothing queued for it (or at the broker's
next liveness check, if the call turns long after that): the executor hands
back the tasks it has not started (REJECT) and they run on the idle one. A task is
recalled from an executor once. A task sent ahead has not started: it can still be
cancelled (the executor skips it), is handed back when its executor blocks in
``get``, and is queued again elsewhere if its executor dies or retires.

The run time seen here is the broker's clock from the start (or promotion from
ASSIGNED) of a task to its DONE, so it includes the hop; DONEs that come together
make the earlier ones look longer and the later ones shorter: the average is what
counts. Owns: the averages, by function id (bounded by MAX_FUNCTIONS), and which
tasks were recalled from which executor.
"""

from __future__ import annotations

from brokerd.records import Executor
from zray import _protocol as P
from zray._procutil import env_number


def read_env() -> tuple:
    """(WINDOW, SHORT_S, LONG_S) from the environment as it is now: a bad value is a
    ValueError naming its variable (zray.init checks them before it starts a cluster)."""
    return (env_number("ZRAY_EXEC_WINDOW", 8, 1, 1024, cast=int, what="a task count"),
            env_number("ZRAY_EXEC_SHORT_S", 0.002, 0.0, 86400.0, what="a time in seconds"),
            env_number("ZRAY_EXEC_LONG_S", 0.02, 0.0, 86400.0, what="a time in seconds"))


# WINDOW: tasks sent ahead to a busy executor; ZRAY_EXEC_WINDOW=1 turns the window off
# (one task ahead, as for long functions). A function whose average run is under SHORT_S
# is short; a call running longer than LONG_S gets nothing more sent behind it, and what
# waits behind it may be recalled. (ZRAY_EXEC_SHORT_S / ZRAY_EXEC_LONG_S: for tests that
# need a window to form at will.)
WINDOW, SHORT_S, LONG_S = read_env()
ALPHA = 0.25  # weight of the newest run in the moving average
MAX_FUNCTIONS = 10_000


class RunTimes:
    """The moving average of each plain function's run time, as the broker sees it."""

    def __init__(self):
        self.avg: dict = {}  # fid -> seconds
        self.recalled: set = set()  # (executor cid, task id) RECALLed (once each)
        self.flips = 0  # times a function became short (its executors' windows grew)

    def observe(self, fid: bytes, seconds: float) -> None:
        avg = self.avg
        old = avg.get(fid)
        if old is None:
            if len(avg) >= MAX_FUNCTIONS:  # functions come and go: start over
                avg.clear()
            new = avg[fid] = seconds
        else:
            new = avg[fid] = old + ALPHA * (seconds - old)
        if new < SHORT_S and (old is None or old >= SHORT_S):
            self.flips += 1

    def short(self, fid: bytes) -> bool:
        t = self.avg.get(fid)
        return t is not None and t < SHORT_S

    def stalled(self, execs, now: float) -> list:
        """[(executor, task ids)]: among ``execs`` (busy with one shape's tasks), those
        whose current task has run longer than LONG_S with tasks waiting behind it that
        were not recalled yet; recalling them lets an idle executor run them now."""
        out = []
        recalled = self.recalled
        for ex in execs:
            cur = ex.task
            if not ex.ahead or cur is None or now - cur.started <= LONG_S:
                continue
            cid = ex.cid
            ids = [t.task_id for t in ex.ahead if (cid, t.task_id) not in recalled]
            if ids:
                ids = ids[:P.RECALL_MAX]
                if len(recalled) > MAX_FUNCTIONS:  # (tasks long gone: start over)
                    recalled.clear()
                recalled.update((cid, t) for t in ids)
                out.append((ex, ids))
        return out

    def window(self, ex: Executor, now: float) -> int:
        """How many tasks ``ex`` may hold ahead now: none behind a call that has run longer
        than LONG_S, else 1, or WINDOW while it runs a short function's task."""
        cur = ex.task
        if cur is None or now - cur.started > LONG_S:
            return 0  # (what waits behind a long call is stuck there: send nothing)
        if WINDOW == 1 or not self.short(cur.spec.fid):
            return 1
        return WINDOW
