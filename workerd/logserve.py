"""The node agent's log reader: LOG_READ answered on a thread of its own.

::

    broker --LOG_READ--> node agent loop --submit()--> jobs (FIFO)
                                                          |
                  log thread: zray._logfiles.serve(op, args), one job at a time
                                                          |
    broker <--LOG_DATA-- node agent loop <--forward()-- inproc PAIR <--'

A ``zray logs --task-id`` search reads every executor log of the node (up to the
rotation limits: gigabytes). On the agent's loop that would stall its heartbeats
and executors; here the loop only queues the request. Answers go back through an
inproc PAIR the loop polls, so only the loop's thread touches the broker socket.
At most ``MAX_QUEUED`` requests wait; more are answered at once with an error (the
broker relays at most one per client request, so this bounds a flood, not use).
"""

from __future__ import annotations

import logging
import queue
import threading

import zmq

from workerd.storeio import forward, thread_pipe
from zray import _logfiles
from zray import _protocol as P

log = logging.getLogger("zray.node")

MAX_QUEUED = 64
_STOP = object()


class LogServer:
    def __init__(self, log_dir: str, ctx: zmq.Context):
        self.log_dir = log_dir
        self.jobs: queue.Queue = queue.Queue()
        self.pipe, self._out = thread_pipe(ctx, "log-serve")  # the loop's end, the thread's
        self.thread = threading.Thread(target=self._run, name="zray-log-serve", daemon=True)
        self.thread.start()

    # ------------------------------------------------------ agent's loop side
    def submit(self, m: P.LogRead) -> bytes | None:
        """Queue a LOG_READ; returns an immediate LOG_DATA refusal when too many wait."""
        if self.jobs.qsize() >= MAX_QUEUED:
            return P.encode(P.LogData(m.req_id, False, "the node has too many log reads "
                                                       "in progress; try again"))
        self.jobs.put(m)
        return None

    def forward(self, sock: zmq.Socket) -> None:
        forward(self.pipe, sock)

    def close(self, timeout: float = 2.0) -> None:
        self.jobs.put(_STOP)
        self.thread.join(timeout)
        self.pipe.close()

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while True:
                m = self.jobs.get()
                if m is _STOP:
                    return
                try:
                    result, ok = _logfiles.serve(self.log_dir, m.op, m.args), True
                except (OSError, ValueError) as e:
                    result, ok = f"{type(e).__name__}: {e}", False
                except Exception as e:  # a bug in one read must not stop the others
                    log.exception("log read %s failed", m.op)
                    result, ok = f"{type(e).__name__}: {e}", False
                self._out.send(P.encode(P.LogData(m.req_id, ok, result)))
        finally:
            self._out.close()
