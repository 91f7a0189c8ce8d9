"""A node agent's peer service: its store served to other nodes, and pulls from theirs.

::

    other node's Puller --PEER_GET--> ROUTER (peer socket) --> PeerServer thread
                                         ticket checked, chunk read from the store file
                        <--PEER_CHUNK-- (or the spill file, restored once per pull)

    broker --PULL--> node agent loop --submit()--> Puller threads (PULLERS)
        DEALER per holder address --PEER_GET x WINDOW--> holder's peer socket
        chunks --pwrite--> <store>/<oid>.pull-<rand> --StoreIO "adopt"--> rename, STORED
        any failure (refused, not there, holder silent PULL_TIMEOUT_S)
            --StoreIO "pull_failed"--> PULL_FAILED: the broker moves it (FETCH/STORE)

Both run on threads of their own with a ZeroMQ context of their own, so the
agent's loop keeps its heartbeats and libzmq's I/O thread that carries the
broker socket does not also carry the bulk. Under CURVE (a tcp cluster without
``ZRAY_INSECURE``) the peer socket is a CURVE server with the cluster keys and
admits only holders of the cluster key; an ipc cluster's peer socket is an
``ipc://`` file in the node's private store directory. On top of that, every
request carries the broker's ticket (``zray._peer``): the server answers only
a node the broker told to fetch that object. A request that does not decode,
is not a PEER_GET, asks for too much or carries a ticket the broker did not
grant is dropped, counted and logged (once per kind), never answered.

Chunks are views of the object's file, mapped under a shared ``flock`` (so it
is not recycled under us while ZeroMQ still sends from it), sent without a
copy, or lz4-compressed when a sample says it pays (``compress_if_it_pays``),
each on its own. lz4 (which releases the GIL) runs on a small pool on each side
(``_peer.LZ4_THREADS``): the server thread hands a chunk to the pool and sends
it when a byte on its wake pipe says it is packed, and a puller hands each lz4
chunk that came to the pool to be decompressed and written at its offset, so
the chunks of a window are (de)compressed at once, in whatever order they end. A spilled object is restored
from its spill file into memory once per pull and served from there; it is
dropped after its last chunk (or after ``RESTORED_IDLE_S``).

The received chunks land in a private temporary file in the store; the store
I/O thread renames it into place and reports STORED, so a FREE or SPILL of
the object is ordered after it, as with STORE.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import mmap
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import lz4.frame
import zmq

from zray import _peer
from zray import _protocol as P
from zray._security import ServerAuth, load_key_file, needs_curve
from zray._store import LZ4, ObjectStore, _Mapping, compress_if_it_pays
from zray._xhost import route_ip as _route_ip  # (direct calls' listeners announce the same)

log = logging.getLogger("zray.node")

RESTORED_KEEP = 2  # spilled objects kept restored in memory while peers pull them
MAPPED_KEEP = 16  # memory files kept mapped while peers pull them
RESTORED_IDLE_S = 30.0  # (either, unused this long, is dropped)
PEER_SOCKETS = 32  # connections to holders a puller thread keeps open
MAX_PACKING = 64  # chunks a server has on its lz4 pool at most (then: on its own thread)
POOL_MIN = 256 << 10  # smaller chunks are compressed on the server thread
_STOP = object()


class PeerServer:
    """The node's store, served on a socket of its own to the nodes the broker names."""

    def __init__(self, store: ObjectStore, node_id: bytes, broker_address: str, ip: str):
        self.store = store
        self.node_id = node_id
        self.secret = _peer.new_secret()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4096)  # requests are small: drop anything else
        self.sock.setsockopt(zmq.IPV6, 1)  # tcp://*: IPv6 as well as IPv4 (a v6 broker route)
        self.auth = None
        if broker_address.startswith("tcp://"):
            if needs_curve(broker_address):
                self.auth = ServerAuth(self.ctx, self.sock, load_key_file())
            port = _peer.peer_port()
            if port:
                try:
                    self.sock.bind(f"tcp://*:{port}")
                except zmq.ZMQError as e:
                    if self.auth is not None:
                        self.auth.stop()
                    self.sock.close(0)
                    self.ctx.term()
                    raise RuntimeError(f"cannot listen for peer nodes on port {port} "
                                       f"(ZRAY_PEER_PORT): {e}") from None
            else:
                port = self.sock.bind_to_random_port("tcp://*")
            self.address = f"tcp://{_route_ip(broker_address, ip)}:{port}"
        else:
            path = os.path.join(store.dir, "peer.sock")
            if len(path) > 100:  # ipc paths are limited (~107 bytes): loopback instead
                port = self.sock.bind_to_random_port("tcp://127.0.0.1")
                self.address = f"tcp://127.0.0.1:{port}"
            else:
                self.address = f"ipc://{path}"
                self.sock.bind(self.address)
        self.dropped = 0  # bad requests so far
        self.drop_reasons: set = set()
        self.served = 0  # bytes of chunks sent (before compression)
        self.restored: OrderedDict = OrderedDict()  # oid -> [bytes, last use]
        self.mapped: OrderedDict = OrderedDict()  # oid -> [mapping, last use]
        self.stopping = False
        # chunks compressed on the lz4 pool (LZ4_THREADS), sent by the server thread when
        # a byte on the wake pipe says some are ready: [(identity, header, payload)]
        self.pool = _lz4_pool("zray-peer-lz4")
        self.packed: collections.deque = collections.deque()
        self.packing = 0  # chunks on the pool (bounded: MAX_PACKING, then inline)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.thread = threading.Thread(target=self._run, name="zray-peer-server", daemon=True)
        self.thread.start()

    def info(self) -> dict:
        """What NODE_HELLO tells the broker (only the broker: the secret mints tickets)."""
        return {"address": self.address, "secret": self.secret}

    def close(self) -> None:
        self.stopping = True
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()  # the thread's poll ends (ContextTerminated) and closes its socket
        self.thread.join(5)
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        os.close(self.wake_r)
        os.close(self.wake_w)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        last_expire = time.monotonic()
        logged_drops = 0
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        try:
            while not self.stopping:
                ready = dict(poller.poll(5000))
                if self.wake_r in ready:
                    self._send_packed()
                busy = self.sock in ready
                if time.monotonic() - last_expire > 5.0:
                    last_expire = time.monotonic()
                    self._expire()
                    if self.dropped != logged_drops:  # a flood: one line per 5 s at most
                        logged_drops = self.dropped
                        log.warning("dropped %d bad peer requests so far", self.dropped)
                if not busy:
                    continue
                while True:
                    try:
                        parts = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._handle(parts)
                    except zmq.ContextTerminated:
                        raise
                    except Exception:  # one bad request must not stop the service
                        log.exception("serving a peer request failed")
        except zmq.ContextTerminated:
            pass  # close(): the node is stopping
        finally:
            self.sock.close(0)

    def drop(self, why: str) -> None:
        self.dropped += 1
        kind = why.split(":")[0][:60]
        if kind not in self.drop_reasons and len(self.drop_reasons) < 100:
            self.drop_reasons.add(kind)
            log.warning("dropping a bad peer request: %s (dropped so far: %d)", why,
                        self.dropped)

    def _handle(self, parts: list) -> None:
        if len(parts) != 2:
            return self.drop(f"frames: {len(parts) - 1} frames, a PEER_GET has 1")
        try:
            m = P.decode(parts[1])
        except P.ProtocolError as e:
            return self.drop(str(e))
        if m.TYPE != P.Msg.PEER_GET:
            return self.drop(f"{m.TYPE.name} is not allowed on a peer socket")
        if not 0 < m.length <= _peer.MAX_CHUNK_BYTES:
            return self.drop(f"length: a chunk of 1..{_peer.MAX_CHUNK_BYTES} bytes expected")
        if not _peer.valid_ticket(self.secret, m.oid, m.node_id, m.ticket):
            if _peer.expired(m.ticket):
                return self.drop("ticket expired (or forged): a pull outlived its grant")
            return self.drop("ticket: not one the broker granted for this object and node")
        total, data = self._read(m.oid, m.offset, m.length)
        if data is None:
            self.sock.send_multipart([parts[0], P.encode(P.PeerChunk(m.oid, m.offset, 0, -1))])
            return None
        self.served += len(data)
        if self.pool is not None and self.packing < MAX_PACKING and len(data) >= POOL_MIN:
            self.packing += 1
            self.pool.submit(self._pack, parts[0], m.oid, m.offset, total, data)
            return None
        codec, payload = compress_if_it_pays(data)
        self.sock.send_multipart(
            [parts[0], P.encode(P.PeerChunk(m.oid, m.offset, total, codec)), payload], copy=False)
        return None

    def _pack(self, ident, oid: bytes, offset: int, total: int, data) -> None:
        """(lz4 pool) Compress a chunk if it pays; the server thread sends it."""
        try:
            codec, payload = compress_if_it_pays(data)
            self.packed.append((ident, P.encode(P.PeerChunk(oid, offset, total, codec)),
                                payload))
        except Exception:
            log.exception("compressing a chunk for a peer failed")
            self.packed.append((None, None, None))  # (counted off; the puller times out)
        finally:
            try:
                os.write(self.wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # (the pipe is full: the server thread is being woken already)

    def _send_packed(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        packed = self.packed
        while packed:
            ident, header, payload = packed.popleft()
            self.packing -= 1
            if ident is not None:
                self.sock.send_multipart([ident, header, payload], copy=False)

    def _read(self, oid: bytes, offset: int, length: int):
        """(object size, the chunk) from the memory file or the spill file; (0, None) if
        this node has no copy. A chunk of a memory file is a view of its mapping, sent
        without a copy."""
        data = self._mapped(oid)
        if data is None:
            data = self._restore(oid)
            if data is None:
                return 0, None
        total = len(data)
        end = min(total, offset + length)
        if end >= total:  # the last chunk: this pull is done with it
            self.mapped.pop(oid, None)
            self.restored.pop(oid, None)
        return total, memoryview(data)[offset:end]

    def _mapped(self, oid: bytes):
        """The object's memory file, mapped and share-locked (not recycled while a view
        of it lives: see zray._store), kept for the next chunks of the pull."""
        entry = self.mapped.get(oid)
        if entry is not None:
            entry[1] = time.monotonic()
            return entry[0]
        path = self.store.path(oid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        f = os.fdopen(fd, "rb")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            if os.stat(path).st_ino != st.st_ino or not st.st_size:
                f.close()  # recycled or freed between open and lock
                return None
            m = _Mapping(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            f.close()
            return None
        m.file = f  # the file (and its lock) lives as long as the mapping
        self.mapped[oid] = [m, time.monotonic()]
        while len(self.mapped) > MAPPED_KEEP:
            self.mapped.popitem(last=False)
        return m

    def _restore(self, oid: bytes):
        entry = self.restored.get(oid)
        if entry is not None:
            entry[1] = time.monotonic()
            return entry[0]
        try:
            fd = os.open(os.path.join(self.store.spill_dir, oid.hex()),
                         os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            data = lz4.frame.decompress(f.read())
        self.restored[oid] = [data, time.monotonic()]
        while len(self.restored) > RESTORED_KEEP:
            self.restored.popitem(last=False)
        return data

    def _expire(self) -> None:
        now = time.monotonic()
        for cache in (self.restored, self.mapped):
            for oid in [o for o, (_, t) in cache.items() if now - t > RESTORED_IDLE_S]:
                del cache[oid]


class PullError(Exception):
    """A pull that cannot finish; ``unreachable``: the holder never answered."""

    def __init__(self, why: str, unreachable: bool = False):
        super().__init__(why)
        self.unreachable = unreachable


class Puller:
    """Pulls objects the broker names (PULL) from other nodes' peer sockets."""

    def __init__(self, store: ObjectStore, node_id: bytes, broker_address: str, io):
        self.store = store
        self.node_id = node_id
        self.io = io  # workerd.storeio.StoreIO: adopts the pulled file, reports to the broker
        self.keys = load_key_file() if needs_curve(broker_address) else None
        self.ctx = zmq.Context()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.pulled = 0  # objects pulled so far
        self.failed = 0
        self.pool = _lz4_pool("zray-pull-lz4")  # chunks decompressed and written there
        self.threads = [threading.Thread(target=self._run, name=f"zray-puller-{i}", daemon=True)
                        for i in range(_peer.PULLERS)]
        for t in self.threads:
            t.start()

    def submit(self, m: P.Pull) -> None:
        self.jobs.put(m)

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(_STOP)
        for t in self.threads:
            t.join(2)
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.ctx.term()

    def _run(self) -> None:
        socks: dict = {}  # holder's address -> DEALER (this thread's own)
        try:
            while True:
                m = self.jobs.get()
                if m is _STOP:
                    return
                start = time.monotonic()
                try:
                    tmp, size = self._pull(socks, m)
                except Exception as e:  # (zmq.ContextTerminated too: the node is stopping)
                    self.failed += 1
                    sock = socks.pop(m.address, None)  # stale replies must not linger
                    if sock is not None:
                        sock.close(0)
                    log.warning("pulling %s from node %s failed (%s): the broker moves it",
                                m.oid.hex(), m.src.hex(), e)
                    self.io.submit("pull_failed", m.oid, m.src, getattr(e, "unreachable", False))
                    continue
                self.pulled += 1
                log.debug("pulled %s (%d bytes) from node %s in %.3fs", m.oid.hex(), size,
                          m.src.hex(), time.monotonic() - start)
                self.io.submit("adopt", m.oid, tmp, size)
        finally:
            for sock in socks.values():
                sock.close(0)

    def _socket(self, socks: dict, address: str) -> zmq.Socket:
        sock = socks.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, _peer.MAX_CHUNK_BYTES + 4096)
            sock.setsockopt(zmq.IPV6, 1)  # a holder's address may be IPv6 ([addr]:port)
            if self.keys is not None and address.startswith("tcp://"):
                sock.curve_serverkey = self.keys["server_public"].encode()
                sock.curve_publickey = self.keys["client_public"].encode()
                sock.curve_secretkey = self.keys["client_secret"].encode()
            sock.connect(address)
            if len(socks) >= PEER_SOCKETS:  # one per holder: keep the most recent ones
                socks.pop(next(iter(socks))).close(0)
            socks[address] = sock
        return sock

    def _pull(self, socks: dict, m: P.Pull) -> tuple:
        """Fetch ``m.oid`` into a private temporary file; (its path, its size)."""
        size = m.size
        if size <= 0:
            raise PullError("the broker gave no size")
        sock = self._socket(socks, m.address)
        self.store.check_dirs()
        tmp = f"{self.store.path(m.oid)}.pull-{os.urandom(4).hex()}"
        self.store.adjust(size)  # the node agent never waits: it may pass the limit
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        ok = False
        try:
            self._fetch_into(sock, m, fd, size)
            ok = True
        finally:
            os.close(fd)
            if not ok:
                self.store._unlink_counted(tmp, size)
        return tmp, size

    def _fetch_into(self, sock: zmq.Socket, m: P.Pull, fd: int, size: int) -> None:
        """Ask for the chunks, WINDOW in flight; each one that comes is written at its
        offset (an lz4 one decompressed first, on the pool when there is one, so the
        chunks of a window land at once while the next are asked for)."""
        chunk, window, timeout_ms = _peer.CHUNK_BYTES, _peer.WINDOW, int(_peer.PULL_TIMEOUT_S * 1000)
        asked: dict = {}  # offset -> length, in flight
        landing: collections.deque = collections.deque()  # futures of chunks on the pool
        next_off = received = 0
        answered = False
        try:
            while received < size:
                while landing and (landing[0].done() or len(landing) >= window
                                   or (not asked and next_off >= size)):
                    received += landing.popleft().result()  # (raises the chunk's error)
                if received >= size:
                    break
                while len(asked) < window and next_off < size:
                    n = min(chunk, size - next_off)
                    sock.send(P.encode(P.PeerGet(m.oid, self.node_id, m.ticket, next_off, n)))
                    asked[next_off] = n
                    next_off += n
                if not asked:
                    if not landing:
                        raise PullError(f"{received} of {size} bytes came, none is awaited")
                    continue  # all asked and answered: the landing ones are waited for
                if not sock.poll(timeout_ms):
                    raise PullError(f"no answer for {_peer.PULL_TIMEOUT_S:.0f}s", not answered)
                parts = sock.recv_multipart(copy=False)
                try:
                    r = P.decode(parts[0].buffer)
                except P.ProtocolError as e:
                    raise PullError(f"bad answer: {e}") from None
                answered = True
                if r.TYPE != P.Msg.PEER_CHUNK or r.oid != m.oid or r.offset not in asked:
                    continue  # a late answer to an earlier pull on this connection
                if r.codec < 0 or len(parts) != 2:
                    raise PullError("the holder has no copy")
                if r.total != size:
                    raise PullError(f"the holder's copy has {r.total} bytes, the broker said "
                                    f"{size}")
                n = asked.pop(r.offset)
                if r.codec == LZ4 and self.pool is not None:
                    landing.append(self.pool.submit(_land, fd, parts[1], LZ4, r.offset, n))
                else:
                    received += _land(fd, parts[1], r.codec, r.offset, n)
        finally:
            for f in landing:  # (the file is closed after: no write may still be running)
                f.exception()


def _land(fd: int, frame, codec: int, offset: int, n: int) -> int:
    """Write a received chunk (decompressed if lz4) at ``offset``; its length ``n``."""
    data = frame.buffer
    if codec == LZ4:
        data = lz4.frame.decompress(data)
    if len(data) != n:
        raise PullError(f"a chunk of {len(data)} bytes, {n} asked")
    written = 0
    while written < n:  # pwrite may write less than asked
        written += os.pwrite(fd, data[written:] if written else data, offset + written)
    return n


def _lz4_pool(name: str):
    """The lz4 pool of a peer server or a node's pullers; None: (de)compress inline."""
    if _peer.LZ4_THREADS <= 1:
        return None
    return ThreadPoolExecutor(_peer.LZ4_THREADS, thread_name_prefix=name)
