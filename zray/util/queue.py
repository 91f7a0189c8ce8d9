"""``Queue``: a first-in first-out queue shared by drivers, tasks and actors, Ray's
``ray.util.queue.Queue``.

::

    Queue (any process; picklable)            _QueueActor (an async actor)
      put / get / *_nowait / *_batch  --call-->  asyncio.Queue(maxsize)
      put_async / get_async (await)   <-value--  blocking calls wait on the actor's
      qsize / empty / full / size                event loop, so many of them can
                                                 wait at once without a thread each

The items live in one actor; a ``Queue`` object is only a handle to it (it pickles
as the actor handle and ``maxsize``), so passing the queue to a task or an actor
shares it. A blocking ``put``/``get`` waits in the actor (``asyncio.wait_for`` with
the timeout), not in the caller, and the caller sees ``Full``/``Empty`` when the
wait runs out. An item (or room) that is there already is taken even with
``timeout=0``, as ``queue.Queue`` does (Ray 2.60 raises ``Empty``/``Full`` then:
``asyncio.wait_for`` with no time left gives up before it looks). ``actor_options`` are the options of that actor (``num_cpus``,
``name``, ``lifetime``, ...), checked as for any actor.
"""

from __future__ import annotations

import asyncio
import queue as _stdlib_queue
from collections.abc import Iterable
from typing import Any, Optional

from zray import _api


class Empty(_stdlib_queue.Empty):
    """Raised by a get when the queue has no item (at once or within the timeout)."""


class Full(_stdlib_queue.Full):
    """Raised by a put when the queue is full (at once or within the timeout)."""


class _QueueActor:
    """The actor that holds the items (async: blocked callers wait on its loop)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.items: asyncio.Queue = asyncio.Queue(maxsize)

    async def qsize(self) -> int:
        return self.items.qsize()

    async def empty(self) -> bool:
        return self.items.empty()

    async def full(self) -> bool:
        return self.items.full()

    async def put(self, item, timeout: Optional[float] = None) -> None:
        if not self.items.full():  # room now: even timeout=0 succeeds (as queue.Queue)
            self.items.put_nowait(item)
            return
        try:
            await asyncio.wait_for(self.items.put(item), timeout)
        except asyncio.TimeoutError:
            raise Full from None

    async def get(self, timeout: Optional[float] = None):
        if not self.items.empty():  # an item now: even timeout=0 gets it (as queue.Queue)
            return self.items.get_nowait()
        try:
            return await asyncio.wait_for(self.items.get(), timeout)
        except asyncio.TimeoutError:
            raise Empty from None

    async def put_nowait(self, item) -> None:
        try:
            self.items.put_nowait(item)
        except asyncio.QueueFull:
            raise Full from None

    async def put_nowait_batch(self, items: list) -> None:
        size = self.items.qsize()
        if self.maxsize > 0 and len(items) + size > self.maxsize:
            raise Full(f"Cannot add {len(items)} items to queue of size {size} "
                       f"and maxsize {self.maxsize}.")
        for item in items:
            self.items.put_nowait(item)

    async def get_nowait(self):
        try:
            return self.items.get_nowait()
        except asyncio.QueueEmpty:
            raise Empty from None

    async def get_nowait_batch(self, num_items: int) -> list:
        size = self.items.qsize()
        if num_items > size:
            raise Empty(f"Cannot get {num_items} items from queue of size {size}.")
        return [self.items.get_nowait() for _ in range(num_items)]


def _check_timeout(timeout: Optional[float]) -> None:
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"'timeout' must be a number or None, got {type(timeout).__name__}")
        if timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")


class Queue:
    """A FIFO queue in an actor, shared by whoever holds this object.

    ``maxsize`` <= 0 means unbounded. ``actor_options`` are passed to the actor's
    ``.options()`` (for example ``{"num_cpus": 1}`` or a ``name``)."""

    def __init__(self, maxsize: int = 0, actor_options: Optional[dict] = None) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"'maxsize' must be an int, got {type(maxsize).__name__}")
        if actor_options is not None and not isinstance(actor_options, dict):
            raise TypeError("'actor_options' must be a dict of actor options, got "
                            f"{type(actor_options).__name__}")
        self.maxsize = maxsize
        self.actor = _api.remote(_QueueActor).options(**(actor_options or {})).remote(maxsize)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """The number of items in the queue."""
        return _api.get(self._actor().qsize.remote())

    def qsize(self) -> int:
        """The number of items in the queue."""
        return self.size()

    def empty(self) -> bool:
        """Whether the queue has no item."""
        return _api.get(self._actor().empty.remote())

    def full(self) -> bool:
        """Whether the queue holds ``maxsize`` items."""
        return _api.get(self._actor().full.remote())

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Add ``item``; if the queue is full, wait up to ``timeout`` s (None: forever)
        for room when ``block``, else raise ``Full`` at once."""
        try:
            _api.get(self._put_ref(item, block, timeout))
        except Full:  # raised in the actor: the caller sees a plain Full, as in Ray
            raise Full from None

    async def put_async(self, item: Any, block: bool = True,
                        timeout: Optional[float] = None) -> None:
        """``put`` for asyncio code: awaits instead of blocking the thread."""
        try:
            await self._put_ref(item, block, timeout)
        except Full:
            raise Full from None

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return the oldest item; if there is none, wait up to ``timeout``
        s (None: forever) when ``block``, else raise ``Empty`` at once."""
        try:
            return _api.get(self._get_ref(block, timeout))
        except Empty:  # raised in the actor: the caller sees a plain Empty, as in Ray
            raise Empty from None

    async def get_async(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """``get`` for asyncio code: awaits instead of blocking the thread."""
        try:
            return await self._get_ref(block, timeout)
        except Empty:
            raise Empty from None

    def put_nowait(self, item: Any) -> None:
        """``put(item, block=False)``: ``Full`` if there is no room."""
        return self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable) -> None:
        """Add all ``items`` in order, or none of them (``Full``) if they do not fit."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        _api.get(self._actor().put_nowait_batch.remote(list(items)))

    def get_nowait(self) -> Any:
        """``get(block=False)``: ``Empty`` if there is no item."""
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> list:
        """Remove and return the ``num_items`` oldest items, or none (``Empty``) if the
        queue holds fewer."""
        if isinstance(num_items, bool) or not isinstance(num_items, int):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        return _api.get(self._actor().get_nowait_batch.remote(num_items))

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """End the queue's actor (its items are gone): at once with ``force``, else
        ask it to exit and kill it if it has not within ``grace_period_s`` seconds."""
        if self.actor is None:
            return
        if force:
            _api.kill(self.actor, no_restart=True)
        else:
            done = self.actor.__ray_terminate__.remote()
            ready, _ = _api.wait([done], timeout=grace_period_s)
            if not ready:
                _api.kill(self.actor, no_restart=True)
        self.actor = None

    def _actor(self):
        if self.actor is None:
            raise RuntimeError("This Queue has been shut down")
        return self.actor

    def _put_ref(self, item, block: bool, timeout):
        if not block:
            return self._actor().put_nowait.remote(item)
        _check_timeout(timeout)
        return self._actor().put.remote(item, timeout)

    def _get_ref(self, block: bool, timeout):
        if not block:
            return self._actor().get_nowait.remote()
        _check_timeout(timeout)
        return self._actor().get.remote(timeout)
