"""ObjectRef and ObjectRefGenerator: handles to values that may not exist yet."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os

from zray import _protocol as P
from zray import _runtime
from zray._ids import BaseID, JobID, TaskID
from zray._serialization import nested_collector

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
    return ObjectRef(oid, owner, _borrowed=True)


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
        nested = nested_collector()
        if nested is not None:
            nested.append(self.id)
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
    """Iterator of refs yielded by a ``num_returns="streaming"`` task, as they come."""

    def __init__(self, task_id: bytes, owner: bytes, client):
        self._task_id = task_id
        self._owner = owner
        self._client = client
        self._index = 0
        client.open_stream(task_id)

    def __iter__(self):
        return self

    def __next__(self) -> ObjectRef:
        return self._next(timeout=None)

    def _next(self, timeout):
        self._index += 1
        oid = self._client.next_stream_item(self._task_id, self._index, timeout)
        if oid is None:
            raise StopIteration
        return ObjectRef(oid, self._owner, self._client)

    def __aiter__(self):
        return self

    async def __anext__(self) -> ObjectRef:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self._next, None)
        except StopIteration:
            raise StopAsyncIteration from None

    def __del__(self):
        try:
            self._client.close_stream(self._task_id)
        except Exception:
            pass

    def __repr__(self):
        return f"ObjectRefGenerator({self._task_id.hex()})"
