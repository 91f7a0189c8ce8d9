"""DONEs an executor holds back for a moment, to send several in one message.

::

    TaskRunner: a short task ends, the next EXEC already waits --> ResultSender --add--> items
    flush(): when the executor's queue runs dry, HOLD_MAX are held, the next task is not known
             to be short, the task blocks in get(), the process leaves, before any DONE sent
             directly, or from the watch thread once the oldest has waited HOLD_S:
        results for owners on this node --one PUSH per owner (one OBJ, or a BATCH of them)-->
        the DONEs --one message (one DONE, or a BATCH of them, pushed[] as the pushes went)--> broker

When the broker sends tiny tasks ahead in a window (brokerd/window.py), an
executor runs several in a row. Sending each one's DONE (and its result to a
local owner) as it ends costs two messages per task, each a send syscall and a
wake-up of libzmq's I/O thread here and a receive at the other end. Held back
while the next task is already queued, they go out as one BATCH to the broker
(which handles each DONE in order, as if it had come alone) and one per owner.

What is held: the DONE of a plain task that returned (or raised) without refs
inside its results, ran under SHORT_S, and was followed by an EXEC already
queued. DONEs are flushed in the order they were made, before any DONE that
is not held, so the broker sees them in the order the tasks ran (it starts the
task it sent ahead next when the previous one is DONE). A DONE never waits
for long: the executor flushes before a task whose function did not run short
here last time, and the watch thread flushes what has waited HOLD_S (a usually
short function that runs long this time holds the DONEs before it that long).

Owns: the held items and their lock (the main thread adds, the main thread,
a thread blocking in ``get`` and the watch thread flush).
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from zray import _protocol as P
from zray._procutil import env_number

log = logging.getLogger("zray.executor")


def read_env() -> int:
    """HOLD_MAX from the environment as it is now: a bad value is a ValueError naming
    ZRAY_EXEC_HOLD (checked by zray.init and the node agent before executors start)."""
    return env_number("ZRAY_EXEC_HOLD", 4, 1, 1024, cast=int, what="a count of DONEs")


# DONEs held at most (the broker's window is 8: it refills while we run);
# ZRAY_EXEC_HOLD=1 sends every DONE at once.
HOLD_MAX = read_env()
SHORT_S = 0.001  # a task that ran under this may have its DONE held
HOLD_S = 0.01  # a DONE waits about this long at most (the watch thread's period)
_SIGNALS = {signal.SIGUSR1}  # a cancel must not cut a multipart message in two


class HeldDones:
    """The DONEs (and pushes to local owners) an executor has not sent yet."""

    def __init__(self, client):
        self.client = client
        self.items: list = []  # (spec, layout, frames, nested, retryable, text, pushable)
        self.since = 0.0  # when the oldest item was added
        self.lock = threading.Lock()
        self.armed = threading.Event()  # something is held: the watch thread looks later
        self.sent = 0  # flushes that sent more than one DONE (tests, benchmarks)
        threading.Thread(target=self._watch, name="zray-held", daemon=True).start()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: tuple) -> None:
        with self.lock:
            if not self.items:
                self.since = time.monotonic()
                self.armed.set()
            self.items.append(item)

    def flush(self, masked: bool = False) -> None:
        """Send everything held (any thread). ``masked``: from a running task's thread,
        where a cancel's signal may raise (elsewhere its handler does nothing)."""
        if not self.items:
            return
        if not masked:
            with self.lock:
                self._flush_locked()
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            with self.lock:
                self._flush_locked()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _flush_locked(self) -> None:
        items, self.items = self.items, []
        if not items:
            return
        client = self.client
        by_owner: dict = {}  # owner -> [OBJ (header, frames)]
        for spec, layout, frames, _n, _r, _t, pushable in items:
            if not pushable:
                continue
            msgs = by_owner.setdefault(spec.owner, [])
            pos = 0
            for i, (kind, n, node_id, _) in enumerate(layout, 1):
                msgs.append((P.encode(P.Obj(P.object_id(spec.task_id, i), kind, node_id, None)),
                             frames[pos:pos + n]))
                pos += n
        went = {}
        for owner, msgs in by_owner.items():
            # (the PUSH, not a result lane: held DONEs mean tasks stream through, where
            # libzmq's I/O thread sends for us more cheaply; zray/_resultlane.py)
            if len(msgs) == 1:
                went[owner] = client.push_direct(owner, msgs[0][0], msgs[0][1], lane=False)
            else:
                parts = P.encode_batch(msgs)
                went[owner] = client.push_direct(owner, parts[0], parts[1:], lane=False)
        dones = []
        for spec, layout, frames, nested, retryable, text, pushable in items:
            pushed = [went[spec.owner]] * len(layout) if pushable else []
            dones.append((P.encode(P.Done(spec.task_id, layout, nested, retryable, pushed, text)),
                          frames))
        if len(dones) == 1:
            client.send(*dones[0])
        else:
            parts = P.encode_batch(dones)
            client.send(parts[0], parts[1:])
            self.sent += 1

    def _watch(self) -> None:
        """Flush what has waited HOLD_S (the next task ran longer than it promised).
        While tasks stream through, it wakes about once per HOLD_S, not once per task."""
        armed = self.armed
        while True:
            armed.wait()
            time.sleep(HOLD_S)
            with self.lock:
                if self.items and time.monotonic() - self.since >= HOLD_S:
                    try:
                        self._flush_locked()
                    except Exception:  # (the client closed under us: the process ends)
                        log.warning("could not send held DONEs", exc_info=True)
                        self.items = []
                if not self.items:
                    armed.clear()
