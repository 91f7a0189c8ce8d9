"""The node agent's store I/O thread: spills, frees, restores and blob writes off its loop.

::

    broker --SPILL/FREE/FETCH/STORE--> node agent loop --submit()--> jobs (FIFO)
                                                                      |
                         store I/O thread: drains the jobs in a batch, in order
                                                                      |
    broker <--BLOB/STORED-- node agent loop <--forward()-- inproc PAIR <--'

Spilling a store full of 1 MB objects used to run on the agent's message loop:
one SPILL of a 2 GB store kept it busy for seconds, it missed its heartbeats
and the broker declared the node dead. Here the loop only queues the job and
goes back to heartbeats; this thread reads, compresses and writes the files
(file I/O and lz4 release the GIL). Jobs run one at a time in arrival order,
so a FREE or FETCH after a SPILL of the same object sees it spilled, and
whatever the thread drains at once runs as one batch (one log line per
batch). Its replies (BLOB, STORED) go back through an inproc PAIR socket that
the agent's loop polls next to its broker socket: only the loop's thread ever
touches the broker socket.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

import zmq

from zray import _protocol as P
from zray._store import ObjectStore

log = logging.getLogger("zray.node")

_STOP = object()


def thread_pipe(ctx: zmq.Context, name: str) -> tuple:
    """(loop end, thread end) of an inproc PAIR that carries a worker thread's replies to
    the node agent's loop, which alone touches the broker socket (``forward``)."""
    addr = f"inproc://zray-{name}-{os.getpid()}-{id(object())}"
    loop_end = ctx.socket(zmq.PAIR)
    loop_end.setsockopt(zmq.LINGER, 0)
    loop_end.bind(addr)
    thread_end = ctx.socket(zmq.PAIR)
    thread_end.setsockopt(zmq.LINGER, 0)
    thread_end.setsockopt(zmq.SNDHWM, 0)
    thread_end.connect(addr)
    return loop_end, thread_end


def forward(pipe: zmq.Socket, sock: zmq.Socket) -> None:
    """Send what came on ``pipe`` (a thread_pipe's loop end) on ``sock``, until empty."""
    while True:
        try:
            frames = pipe.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        sock.send_multipart(frames, copy=False)


class StoreIO:
    """One thread doing the node agent's store work; ``pipe`` carries its replies."""

    def __init__(self, store: ObjectStore, ctx: zmq.Context):
        self.store = store
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        # pipe: the agent's loop end; _out: used only by the thread from now on
        self.pipe, self._out = thread_pipe(ctx, "store-io")
        self.spilled = 0  # objects spilled so far
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="zray-store-io", daemon=True)
        self.thread.start()

    # ------------------------------------------------------ agent's loop side
    def submit(self, op: str, *args) -> None:
        """Queue a job: ("spill", oids), ("free", oids), ("fetch", oid, dest),
        ("store", oid, codec, payload), or from the Puller ("adopt", oid, tmp, size),
        ("pull_failed", oid, src, unreachable)."""
        self.jobs.put((op, *args))

    def forward(self, sock: zmq.Socket) -> None:
        """Send the thread's finished replies on ``sock`` (the agent's broker socket)."""
        forward(self.pipe, sock)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread: jobs not started yet are dropped (the node is going away)."""
        self.stopping = True
        self.jobs.put(_STOP)
        self.thread.join(timeout)
        if self.thread.is_alive():  # in one long job: it closes its socket when done
            log.warning("store I/O thread still busy at shutdown")
        self.pipe.close()

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._out.close()  # by this thread, which owns it (the context waits for it)

    def _serve(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while True:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            spilled = freed = 0
            for job in batch:
                if job is _STOP or self.stopping:
                    return
                try:
                    n = self._do(job)
                except Exception:  # one bad job must not stop the others
                    log.exception("store job %s failed", job[0])
                    continue
                if job[0] == "spill":
                    spilled += n
                elif job[0] == "free":
                    freed += n
            if spilled:
                self.spilled += spilled
                log.debug("spilled %d objects in a batch of %d jobs", spilled, len(batch))

    def _do(self, job) -> int:
        op = job[0]
        store = self.store
        if op == "spill":
            n = 0
            for oid in job[1]:
                if self.stopping:
                    break
                try:
                    if store.spill(oid):
                        n += 1
                except OSError:
                    log.exception("spilling %s failed", oid.hex())
            return n
        if op == "free":
            for oid in job[1]:
                store.delete(oid)
            return len(job[1])
        if op == "fetch":
            _, oid, dest = job
            try:
                codec, data = store.blob(oid)
            except OSError:
                self._out.send(P.encode(P.Blob(oid, dest, -1)))
                return 0
            self._out.send_multipart([P.encode(P.Blob(oid, dest, codec)), data], copy=False)
            return 1
        if op == "store":
            _, oid, codec, payload = job
            try:
                size = store.put_blob(oid, codec, payload)
            except OSError:
                log.exception("storing %s failed", oid.hex())
                size = -1
            self._out.send(P.encode(P.Stored(oid, size)))
            return 1
        if op == "adopt":  # a file pulled from another node (workerd/peer.py)
            _, oid, tmp, size = job
            try:
                os.rename(tmp, store.path(oid))
            except OSError:
                log.exception("storing pulled %s failed", oid.hex())
                store._unlink_counted(tmp, size)
                size = -1
            self._out.send(P.encode(P.Stored(oid, size)))
            return 1
        if op == "pull_failed":
            self._out.send(P.encode(P.PullFailed(job[1], job[2], job[3])))
            return 0
        raise ValueError(f"unknown store job {op!r}")
