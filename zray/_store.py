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

Every directory here is private (``private_dir``): created 0700, and refused if
it exists but is a symlink, another user's, or writable by others. An object
file is unpickled by whoever reads it, so a store another local user can write
to would let them run code as the cluster's user. The node agent checks the
dirs when it creates them; every other process checks them before its first
read or write (``check_dirs``).

Between nodes an object travels as one blob (the file's bytes), lz4-compressed
when a sample shows that compression pays.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

import lz4.frame
import msgpack

from zray._procutil import private_dir, user_tmp_dir, write_private_file

MAGIC = b"ZRO1"
ALIGN = 64
INLINE_MAX = 100 * 1024  # values at least this big go to the store (measured: see DESIGN notes)
RAW = 0
LZ4 = 1
POOL_FRACTION = 0.2  # of the store limit, kept as recycled files
POOL_MAX_FILES = 64


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
    def write(self, oid: bytes, kind: int, frames: list) -> int:
        """Store frames as object ``oid``; returns its size in bytes."""
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
        fd = self._recycled(tmp, total)
        if fd is None:
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
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
        os.rename(tmp, self.path(oid))
        return total

    def _recycled(self, tmp: str, size: int):
        """Take over a freed file of about ``size`` bytes (its pages are warm), or None."""
        try:
            names = os.listdir(self.free_dir)
        except OSError:
            return None
        best = None
        for name in names:
            have = int(name.split("-", 1)[0])
            if size <= have <= 2 * size + 65536 and (best is None or have < best[0]):
                best = (have, name)
        if best is None:
            return None
        try:
            os.rename(os.path.join(self.free_dir, best[1]), tmp)  # atomic claim
        except OSError:
            return None  # another writer took it
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
        if best[0] != size:
            os.ftruncate(fd, size)
        return fd

    # --------------------------------------------------------------- read
    def read(self, oid: bytes):
        """(kind, frames) of a stored object, frames as read-only memoryviews.

        The views keep the file mapped and share-locked until the last one is gone.
        Raises FileNotFoundError when this node has no copy (in memory or spilled).
        """
        self.check_dirs()
        try:
            f = _open_read(self.path(oid))
        except FileNotFoundError:
            f = None
        if f is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            m = _Mapping(f.fileno(), 0, access=mmap.ACCESS_READ)
            m.file = f
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
        write_private_file(tmp, data)
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
        os.unlink(src)
        return len(data)

    def delete(self, oid: bytes) -> None:
        """Free an object: recycle its memory file if no one maps it, else unlink it."""
        path = self.path(oid)
        if not self._recycle(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
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
            size = os.fstat(fd).st_size
            pool = os.listdir(self.free_dir)
            pooled = sum(int(n.split("-", 1)[0]) for n in pool)
            if (len(pool) >= POOL_MAX_FILES or size < 65536
                    or pooled + size > POOL_FRACTION * (self.limit or 1 << 30)):
                return False
            os.rename(path, os.path.join(self.free_dir, f"{size}-{os.urandom(6).hex()}"))
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

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
