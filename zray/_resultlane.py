"""Result lanes: task results pushed to a same-node owner over a Unix stream, read by
the thread that waits for them.

::

    executor (ResultLanes.push)                             owner (ResultInbox)
    OBJ / BATCH of OBJs --AF_UNIX stream (zray/_lane.py)--> listener <store dir>/r-<owner cid>
                                                              |-- get() in the calling thread:
                                                              |   reads the lanes itself (wait)
                                                              '-- else the I/O thread reads them

Why (issue 14, ``single_client_tasks_sync``): one sync task round trip
(``ray.get(f.remote())``) cost ~500 us on this 2-core machine, all of it CPU time of
the processes on the way, one after the other (per-thread CPU from /proc over 3,000
round trips): broker main thread ~147 us and its libzmq I/O thread ~30 us, the
driver's main thread ~60 us, its zray I/O thread ~73 us and its libzmq I/O thread
~20 us, the executors ~170 us over their four threads. Wake-ups per round trip:
driver 4.6 (main 1.6, zray I/O 1.0, libzmq 2.0), broker 4.7, executors ~4.5. The
result's way back to its owner was: the executor's main thread -> its libzmq I/O
thread -> the owner's libzmq I/O thread -> the owner's zray I/O thread (decode,
file, notify) -> the waiting thread: four thread hand-overs and ~100 us of CPU for
a value of a few bytes.

A result lane carries the very message the PUSH carried (an OBJ, or the BATCH of
OBJs of held DONEs: workerd/held.py), checked by the same decode
(``Client._handle_batch``), on an AF_UNIX stream the executor's thread writes and
the waiting thread reads: one hand-over. The lanes' framing is zray/_lane.py's.

Who reads: ``read_lock`` is held by whoever reads the owner's result lanes. A thread
in ``get()`` whose missing refs are all results pushed to us (``AWAITING_PUSH``)
takes it (``wait``) and reads every lane until its values are in; values for other
waiters it files as the I/O thread would (and they are woken the same way). The I/O
thread polls the listener always and the lanes while no user thread reads them:
when it finds the lock taken it stands back (``parked``) and polls them again
after the next look at its poll set (``changed``), at once when results are still
on their way as the reader lets go, or when a waiter asks (``need_io``: a waiter
that could not take the lock, a future, ``wait()``, a second task in flight as one
is submitted: an owner submitting a burst must not leave its results unread, or
the executors' sends stall).
A value that comes another way while a thread reads the lanes (through the broker,
a direct actor call's lane or PULL): whoever files it pokes the reader (``poke``, at
the end of ``Client._handle_batch``).

Which results take a lane: a plain push (``Client.push_direct``). The DONEs held
back while tasks stream through (workerd/held.py) push their results on the PUSH
socket as before: there libzmq's I/O thread sends a stream of them for less of the
executor's CPU than a ``sendmsg`` each (cpu_split, batches of 1,000: executors 110 us
a task with lanes for everything, 94 without). Which gets read them: one of at most
WAIT_MAX refs (a larger get waits for the I/O thread, woken once for the last one).

Sender side (``ResultLanes``, in executors): one lane per owner, connected on the
first push (none: the owner has no listener; the PUSH socket is used, as before).
A push that the socket does not take at once is flushed here, waiting for the
socket up to FLUSH_TIMEOUT_S; past that the lane is closed (the owner drops the
cut message at EOF) and the push reported not sent, so the broker forwards the
value. Sends on a lane are serialised (``lock``): a push returns True only when
all of its bytes went.

``ZRAY_RESULT_LANES=0`` turns lanes off (no listener: executors use the PUSH).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

import zmq

from zray import _lane
from zray import _protocol as P

log = logging.getLogger("zray.resultlane")
ENABLED = os.environ.get("ZRAY_RESULT_LANES", "1") != "0"
FLUSH_TIMEOUT_S = 10.0
# A get() of at most WAIT_MAX refs reads the lanes itself (a sync loop); a larger one
# waits for the I/O thread as before (it is woken once, for the last result).
WAIT_MAX = 8
MAX_OWNERS = 256  # lanes an executor keeps open (the oldest go first)
_ZIN = zmq.POLLIN


def inbox_path(store_dir: str, owner: bytes) -> str:
    """Where ``owner``'s result lane listener is (in the node's private store dir)."""
    return os.path.join(store_dir, f"r-{owner.hex()}")


class ResultInbox:
    """The owner's end: a listener and the lanes executors opened to it (module doc)."""

    def __init__(self, client, path: str):
        self.client = client
        self.path = path
        self.listener = _lane.listen(path)
        self.lfd = self.listener.fileno()
        self.lanes: dict = {}  # fd -> _lane.Lane
        self.read_lock = threading.Lock()  # held by whoever reads the lanes
        self.parked = False  # the I/O thread stopped polling the lanes (a user thread reads)
        self.changed = True  # the I/O thread's poll set must be rebuilt
        self.reading = 0  # the ident of a user thread in wait(): poke it on other arrivals
        self.version = 0  # bumped when lanes come or go (the reader rebuilds its poll set)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = None
        self._polled = -1  # the version self._poller was built for

    @classmethod
    def open(cls, client, store_dir: str):
        """The inbox, or None when no listener could be made (results come by PUSH)."""
        path = inbox_path(store_dir, client.cid)
        try:
            return cls(client, path)
        except OSError as e:
            log.debug("no result lanes at %s (%s): results come by PUSH", path, e)
            return None

    # ------------------------------------------------------------ I/O thread
    def io_poll_set(self) -> list:
        """(I/O thread) [(fd, zmq poll events)]: the listener, and the lanes unless parked."""
        self.changed = False
        out = [(self.lfd, _ZIN)]
        if not self.parked:
            out.extend((fd, _ZIN) for fd in list(self.lanes))
        return out

    def on_ready(self, fd: int) -> None:
        """(I/O thread) ``fd`` is readable: accept, or read and file what came."""
        if fd == self.lfd:
            self._accept()
            return
        if not self.read_lock.acquire(False):  # a user thread reads them: stand back
            self.parked = True
            self.changed = True
            return
        try:
            lane = self.lanes.get(fd)
            if lane is not None:
                self._read(lane)
        finally:
            self.read_lock.release()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("result lane accept: %s", e)
                break
            sock.setblocking(False)
            lane = _lane.Lane(sock)
            self.lanes[lane.fd] = lane
            self.version += 1
            self.changed = True
        self.poke()  # a reader polls the new lane too

    def need_io(self) -> None:
        """A waiter cannot read the lanes itself: have the I/O thread poll them now."""
        if (self.parked or self.changed) and not self.read_lock.locked():
            # (changed: a reader let the lanes go; the I/O thread has not looked yet)
            self.parked = False
            self.changed = True
            self.client.wake_io()

    def poke(self) -> None:
        """Wake the user thread reading the lanes (``Client._handle_batch`` filed something
        it did not read itself: from the broker, a direct call's lane or PULL)."""
        reader = self.reading
        if reader and reader != threading.get_ident():
            try:
                os.write(self._wake_w, b"p")
            except BlockingIOError:
                pass

    # ------------------------------------------------------------ reading
    def _read(self, lane) -> None:
        """(holding read_lock) File the whole messages readable on ``lane`` now."""
        try:
            msgs = lane.read()
        except _lane.LaneClosed as e:
            if not self.client.closed:
                log.debug("result lane closed: %s", e)
            self._drop(lane)
            return
        if not msgs:
            return
        batch: list = []
        for parts in msgs:
            try:
                batch.extend(P.unbatch(parts))
            except P.ProtocolError as e:
                log.warning("dropping malformed message from a result lane: %s", e)
        if batch:
            self.client._handle_batch(batch)

    def _drop(self, lane) -> None:
        self.lanes.pop(lane.fd, None)
        self.version += 1
        self.changed = True
        lane.close()

    def wait(self, done, deadline) -> None:
        """(a user thread in get) Read the lanes here until ``done()``, the deadline, or
        the broker is lost; return at once if another thread reads them."""
        if not self.read_lock.acquire(False):
            return
        client = self.client
        self.reading = threading.get_ident()
        try:
            while not done():
                if client.broker_gone or client.closed:
                    return
                if self._polled != self.version:
                    self._poller = select.poll()
                    self._poller.register(self._wake_r, select.POLLIN)
                    for fd in list(self.lanes):
                        self._poller.register(fd, select.POLLIN)
                    self._polled = self.version
                wait = 1.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return
                for fd, _ in self._poller.poll(wait * 1000):
                    if fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    lane = self.lanes.get(fd)
                    if lane is not None:
                        self._read(lane)
        finally:
            self.reading = 0
            self.read_lock.release()
            if self.parked:
                # Poll them again at the I/O thread's next look; no wake-up now unless
                # results are still on their way (the next get() of a sync loop reads
                # them itself; a waiter asks with need_io, a burst of submits too).
                self.parked = False
                self.changed = True
                if client._awaiting:
                    client.wake_io()

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def close(self) -> None:
        for lane in list(self.lanes.values()):
            lane.close()
        self.lanes.clear()
        try:
            self.listener.close()
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class ResultLanes:
    """The executor's end: a lane to each same-node owner it pushed results to."""

    def __init__(self, store_dir: str):
        self.store_dir = store_dir
        self.lock = threading.Lock()
        self.lanes: dict = {}  # owner cid -> _lane.Lane, or None (no listener: PUSH)

    def push(self, owner: bytes, header: bytes, frames) -> bool | None:
        """Send one message to ``owner``'s inbox. True: sent whole; False: not sent (the
        broker forwards it); None: ``owner`` has no result lane (use the PUSH socket)."""
        with self.lock:
            lane = self.lanes.get(owner, False)
            if lane is False:
                lane = self._connect(owner)
            if lane is None:
                return None
            try:
                if lane.send(header, frames) or self._flush(lane):
                    return True
                log.warning("result lane to %s stuck for %.0fs: closed, the broker forwards",
                            owner.hex(), FLUSH_TIMEOUT_S)
            except _lane.LaneClosed:
                pass  # the owner left (or refused us): PUSH, as for an owner never seen
            lane.close()
            self.lanes[owner] = None
            return False

    def _connect(self, owner: bytes):
        """(under lock) A lane to ``owner``, or None when it has no listener."""
        if len(self.lanes) >= MAX_OWNERS:  # forget the oldest owners
            for old in list(self.lanes)[:MAX_OWNERS // 4]:
                gone = self.lanes.pop(old)
                if gone is not None:
                    gone.close()
        try:
            lane = _lane.connect(inbox_path(self.store_dir, owner))
        except OSError:
            lane = None
        self.lanes[owner] = lane
        return lane

    @staticmethod
    def _flush(lane) -> bool:
        """(under lock) Send what the socket did not take, waiting for it up to
        FLUSH_TIMEOUT_S; True when all went."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        poller = select.poll()
        poller.register(lane.fd, select.POLLOUT)
        while not lane.flush():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, 1.0) * 1000)
        return True

    def close(self) -> None:
        with self.lock:
            for lane in self.lanes.values():
                if lane is not None:
                    lane.close()
            self.lanes.clear()

