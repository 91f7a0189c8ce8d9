"""What user code prints in an executor: to the executor's log file and to the driver.

::

    print() --> sys.stdout / sys.stderr (TaskStream)
                  |-- every write -----> the raw stream: this executor's log file
                  '-- whole lines -----> LogForwarder.forward --LOG--> broker --PRINT--> driver
                                           driver on this node: --LOG--> its result lane (or
                                           PUSH), the lease's lane (workerd/lease.py), or
                                           the lane its direct actor call came on

``ExecutorProcess`` replaces ``sys.stdout`` and ``sys.stderr`` with a
``TaskStream`` each. A write goes to the raw stream at once and is buffered
until a newline; complete lines go to the driver at the root of the current
call as one LOG, prefixed ``(name pid=N)`` (``!`` appended for stderr).
The executor flushes both streams when a call ends, so a partial last line
reaches the driver with the call, not with the next one.
A driver on this node gets the LOG straight, on the way its results come (a
result lane, else its PUSH socket; a leased executor's lane while leased to it):
then a line printed before a result is never overtaken by it (through the
broker it could be, and a driver that exited right after its ``get()`` lost it).

``LogForwarder.driver`` and ``prefix`` are set per call by the executor (the
driver and ``task`` in ``prepare``, the prefix by the task runner or at actor creation).
Before the first output of each call, the log file gets a marker line
``:task_name:<task id hex> <name>`` (never forwarded): ``zray logs --task-id`` finds
a task's lines by it. A call that prints nothing costs no marker.
Threaded and async actors write from several threads: each stream's buffer is
locked; the client's out socket locks itself.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Callable

from zray import _protocol as P
from zray._client import Client
from zray._logfiles import MARKER

# The call a line was printed in, where calls run side by side (an async actor's
# coroutines, a threaded actor's threads: each has a context of its own); unset for a
# call on the main thread, whose spec is ``LogForwarder.task``.
CALL: contextvars.ContextVar = contextvars.ContextVar("zray_call")


class LogForwarder:
    """Sends printed lines to the driver of the call that printed them."""

    def __init__(self, client: Client):
        self.client = client
        self.driver = b""  # cid of the driver at the root of the current call; b"": keep local
        self.prefix = ""  # "(name pid=N)": the task or actor class that prints
        self.task = None  # the spec of the current call (set in prepare)
        self.marked = None  # the spec whose marker the log file got last
        # (driver cid, Lane) while this executor is leased to that driver: its output goes
        # on the lease's lane, ahead of the result it prints before (workerd/lease.py)
        self.lane = None
        # a plain actor's direct calls (workerd/direct.py DirectServer): a call that came
        # on a lane from the driver gets its output on that lane, ahead of its result
        self.direct = None

    def mark(self, raw) -> None:
        """Write the current call's marker to the log file before its first output."""
        spec = self.task
        if spec is not self.marked and spec is not None:
            self.marked = spec
            try:
                raw.write(f"{MARKER}{spec.task_id.hex()} {spec.name}\n")
            except Exception:
                pass

    def forward(self, text: str, is_err: bool) -> None:
        driver = self.driver
        if driver and text.strip("\n"):
            prefix = self.prefix + ("!" if is_err else "")
            lane = self.lane
            try:
                if lane is not None and lane[0] == driver:
                    lane[1].send(P.encode(P.Log(driver, prefix, text)))
                    return
            except Exception:  # (the lane closed: its driver left; the broker's way then)
                pass
            header = P.encode(P.Log(driver, prefix, text))
            spec, direct = CALL.get(self.task), self.direct
            try:
                if (direct is not None and spec is not None and spec.owner == driver
                        and direct.log_on_lane(spec.task_id, header)):
                    return
            except Exception:
                pass
            try:
                # A driver on this node: straight to it, as its results go (a result lane,
                # else its PUSH socket). Through the broker, a line printed before the
                # result came after it, and a driver that ended right after its get()
                # lost it.
                if self.client.push_direct(driver, header, ()):
                    return
            except Exception:
                pass
            try:
                self.client.send(header)
            except Exception:
                pass


class TaskStream:
    """sys.stdout/err replacement: writes go to the raw stream, whole lines to ``forward``."""

    def __init__(self, forward: Callable[[str, bool], None], raw, is_err: bool,
                 mark: Callable[[object], None] | None = None):
        self.forward = forward
        self.mark = mark
        self.raw = raw
        self.is_err = is_err
        self.buf = []
        self.lock = threading.Lock()

    def write(self, s):
        if not s:
            return 0
        if self.mark is not None:
            self.mark(self.raw)
        try:
            self.raw.write(s)
        except Exception:
            pass
        with self.lock:
            self.buf.append(s)
            if "\n" not in s:
                return len(s)
            text = "".join(self.buf)
            cut = text.rfind("\n") + 1
            self.buf = [text[cut:]] if cut < len(text) else []
        self.forward(text[:cut], self.is_err)
        return len(s)

    def flush(self):
        with self.lock:
            text = "".join(self.buf)
            self.buf = []
        if text:
            self.forward(text, self.is_err)
        try:
            self.raw.flush()
        except Exception:
            pass

    def isatty(self):
        return False

    def fileno(self):
        return self.raw.fileno()

    @property
    def encoding(self):
        return getattr(self.raw, "encoding", "utf-8")
