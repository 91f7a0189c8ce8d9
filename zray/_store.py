"""The per-node object store: one file per object in shared memory, spilled to disk.

Layout on a node (``node`` = the node id in hex)::

    /dev/shm/zray-<uid>/<node>/<oid>        objects in memory (tmpfs)
    /tmp/zray-<uid>/spill/<node>/<oid>      spilled objects, lz4-compressed

An object file is ``MAGIC | u32 header length | msgpack [kind, [[offset, length]...]]``
followed by its frames, each aligned to 64 bytes, so a reader maps the file
and hands pickle 5 memoryviews into the mapping: a numpy array read from the
store is a read-only view onto shared memory, never a copy.

Writers write a temporary file and rename it, so a reader sees either nothing
or a whole object. Deleting (free) and spilling unlink the memory file; a
reader that already mapped it keeps a valid mapping, and a reader that comes
later falls back to the spill file. Only the node agent spills and deletes;
any process on the node may write new objects and read.

Fresh tmpfs pages cost: writing 8 MB into a new file runs at ~2 GB/s here,
into an existing one at ~12 GB/s. So a freed object's file is not deleted but
moved to ``<store>/free/`` (up to ``POOL_FRACTION`` of the store), and the
next writer of a similar size takes it over with an atomic rename. A file is
only recycled if no process maps it: readers hold a shared ``flock`` on it as
long as any view of the mapping lives, and the node agent recycles a file
only when it gets the exclusive lock without waiting; otherwise it unlinks it.

A pooled file is named ``<size>-<inode hex>-<random>``. A writer keeps the
mappings of the recycled files it wrote through (``zray._storemaps``), prefers
to claim one of those, and copies into the mapping: 8 MiB in ~0.3 ms against
~0.8-1 ms for ``pwrite`` (no syscall per chunk, no page faults). Kept mappings
of files the node has unlinked are dropped within about half a second, so
spilling and deleting still give the memory back.

Every directory here is private (``private_dir``): created 0700, and refused if
it exists but is a symlink, another user's, or writable by others. An object
file is unpickled by whoever reads it, so a store another local user can write
to would let them run code as the cluster's user. The node agent checks the
dirs when it creates them; every other process checks them before its first
read or write (``check_dirs``).

Back-pressure: ``<store>/.usage`` holds the bytes of the store's files (objects,
recycled files, files being written) as one little-endian i64 under an
exclusive ``flock``. A writer reserves its object's size there before it
writes; when that would pass the limit it first unlinks recycled files, then
asks for spilling (``on_full``: the client sends NEED_SPACE to the broker) and
waits until the node agent's spills bring the count down (at most
``PUT_WAIT_S``, then the put fails with ObjectStoreFullError). Spills and
deletes (node agent) subtract what they unlink. So a burst of puts is slowed
to the speed of spilling instead of overrunning the store; what can pass the
limit is one object per concurrent writer and blobs the node agent receives
from other nodes (it never waits).

Between nodes an object travels as one blob (the file's bytes), lz4-compressed
when a sample shows that compression pays.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time

import lz4.frame
import msgpack

from zray._procutil import private_dir, user_tmp_dir, write_private_file
from zray._storemaps import ReaderMaps, WriterMaps

MAGIC = b"ZRO1"
ALIGN = 64
INLINE_MAX = 100 * 1024  # values at least this big go to the store (measured: see DESIGN notes)
RAW = 0
LZ4 = 1
POOL_FRACTION = 0.2  # of the store limit, kept as recycled files
POOL_MAX_FILES = 64
# A file is mapped for writing only if it is at most this share of the bytes a process
# keeps mapped (``POOL_FRACTION`` of the store): an 800 MiB put into a 7 GB store
# rotates through files it could keep only one mapping of, and goes by pwrite.
MAPPED_SHARE = 4
USAGE = ".usage"  # the store's byte count (back-pressure, see above)
# How long a put waits for spilling to make room before ObjectStoreFullError.
PUT_WAIT_S = float(os.environ.get("ZRAY_PUT_WAIT_S") or 120.0)
_I64 = struct.Struct("<q")

log = logging.getLogger("zray.store")


class _Mapping(mmap.mmap):
    """An mmap that keeps its file (and the file's shared lock) open while it lives."""
_HDR = struct.Struct("<4sI")


def _roots() -> tuple:
    """(memory, spill) store roots of this user, each as (private dir, levels below it)."""
    tmp = user_tmp_dir()
    root = os.environ.get("ZRAY_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    shm = (os.path.join(root, f"zray-{os.getuid()}"), ()) if root else (tmp, ("store",))
    return shm, (tmp, ("spill",))


def check_roots() -> None:
    """Create this user's store roots, or raise UnsafePathError if one is not private."""
    for root, sub in _roots():
        private_dir(root, *sub)


class ObjectStore:
    """Files of one node's store; every process on the node opens its own instance."""

    def __init__(self, node_id: bytes, limit: int = 0):
        self.node_id = node_id
        self.limit = limit
        self.roots = _roots()
        node = node_id.hex()
        self.dir, self.spill_dir = (os.path.join(r, *sub, node) for r, sub in self.roots)
        self.free_dir = os.path.join(self.dir, "free")
        self.checked = False  # this process has made sure the dirs are private
        self._usage_fd = -1
        self._usage_lock = threading.Lock()
        self._writer_maps: WriterMaps | None = None  # built at the first write
        # mappings of objects read lately (zray._storemaps): executors only (they read the
        # same large argument task after task); a driver's put/get/free loop would keep
        # the freed files from being recycled
        self._reader_maps: ReaderMaps | None = None

    def create_dirs(self):
        """Create this node's dirs (private: see ``private_dir``), first removing
        those of dead nodes. Raises UnsafePathError naming a dir that is not private."""
        node = self.node_id.hex()
        for root, sub in self.roots:
            base = private_dir(root, *sub)
            _remove_stale(base)
            private_dir(base, node)
        private_dir(self.free_dir)
        for d in (self.dir, self.spill_dir):
            write_private_file(os.path.join(d, ".pid"), str(os.getpid()))
        self.checked = True
        self.adjust(-self.usage())  # a fresh store holds nothing

    def check_dirs(self):
        """Make sure (once per process) that this node's dirs are private before
        trusting a file in them; creates them if the node agent has not yet."""
        if not self.checked:
            for root, sub in self.roots:
                private_dir(root, *sub, self.node_id.hex())
            self.checked = True

    def path(self, oid: bytes) -> str:
        return os.path.join(self.dir, oid.hex())

    # -------------------------------------------------------------- write
    def write(self, oid: bytes, kind: int, frames: list, on_full=None) -> int:
        """Store frames as object ``oid``; returns its size in bytes. Waits while the
        store is over its limit (``on_full(nbytes)`` asks for spilling; see ``reserve``)."""
        self.check_dirs()
        lens = [memoryview(f).nbytes for f in frames]
        header = msgpack.packb([kind, lens])
        pos = _HDR.size + len(header)
        layout = []
        for n in lens:
            pos = (pos + ALIGN - 1) // ALIGN * ALIGN
            layout.append(pos)
            pos += n
        total = pos
        tmp = self.path(oid) + ".tmp"
        maps = self._maps()
        got = self._recycled(tmp, total, maps.inodes())
        have = got[0] if got else 0
        try:
            self.reserve(total - have, on_full)
        except OSError:
            if got:
                self._unlink_counted(tmp, have)
            raise
        if got is not None:
            k = self._claimed_mapping(maps, tmp, got[1], total)
            if k is not None:
                try:
                    mm = k.mm
                    head = _HDR.pack(MAGIC, len(header)) + header
                    mm[0:len(head)] = head
                    for off, f in zip(layout, frames, strict=True):
                        mv = memoryview(f).cast("B")
                        mm[off:off + mv.nbytes] = mv
                except (OSError, ValueError, TypeError, IndexError):
                    maps.discard(k)
                    self._unlink_counted(tmp, total)
                    raise
                os.rename(tmp, self.path(oid))
                maps.keep(k)
                return total
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, total)
            os.pwrite(fd, _HDR.pack(MAGIC, len(header)) + header, 0)
            for off, f in zip(layout, frames, strict=True):
                mv = memoryview(f).cast("B")
                done = 0
                while done < mv.nbytes:
                    done += os.pwrite(fd, mv[done:], off + done)
        except OSError:
            os.close(fd)
            self._unlink_counted(tmp, total)
            raise
        os.close(fd)
        os.rename(tmp, self.path(oid))
        return total

    def keep_reads(self) -> None:
        """Keep the mappings of large objects read (an executor's: zray._storemaps)."""
        if self._reader_maps is None:
            self._reader_maps = ReaderMaps()

    def _maps(self) -> WriterMaps:
        """This process's kept mappings of this node's files (see zray._storemaps); drops
        those of files the node has unlinked since."""
        maps = self._writer_maps
        if maps is None:
            maps = self._writer_maps = WriterMaps(0)
        maps.max_bytes = int(POOL_FRACTION * (self.limit or 1 << 30))
        maps.sweep()
        return maps

    def _claimed_mapping(self, maps: WriterMaps, tmp: str, ino: int, total: int):
        """A writable mapping of the claimed file ``tmp`` truncated to ``total`` bytes: the
        one this process kept of it, else a new one (its pages are warm). None (use pwrite)
        where the file is shorter than ``total`` (a copy could fault in new pages) or where
        a new mapping would not pay: mapping costs more than a pwrite and pays back only
        when this process claims the file again, which it can only do for files it can
        keep several mappings of (``MAPPED_SHARE``) and while its mappings get reused
        (``WriterMaps.worth_mapping``)."""
        k = maps.take(ino, total) if ino else None
        if k is not None:
            try:
                st = os.fstat(k.fd)
                if st.st_size >= total and st.st_ino == os.lstat(tmp).st_ino:
                    os.ftruncate(k.fd, total)
                    return k
            except OSError:
                pass
            maps.discard(k)
        if total > maps.max_bytes // MAPPED_SHARE or not maps.worth_mapping():
            return None  # a new mapping would not pay (see the docstring)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_size < total:
                os.close(fd)
                return None
            os.ftruncate(fd, total)
            return maps.map(fd, st.st_ino, total)
        except (OSError, ValueError):
            os.close(fd)
            return None

    def _recycled(self, tmp: str, size: int, mine=frozenset()):
        """Take over a freed file of about ``size`` bytes (its pages are warm), preferring
        one this process keeps a mapping of (``mine``: inodes): (its size, its inode or 0),
        or None. The caller truncates it to ``size``."""
        try:
            names = os.listdir(self.free_dir)
        except OSError:
            return None
        best = None
        for name in names:
            try:
                parts = name.split("-")
                have = int(parts[0])
                ino = int(parts[1], 16) if len(parts) == 3 else 0
            except ValueError:
                continue
            if size <= have <= 2 * size + 65536:
                rank = (ino not in mine, have)
                if best is None or rank < best[0]:
                    best = (rank, name, have, ino)
        if best is None:
            return None
        try:
            os.rename(os.path.join(self.free_dir, best[1]), tmp)  # atomic claim
        except OSError:
            return None  # another writer took it
        return best[2], best[3]

    # --------------------------------------------------------------- read
    def read(self, oid: bytes):
        """(kind, frames) of a stored object, frames as read-only memoryviews.

        The views keep the file mapped and share-locked until the last one is gone.
        Raises FileNotFoundError when this node has no copy (in memory or spilled).
        """
        self.check_dirs()
        kept = self._reader_maps
        m = kept.get(oid) if kept is not None else None
        if m is not None:  # read lately: its pages are mapped here already
            return parse(memoryview(m))
        try:
            f = _open_read(self.path(oid))
        except FileNotFoundError:
            f = None
        if f is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            m = _Mapping(f.fileno(), 0, access=mmap.ACCESS_READ)
            m.file = f
            if kept is not None:
                kept.keep(oid, m)
            return parse(memoryview(m))
        with _open_read(os.path.join(self.spill_dir, oid.hex())) as f:
            return parse(memoryview(lz4.frame.decompress(f.read())).toreadonly())

    def has(self, oid: bytes) -> bool:
        return (os.path.exists(self.path(oid))
                or os.path.exists(os.path.join(self.spill_dir, oid.hex())))

    # ------------------------------------------------------ blobs (transfer)
    def blob(self, oid: bytes) -> tuple[int, bytes]:
        """The object's file as one frame for the wire: (codec, bytes)."""
        self.check_dirs()
        try:
            with _open_read(self.path(oid)) as f:
                data = f.read()
        except FileNotFoundError:
            with _open_read(os.path.join(self.spill_dir, oid.hex())) as f:
                return LZ4, f.read()
        return compress_if_it_pays(data)

    def put_blob(self, oid: bytes, codec: int, payload) -> int:
        data = lz4.frame.decompress(payload) if codec == LZ4 else payload
        self.check_dirs()
        tmp = self.path(oid) + ".tmp"
        self.adjust(len(data))  # the node agent never waits: it may pass the limit
        try:
            write_private_file(tmp, data)
        except OSError:
            self._unlink_counted(tmp, len(data))
            raise
        os.rename(tmp, self.path(oid))
        return len(data)

    # ------------------------------------------- node agent: spill and free
    def spill(self, oid: bytes) -> int:
        """Move an object to disk (lz4). Returns bytes freed from memory."""
        self.check_dirs()
        src = self.path(oid)
        try:
            with _open_read(src) as f:
                data = f.read()
        except FileNotFoundError:
            return 0
        dst = os.path.join(self.spill_dir, oid.hex())
        write_private_file(dst + ".tmp", lz4.frame.compress(data, compression_level=0))
        os.rename(dst + ".tmp", dst)
        self._unlink_counted(src, len(data))
        return len(data)

    def delete(self, oid: bytes) -> None:
        """Free an object: recycle its memory file if no one maps it, else unlink it."""
        path = self.path(oid)
        if not self._recycle(path):
            try:
                size = os.lstat(path).st_size
            except FileNotFoundError:
                size = 0
            self._unlink_counted(path, size)
        try:
            os.unlink(os.path.join(self.spill_dir, oid.hex()))
        except FileNotFoundError:
            pass

    def _recycle(self, path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a reader maps it
            st = os.fstat(fd)
            size = st.st_size
            pool = os.listdir(self.free_dir)
            pooled = sum(int(n.split("-", 1)[0]) for n in pool)
            if (len(pool) >= POOL_MAX_FILES or size < 65536
                    or pooled + size > POOL_FRACTION * (self.limit or 1 << 30)):
                return False
            # the inode lets a writer that kept a mapping of this file find it again
            name = f"{size}-{st.st_ino:x}-{os.urandom(6).hex()}"
            os.rename(path, os.path.join(self.free_dir, name))
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    # ---------------------------------------------- usage (back-pressure)
    def _usage(self) -> int:
        if self._usage_fd < 0:
            self.check_dirs()
            self._usage_fd = os.open(os.path.join(self.dir, USAGE),
                                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        return self._usage_fd

    def usage(self) -> int:
        """Bytes of this node's store files in memory (objects, recycled, being written)."""
        with self._usage_lock:
            data = os.pread(self._usage(), 8, 0)
        return _I64.unpack(data)[0] if len(data) == 8 else 0

    def adjust(self, delta: int, limit: int = 0) -> bool:
        """Add ``delta`` to the usage count; with ``limit``, only if the count stays
        within it (or the store is empty). Returns whether it added."""
        with self._usage_lock:  # flock excludes other processes, not our other threads
            fd = self._usage()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                data = os.pread(fd, 8, 0)
                used = _I64.unpack(data)[0] if len(data) == 8 else 0
                if limit and delta > 0 and used > 0 and used + delta > limit:
                    return False
                os.pwrite(fd, _I64.pack(max(0, used + delta)), 0)
                return True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def reserve(self, nbytes: int, on_full=None, wait: float | None = None) -> None:
        """Count ``nbytes`` about to be written; while that would pass the limit, unlink
        recycled files, call ``on_full(bytes over)`` (every NEED_SPACE_S at most) and wait
        for spills. Raises OSError(ENOSPC) after ``wait`` (PUT_WAIT_S) seconds."""
        if not self.limit or nbytes <= 0:
            self.adjust(nbytes)
            return
        if self.adjust(nbytes, self.limit):
            return
        from zray._protocol import NEED_SPACE_S

        wait = PUT_WAIT_S if wait is None else wait
        deadline = time.monotonic() + wait
        asked = 0.0
        pause = 0.001
        while not self.adjust(nbytes, self.limit):
            if self._drop_recycled():
                continue
            now = time.monotonic()
            if now > deadline:
                raise OSError(errno.ENOSPC, f"the object store stayed over its limit of "
                              f"{self.limit / 1e6:.1f} MB for {wait:.0f} s (ZRAY_PUT_WAIT_S) "
                              "while waiting for spilling")
            if on_full is not None and now - asked >= NEED_SPACE_S:
                asked = now
                on_full(max(nbytes, self.usage() + nbytes - self.limit))
            time.sleep(pause)  # back-pressure: a put waits for the spills
            pause = min(pause * 2, 0.02)

    def _drop_recycled(self) -> bool:
        """Unlink one recycled file to make room; False if there is none."""
        try:
            names = os.listdir(self.free_dir)
        except OSError:
            return False
        for name in names:
            claim = os.path.join(self.free_dir, name)
            try:
                size = int(name.split("-", 1)[0])
                os.unlink(claim)  # fails if another process took it first
            except (OSError, ValueError):
                continue
            self.adjust(-size)
            return True
        return False

    def _unlink_counted(self, path: str, size: int) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        self.adjust(-size)

    def destroy(self) -> None:
        import shutil

        for d in (self.dir, self.spill_dir):
            shutil.rmtree(d, ignore_errors=True)


def _open_read(path: str):
    """Open an object file for reading, never through a symlink."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")


def parse(buf: memoryview):
    magic, hlen = _HDR.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ValueError("not a zray object")
    kind, lens = msgpack.unpackb(buf[_HDR.size:_HDR.size + hlen])
    pos = _HDR.size + hlen
    frames = []
    for n in lens:
        pos = (pos + ALIGN - 1) // ALIGN * ALIGN
        frames.append(buf[pos:pos + n])
        pos += n
    return kind, frames


def parse_blob(codec: int, payload):
    data = lz4.frame.decompress(payload) if codec == LZ4 else payload
    return parse(memoryview(data).toreadonly())


def compress_if_it_pays(data: bytes) -> tuple[int, bytes]:
    """lz4 when a 64 KiB sample shrinks below 90%; raw otherwise."""
    if len(data) < 4096:
        return RAW, data
    mid = len(data) // 2
    sample = data[mid:mid + 65536]
    if len(lz4.frame.compress(sample, compression_level=0)) > 0.9 * len(sample):
        return RAW, data
    return LZ4, lz4.frame.compress(data, compression_level=0)


def _remove_stale(parent: str) -> None:
    """Delete store dirs whose node agent died without cleaning up (e.g. SIGKILL)."""
    import shutil

    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        d = os.path.join(parent, name)
        try:
            with open(os.path.join(d, ".pid")) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
