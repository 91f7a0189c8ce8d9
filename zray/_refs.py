"""ObjectRef, ObjectRefGenerator and DynamicObjectRefGenerator: handles to values that
may not exist yet, one at a time or as a generator task yields them."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os

from zray import _protocol as P
from zray import _runtime, _serialization
from zray._ids import BaseID, JobID, TaskID
from zray._serialization import _local, nested_collector

_NIL_OID = b"\xff" * P.OBJECT_ID_LEN


def check_session(refs) -> None:
    """Raise RaySystemError for a ref whose connection is closed: it came from a
    session that ``shutdown()`` ended (or from the parent of a forked process),
    so no cluster will ever resolve it; waiting would hang forever."""
    current = _runtime.client
    for r in refs:
        c = r._client
        if c is None or c is current or not c.closed:
            continue
        from zray.exceptions import RaySystemError

        if getattr(c, "forked", False):
            raise RaySystemError(
                f"{r!r} belongs to the zray connection of the process this one was forked "
                f"from (pid {os.getppid()}); zray cannot be used from a forked copy of a zray "
                f"process. Use the 'spawn' start method, or call zray.init() in the child.")
        raise RaySystemError(
            f"{r!r} belongs to a zray session that has been shut down (zray.shutdown()); "
            f"its value went with that session and no cluster can resolve it. Get values "
            f"before calling shutdown().")


def _rebuild_ref(oid: bytes, owner: bytes) -> "ObjectRef":
    pending = getattr(_local, "unpickled", None)  # unpickled_refs(), without the call
    if pending is None:
        return ObjectRef(oid, owner, _borrowed=True)
    # Inside deserialize(): counted with the value's other refs under one lock
    # (adopt_unpickled). Until then the ref has no client, so nothing can decref it, and
    # the list keeps it alive.
    ref = ObjectRef.__new__(ObjectRef)
    ref.id, ref.owner, ref._client = oid, owner, None
    pending.append(ref)
    return ref


def adopt_unpickled(refs: list) -> None:
    """Count the refs one deserialize() rebuilt (borrowed) and bind them to the client."""
    client = _runtime.client
    if client is None:
        return
    client.incref_many([r.id for r in refs])
    for r in refs:
        r._client = client


_serialization._adopt[0] = adopt_unpickled


class ObjectRef(BaseID):
    """A reference to an object in the cluster (a future of a task's return).

    Also Ray's ``ObjectID``: an id with ``binary()``, ``hex()``, ``is_nil()``,
    ``from_hex()`` and ``nil()``.
    """

    __slots__ = ("id", "owner", "_client", "__weakref__")
    SIZE = P.OBJECT_ID_LEN

    def __init__(self, oid: bytes, owner: bytes = b"", _client=None, _borrowed: bool = False):
        self.id = oid
        self.owner = owner
        client = _client if _client is not None else _runtime.client
        self._client = client
        if client is not None:
            client.incref(oid, _borrowed)

    def __del__(self):
        client = self._client
        if client is not None:
            try:
                client.decref(self.id)
            except Exception:
                pass

    def __reduce__(self):
        client = self._client
        if client is not None and client.direct is not None and self.id in client.direct.unregistered:
            client.direct.register(self.id)  # a direct call's result: the broker learns of it
        nested = nested_collector()
        if nested is not None:
            nested.append(self.id)
        else:
            # Pickled outside zray (out-of-band: cloudpickle.dumps by the user): nobody
            # can count where the bytes go, so the object is kept for the cluster's life
            # (Ray pins such objects too).
            client = self._client
            if client is not None:
                client.escape(self.id)
        return (_rebuild_ref, (self.id, self.owner))

    def __eq__(self, other):
        return isinstance(other, ObjectRef) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"ObjectRef({self.id.hex()})"

    def hex(self) -> str:
        return self.id.hex()

    def binary(self) -> bytes:
        return self.id

    def task_id(self) -> TaskID:
        """The task that made this object (a put's id names the put's own pseudo-task)."""
        return TaskID(P.task_of(self.id))

    def job_id(self) -> JobID:
        """The job of this ref. zray's object ids do not carry their job, as Ray's do:
        this is the job that the driver or task holding the ref works for, which is the
        ref's own job unless the ref was handed across jobs (through a detached actor)."""
        client = self._client or _runtime.client
        if client is None:
            raise RuntimeError("ObjectRef.job_id() needs a connected zray client: call "
                               "zray.init() first")
        return JobID(client.job_id)

    @classmethod
    def from_binary(cls, id_bytes: bytes) -> "ObjectRef":
        """A ref to the object with this id (as if unpickled here: the broker learns of it)."""
        return cls(cls._check(id_bytes), b"", _borrowed=True)

    @classmethod
    def from_hex(cls, hex_id: str) -> "ObjectRef":
        """A ref to the object whose id ``ref.hex()`` returned."""
        return cls(cls._bytes_of_hex(hex_id), b"", _borrowed=True)

    @classmethod
    def nil(cls) -> "ObjectRef":
        """The nil ref (every byte 0xff): it names no object and holds no reference."""
        ref = cls.__new__(cls)
        ref.id = _NIL_OID
        ref.owner = b""
        ref._client = None
        return ref

    def as_future(self) -> "asyncio.Future":
        """An asyncio future of the object's value, on the current event loop."""
        return asyncio.wrap_future(self.future())

    def future(self) -> concurrent.futures.Future:
        """A concurrent.futures.Future that completes with the object's value."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        check_session((self,))
        client = _runtime.require_client()
        client.add_done_callback(self, fut)
        return fut

    def __await__(self):
        return asyncio.wrap_future(self.future()).__await__()


class ObjectRefGenerator:
    """The refs a generator task yields, as they come (``num_returns="streaming"``, the
    default for a generator function or method): iterate it, or ``async for`` over it.

    Each item is an ObjectRef; an error the generator raised is its last item (``get``
    raises it), then iteration stops. ``completed()`` is a ref that is ready when the
    task is done: None, or the error when the task failed other than by raising (a
    crash, a cancel, a dead actor). Not thread-safe, and it cannot be pickled (Ray's
    rules).
    """

    def __init__(self, task_id: bytes, owner: bytes, client):
        self._task_id = task_id
        self._owner = owner
        self._client = client
        self._index = 0  # items taken
        client.open_stream(task_id)
        self._completed = ObjectRef(P.object_id(task_id, 0), owner, client)
        client.expect_push((self._completed.id,))

    def __iter__(self):
        return self

    def __next__(self) -> ObjectRef:
        ref = self._next(None)
        if ref is None:
            raise StopIteration
        return ref

    def _next(self, timeout):
        """The next item's ref, or None at the end (GetTimeoutError after ``timeout``)."""
        index = self._index + 1
        oid = self._client.next_stream_item(self._task_id, index, timeout)
        if oid is None:
            return None
        self._index = index
        return ObjectRef(oid, self._owner, self._client)

    def __aiter__(self):
        return self

    async def __anext__(self) -> ObjectRef:
        if self._client.stream_item_ready(self._task_id, self._index + 1):
            ref = self._next(None)  # there: no need for a thread
        else:
            ref = await asyncio.get_running_loop().run_in_executor(None, self._next, None)
        if ref is None:
            raise StopAsyncIteration
        return ref

    def completed(self) -> ObjectRef:
        """A ref that is ready once the task is done (None; the error if it crashed)."""
        return self._completed

    def next_ready(self) -> bool:
        """True if ``next()`` returns a ready item at once; False when it would wait, or
        when the generator is finished (see ``is_finished``)."""
        return not self.is_finished() and self._client.stream_item_ready(
            self._task_id, self._index + 1)

    def is_finished(self) -> bool:
        """True once the task ended and every item (its error included) was taken."""
        end = self._client.stream_end(self._task_id)
        return end is not None and self._index >= end

    def _wait_ready(self) -> bool:
        """For wait(): the next item is ready, or the stream ended (next() returns at once)."""
        return self._client.stream_item_ready(self._task_id, self._index + 1)

    def send(self, value):
        raise NotImplementedError("`gen.send` is not supported.")

    def throw(self, *args):
        raise NotImplementedError("`gen.throw` is not supported.")

    def close(self):
        raise NotImplementedError("`gen.close` is not supported.")

    async def asend(self, value):
        raise NotImplementedError("`gen.asend` is not supported.")

    async def athrow(self, *args):
        raise NotImplementedError("`gen.athrow` is not supported.")

    async def aclose(self):
        raise NotImplementedError("`gen.aclose` is not supported.")

    def __reduce__(self):
        raise TypeError("You cannot return or pass a generator to other task. "
                        "Serializing a ObjectRefGenerator is not allowed.")

    def __del__(self):
        try:
            self._client.close_stream(self._task_id)
        except Exception:
            pass

    def __repr__(self):
        return f"ObjectRefGenerator({self._task_id.hex()})"


class DynamicObjectRefGenerator:
    """The value of a ``num_returns="dynamic"`` task: the refs of the items its
    generator yielded (an error it raised is the last one), each taken once."""

    def __init__(self, refs):
        self._refs = collections.deque(refs)

    def __iter__(self):
        while self._refs:
            yield self._refs.popleft()

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self):
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"
