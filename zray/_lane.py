"""Lanes: direct actor calls between two processes of one host over a Unix stream socket.

::

    caller (zray/_direct.py)                              actor's executor (workerd/direct.py)
    Lane.send(DCALL, frames) --AF_UNIX stream, framed--> listener <store dir>/f-<cid>:
                                                          Lane.read() -> [header, *frames]
    Lane.read() <--DDONE + frames (the thread that ran the call sends)--

Where one sync call's ~290 us went before lanes (2-core VM, py-spy --native, strace
-c -f, /proc CPU per thread; zray's client over ZeroMQ): caller main thread ~25 us
of Python to submit, the DCALL through the caller's and the executor's libzmq I/O
threads, ~40-50 us of Python in the executor (decode, run, encode), the DDONE back
through both libzmq I/O threads, then the caller's zray I/O thread (wake-up, decode,
file the value, notify) and a second wake-up of the waiting thread: per call ~11
poll, 13 getpid (libzmq's fork checks), 2 epoll_wait, 2 futex on the caller alone.
With lanes the round trip is the two processes' CPU time back to back (about 70 us
of Python in each): the wake-ups left are the two the call needs.

Why not ZeroMQ here: a ZeroMQ message crosses four extra threads per round trip
(each side's libzmq I/O thread, for the send and for the receive). Measured on
this 2-core machine, one request/reply between two Python processes: ZeroMQ
PUSH/PULL over ipc 66-160 us, plus 50-70 us when the caller is woken by an I/O
thread of its own (as zray's client did); an AF_UNIX socket read and written by
the threads themselves: about 10 us. A lane carries exactly the messages the
ZeroMQ direct path carries (DCALL, DDONE: zray/_protocol.py encodes and checks
them); only the framing is its own.

Frames on the wire::

    u32 n (1..MAX_FRAMES)   u32 len_1 ... u32 len_n   bytes_1 ... bytes_n

(little-endian). A message over MAX_MESSAGE_BYTES or with a bad frame count is a
protocol error: the reader closes the lane (the peer sees EOF), never raises
into its loop.

Neither side ever blocks on a send: what the socket does not take now waits in
``outq`` (in order; later sends queue behind it) and ``flush()`` sends it once
the socket is writable; whoever polls the lane asks for POLLOUT while
``pending()``. Sends take ``wlock`` (any thread); reads belong to whoever holds
``rlock`` (one thread at a time), so a caller's thread can read its own reply
while the client's I/O thread reads the lane whenever no thread does.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import struct
import threading

from zray import _protocol as P

MAX_FRAMES = 1 << 16
MAX_MESSAGE_BYTES = P.MAX_MESSAGE_BYTES
_U32 = struct.Struct("<I")
_CHUNK = 1 << 16  # bytes read per recv() when no large frame is being filled
_IOV_MAX = 512  # buffers per sendmsg() (the kernel's limit is 1024)


class LaneClosed(Exception):
    """The peer closed the lane, or it sent something that is not a lane message."""


def lane_path(address: str) -> str:
    """The lane of the executor whose ZeroMQ direct address is ``address``
    (``ipc://<dir>/a-<cid>`` -> ``<dir>/f-<cid>``); "" when it has none."""
    if not address.startswith("ipc://"):
        return ""
    d, name = os.path.split(address[6:])
    if not name.startswith("a-"):
        return ""
    return os.path.join(d, "f-" + name[2:])


def listen(path: str) -> socket.socket:
    """A non-blocking listening socket at ``path`` (in a private dir)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(128)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def connect(path: str) -> "Lane":
    """A lane to the listener at ``path``; OSError if none listens there (or its backlog
    is full: the caller takes another path rather than wait)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return Lane(s)


class Lane:
    """One end of a framed stream (module doc)."""

    __slots__ = ("sock", "fd", "wlock", "rlock", "outq", "closed", "_buf", "_fill", "_filled",
                 "_lens", "_n", "__weakref__", "owner", "poller", "last_send", "_eof",
                 "send_dead")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.wlock = threading.Lock()
        self.rlock = threading.Lock()
        self.outq: collections.deque = collections.deque()  # memoryviews not sent yet
        self.closed = False
        self._buf = bytearray()  # bytes read, not yet a whole message
        self._fill = None  # a large frame being read into place: (bytearray, parsed prefix)
        self._filled = 0
        self._lens = None
        self._n = 0
        self.owner = None  # whatever the user of the lane wants to find again
        self.poller = None  # a select.poll() of this lane for its reader (under rlock)
        self.last_send = 0.0  # (its user's: when it last sent)
        self._eof = ""  # why the lane ended, once whole messages read before it went out
        # the peer closed its end (a send failed): what it sent before is still to be read,
        # and EOF comes after it; nothing is sent any more
        self.send_dead = False

    # ------------------------------------------------------------------ send
    def send(self, header: bytes, frames=(), later: bool = False) -> bool:
        """Queue the message ``[header, *frames]`` and send what the socket takes now
        (``later``: nothing now; a ``flush()`` sends it). True when all of it went (or the
        thread sending now takes it); False when some waits for ``flush()``. LaneClosed when the peer is gone.

        Threads that send at once combine: one that finds another sending leaves its
        message queued, and the sender sends it with its own before letting go (one
        syscall, one wake-up of the peer, for a burst of replies)."""
        bufs = [None, header, *frames]
        lens = [memoryview(b).nbytes for b in bufs[1:]]
        bufs[0] = struct.pack("<%dI" % (len(lens) + 1), len(lens), *lens)
        if self.closed or self.send_dead:
            raise LaneClosed("the lane is closed")
        q = self.outq
        q.extend(bufs)  # (deque.extend: atomic; each message's buffers stay together)
        if later:
            return False
        if not self.wlock.acquire(False):
            return True  # the thread sending sends it too before letting go
        return self._drain()

    def _drain(self) -> bool:
        """(holding wlock, which it lets go) Send the queue; True when it is empty."""
        try:
            while True:
                empty = self._send_queue()
                self.wlock.release()
                if not empty or not self.outq or not self.wlock.acquire(False):
                    return empty and not self.outq
        except BaseException:
            self.wlock.release()
            raise

    def _send_queue(self) -> bool:
        """(holding wlock) Send from ``outq`` what the socket takes; True when all went."""
        if self.closed or self.send_dead:
            raise LaneClosed("the lane is closed")
        sock, q = self.sock, self.outq
        while q:
            bufs = [q[i] for i in range(min(len(q), _IOV_MAX))]
            try:
                sent = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                return False  # the socket is full: POLLOUT, then flush()
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    # the peer closed: its last messages (a LEASE end, replies) are still
                    # to be read, and then EOF says the lane is over (read())
                    self.send_dead = True
                    q.clear()
                raise LaneClosed(str(e)) from None
            for b in bufs:
                n = memoryview(b).nbytes
                if sent < n:  # the socket took what it could
                    if sent:
                        q[0] = memoryview(b).cast("B")[sent:]
                    return False
                sent -= n
                q.popleft()
        return True

    def pending(self) -> bool:
        """Bytes wait for the socket to be writable."""
        return bool(self.outq)

    def flush(self) -> bool:
        """Send what waits; True when nothing is left (or another thread is sending it)."""
        if not self.outq or self.closed or self.send_dead:
            return True
        if not self.wlock.acquire(False):
            return True  # the sender sends it before letting go
        return self._drain()

    # ------------------------------------------------------------------ read
    def read(self) -> list:
        """The whole messages readable now, each ``[header, *frames]`` (memoryviews);
        [] when none is whole yet. LaneClosed at EOF or on a malformed message; the whole
        messages read before the peer closed are returned first (the next read raises).
        (Whoever holds ``rlock``, or the lane's only reader.)"""
        if self._eof:
            raise LaneClosed(self._eof)
        out = []
        try:
            self._read_into(out)
        except LaneClosed as e:
            if not out:
                raise
            self._eof = str(e)  # a reply sent just before the peer died still counts
        return out

    def _read_into(self, out: list) -> None:
        sock = self.sock
        while True:
            if self._fill is not None:  # a large frame: read straight into its buffer
                target, _ = self._fill
                view = memoryview(target)[self._filled:]
                try:
                    n = sock.recv_into(view)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    raise LaneClosed(str(e)) from None
                if n == 0:
                    raise LaneClosed("the peer closed the lane")
                self._filled += n
                if self._filled < len(target):
                    continue
                out.append(self._finish_fill())
                continue
            try:
                data = sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise LaneClosed(str(e)) from None
            if not data:
                raise LaneClosed("the peer closed the lane")
            self._buf += data
            self._parse(out)

    def _parse(self, out: list) -> None:
        buf = self._buf
        pos = 0
        size = len(buf)
        while True:
            if size - pos < 4:
                break
            n = _U32.unpack_from(buf, pos)[0]
            if not 1 <= n <= MAX_FRAMES:
                raise LaneClosed(f"a lane message of {n} frames")
            head = 4 + 4 * n
            if size - pos < head:
                break
            lens = struct.unpack_from("<%dI" % n, buf, pos + 4)
            total = sum(lens)
            if total > MAX_MESSAGE_BYTES:
                raise LaneClosed(f"a lane message of {total} bytes")
            if size - pos - head < total:
                if total > _CHUNK:  # read the rest straight into place
                    body = bytearray(total)
                    have = size - pos - head
                    body[:have] = buf[pos + head:]
                    self._fill = (body, lens)
                    self._filled = have
                    pos = size
                break
            start = pos + head
            msg = bytes(buf[start:start + total])
            out.append(_split(msg, lens))
            pos = start + total
        if pos:
            del buf[:pos]

    def _finish_fill(self) -> list:
        body, lens = self._fill
        self._fill = None
        self._filled = 0
        return _split(body, lens)

    def close(self) -> None:
        with self.wlock:
            if self.closed:
                return
            self.closed = True
            self.outq.clear()
        try:
            self.sock.close()
        except OSError:
            pass


def _split(body, lens) -> list:
    view = memoryview(body)
    parts, pos = [], 0
    for n in lens:
        parts.append(view[pos:pos + n])
        pos += n
    return parts


def is_gone(e: OSError) -> bool:
    """The listener is not there (any more)."""
    return e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
