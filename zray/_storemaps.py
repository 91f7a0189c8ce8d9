"""Writers' kept mappings of the store's warm files: the fast write path of ``zray._store``.

Where an 8 MiB put's time went (this 2-core machine, tmpfs)::

    pwrite into the warm recycled file          0.75-0.97 ms
    mmap(MAP_POPULATE) of it + memcpy            1.1-1.6 ms
    memcpy into a mapping kept of it             0.25-0.32 ms

So a writer keeps, per process and node, the mappings of the recycled files it
wrote through, and the next time it claims one of them from ``<store>/free/``
it copies into the mapping it already has: no syscall per byte, no page faults.

How a mapping flows::

    ObjectStore.write ── claims free/<size>-<ino>-<rand> by rename (prefers an
         │               inode in this table: ``inodes()``)
         ├─ take(ino, need): the kept mapping, popped (this thread owns it) ─┐
         ├─ else map(fd, need): MAP_POPULATE, the file's pages are warm ────┤
         │                                  memcpy header and frames into it
         └─ keep(mapping) after the rename to the object's path  <──────────┘
    sweeper thread (while anything is kept): every SWEEP_S drops mappings of
    files the node unlinked (st_nlink 0: spilled, deleted, dropped from the
    pool) and those unused for IDLE_S; exits when the table is empty.

Why it is safe:

- Only a file's claimant writes into it (the claim is an atomic rename into
  the writer's own ``.tmp`` path), so a kept mapping is written only while its
  file is claimed; other processes' kept mappings of the same file sit idle.
- No page fault allocates: every page in ``[0, st_size)`` of a pooled file was
  written by its last writer, files in the pool only shrink (a writer
  truncates to its size, never above what it claimed), and a mapping is only
  used for ``need <= st_size``. So a full tmpfs cannot SIGBUS a copy; a mapping
  shorter than ``need`` is dropped and the file mapped again.
- A kept mapping of an unlinked file pins that file's pages: the sweeper and
  every write drop those (``sweep``), so the node's count of store bytes and
  what tmpfs holds differ for at most about ``SWEEP_S``. The table is bounded
  (``MAX_FILES`` mappings, ``max_bytes`` in all, least recently used out first).
- Readers never see these mappings: they map the object themselves, with the
  shared ``flock`` the node agent's recycling respects. A kept writer mapping
  holds no lock, so it does not stop the node from recycling the file.
- Each kept mapping holds two descriptors (ours for ``fstat``, mmap's own dup),
  so at most ``2 * MAX_FILES`` per process. A forked child drops its copies.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import weakref

log = logging.getLogger("zray.store")

MAX_FILES = 16  # kept mappings per process and node
SWEEP_S = 0.5  # how often the sweeper looks for unlinked files
IDLE_S = 10.0  # a mapping unused this long is dropped
PROBE_EVERY = 32  # while mappings do not pay, map one file in this many anyway

_tables: weakref.WeakSet = weakref.WeakSet()


class _Swept:
    """A table of kept mappings (``_kept``, under ``_lock``) whose ``sweep()`` a thread
    runs every SWEEP_S while anything is kept (``_sweeper``: the thread, or None)."""

    def _sweep_loop(self) -> None:
        while True:
            time.sleep(SWEEP_S)
            self.sweep()
            with self._lock:
                if not self._kept:
                    self._sweeper = None
                    return


class Kept:
    """One kept mapping: its file's descriptor, the mapping, its length and inode."""

    __slots__ = ("fd", "mm", "length", "ino", "used")

    def __init__(self, fd: int, mm: mmap.mmap, length: int, ino: int):
        self.fd, self.mm, self.length, self.ino = fd, mm, length, ino
        self.used = time.monotonic()

    def close(self) -> None:
        try:
            self.mm.close()
        finally:
            os.close(self.fd)


class WriterMaps(_Swept):
    """This process's kept mappings of one node's store files, by inode."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._kept: dict[int, Kept] = {}  # ino -> mapping, least recently used first
        self._sweeper: threading.Thread | None = None
        self.hits = self.maps = self.dropped = 0  # counters (tests, benchmarks)
        self._maps = self._hits = 0  # the same, halved at each probe (worth_mapping)
        self.skipped = 0  # files written without a mapping since the last probe
        _tables.add(self)

    def inodes(self) -> frozenset:
        """Inodes of the files this process has kept mappings of."""
        return frozenset(self._kept)

    def take(self, ino: int, need: int) -> Kept | None:
        """The kept mapping of file ``ino`` if it covers ``need`` bytes, removed from the
        table (the caller owns it until ``keep``); None otherwise."""
        with self._lock:
            k = self._kept.pop(ino, None)
        if k is None:
            return None
        if k.length < need:
            self._close(k)
            return None
        self.hits += 1
        self._hits += 1
        return k

    def worth_mapping(self) -> bool:
        """Whether a new mapping is likely to pay: it costs more than a pwrite and pays
        back only when this process claims the file again. While new mappings outnumber
        hits (more files in flight than the table keeps: a slow node, many sizes), the
        writer uses pwrite for files it has no mapping of, but every ``PROBE_EVERY``-th
        such file it maps anyway and halves both counts: what made mappings miss (a
        burst, a loaded node that recycled late) may be over. Without the probe one bad
        stretch turned the fast path off for good: the kept mappings idled out, none
        was made again, so none could ever hit (0 hits under load in the suite)."""
        if self._maps < 2 * self._hits + MAX_FILES:
            return True
        self.skipped += 1
        if self.skipped < PROBE_EVERY:
            return False
        self.skipped = 0
        self._maps //= 2
        self._hits //= 2
        return True

    def map(self, fd: int, ino: int, need: int) -> Kept:
        """Map ``need`` bytes of the open file ``fd`` (whose pages all exist), faulted in
        now. Takes over ``fd``: it is closed with the mapping."""
        mm = mmap.mmap(fd, need, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self.maps += 1
        self._maps += 1
        return Kept(fd, mm, need, ino)

    def keep(self, k: Kept) -> None:
        """Put a mapping (back) into the table, dropping the least recently used ones
        beyond ``MAX_FILES`` / ``max_bytes``; starts the sweeper."""
        if k.length > self.max_bytes:
            self._close(k)
            return
        k.used = time.monotonic()
        out = []
        with self._lock:
            self._kept.pop(k.ino, None)
            self._kept[k.ino] = k
            total = sum(x.length for x in self._kept.values())
            for ino in list(self._kept):
                if len(self._kept) <= MAX_FILES and total <= self.max_bytes:
                    break
                old = self._kept.pop(ino)
                total -= old.length
                out.append(old)
            start = self._sweeper is None
            if start:
                self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                                 name="zray-store-maps")
        for old in out:
            self._close(old)
        if start:
            self._sweeper.start()

    def discard(self, k: Kept) -> None:
        """Drop a mapping taken with ``take`` or made with ``map`` instead of keeping it."""
        self._close(k)

    def sweep(self, idle_s: float = IDLE_S) -> None:
        """Drop mappings of files the node has unlinked, and those unused for ``idle_s``."""
        now = time.monotonic()
        out = []
        with self._lock:
            for ino, k in list(self._kept.items()):
                try:
                    gone = os.fstat(k.fd).st_nlink == 0
                except OSError:
                    gone = True
                if gone or now - k.used > idle_s:
                    del self._kept[ino]
                    out.append(k)
        for k in out:
            self._close(k)

    def close(self) -> None:
        """Drop every kept mapping."""
        with self._lock:
            out = list(self._kept.values())
            self._kept.clear()
        for k in out:
            self._close(k)

    def _close(self, k: Kept) -> None:
        self.dropped += 1
        try:
            k.close()
        except (OSError, BufferError) as e:  # a view of it still lives: let GC unmap it
            log.debug("could not drop a kept store mapping: %s", e)



READ_KEEP = 8  # readers' mappings kept per process for the next read of the object
READ_KEEP_MIN = 1 << 20  # smaller objects are not kept: faulting them in costs little


class ReaderMaps(_Swept):
    """This process's mappings of objects it read lately, kept for the next read of the
    same object (a 50 MB argument passed to many tasks on one executor): a new mapping
    faults every page in again when the task reads it (~5 ms for 50 MB here, against
    ~1.5 ms on Ray, whose workers keep the whole store mapped). A kept mapping holds its
    file's shared ``flock`` like any reader's, so the node does not recycle that file
    while it is kept. Entries go when their file was unlinked (freed, spilled: checked at
    each hit and by the sweeper every SWEEP_S, so a freed object's pages are pinned for
    at most that long), after IDLE_S unused, and beyond READ_KEEP (least recently read
    first). Dropping an entry only drops the reference: a view the user still holds
    keeps the mapping until it goes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._kept: dict = {}  # oid -> [mapping (with .file), last used], oldest first
        self._sweeper: threading.Thread | None = None
        self.hits = 0
        _tables.add(self)

    def get(self, oid: bytes):
        """The kept mapping of ``oid``'s file, if its file is still the object's."""
        with self._lock:
            e = self._kept.pop(oid, None)
            if e is None:
                return None
            try:
                gone = os.fstat(e[0].file.fileno()).st_nlink == 0
            except (OSError, ValueError):
                gone = True
            if gone:
                return None
            e[1] = time.monotonic()
            self._kept[oid] = e  # (now the most recently read)
            self.hits += 1
            return e[0]

    def keep(self, oid: bytes, m) -> None:
        if len(m) < READ_KEEP_MIN:
            return
        with self._lock:
            self._kept.pop(oid, None)
            self._kept[oid] = [m, time.monotonic()]
            while len(self._kept) > READ_KEEP:
                del self._kept[next(iter(self._kept))]
            start = self._sweeper is None
            if start:
                self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                                 name="zray-store-reads")
        if start:
            self._sweeper.start()

    def sweep(self, idle_s: float = IDLE_S) -> None:
        now = time.monotonic()
        with self._lock:
            for oid, e in list(self._kept.items()):
                try:
                    gone = os.fstat(e[0].file.fileno()).st_nlink == 0
                except (OSError, ValueError):
                    gone = True
                if gone or now - e[1] > idle_s:
                    del self._kept[oid]

    def close(self) -> None:
        with self._lock:
            self._kept.clear()



def _after_fork_in_child() -> None:
    # The parent's mappings and descriptors were copied; the sweeper thread was not.
    for t in list(_tables):
        t._lock = threading.Lock()  # another thread may have held it at the fork
        if isinstance(t, ReaderMaps):  # (dropping the references is all it takes)
            t._kept.clear()
            t._sweeper = None
            continue
        kept = list(t._kept.values())
        t._kept.clear()
        t._sweeper = None
        for k in kept:
            try:
                k.close()
            except (OSError, BufferError):
                pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
