"""Id classes with Ray's names: JobID, NodeID, WorkerID, TaskID, ActorID (ObjectID is
ObjectRef, as in Ray).

Each wraps the bytes zray uses on the wire (see zray/_protocol.py), so the sizes
are zray's, not Ray's: a job id is 4 bytes, a node or worker (client) id
``ID_LEN``, a task id ``TASK_ID_LEN`` (an actor's id is the id of the task that
created it) and an object id ``OBJECT_ID_LEN``. The nil id of each class is all
0xff bytes, as in Ray.
"""

from __future__ import annotations

from zray import _protocol as P


class BaseID:
    """What every id offers: ``binary()``, ``hex()``, ``is_nil()``, and the class methods
    ``from_binary``, ``from_hex``, ``nil`` and ``size``. Subclasses set ``SIZE``."""

    __slots__ = ()
    SIZE = 0

    def binary(self) -> bytes:
        raise NotImplementedError

    def hex(self) -> str:
        return self.binary().hex()

    def is_nil(self) -> bool:
        return self.binary() == b"\xff" * self.SIZE

    @classmethod
    def size(cls) -> int:
        return cls.SIZE

    @classmethod
    def _check(cls, id_bytes) -> bytes:
        if not isinstance(id_bytes, bytes):
            raise TypeError(f"{cls.__name__} expects bytes, got {type(id_bytes).__name__}")
        if len(id_bytes) != cls.SIZE:
            raise ValueError(f"{cls.__name__} needs {cls.SIZE} bytes ({2 * cls.SIZE} hex "
                             f"digits), got {len(id_bytes)}")
        return id_bytes

    @classmethod
    def _bytes_of_hex(cls, hex_id) -> bytes:
        if not isinstance(hex_id, str):
            raise TypeError(f"{cls.__name__}.from_hex expects a str, got {type(hex_id).__name__}")
        try:
            return cls._check(bytes.fromhex(hex_id))
        except ValueError as e:
            raise ValueError(f"{cls.__name__}.from_hex({hex_id!r:.80}): {e}") from None


class _UniqueID(BaseID):
    """An id that is nothing but its bytes."""

    __slots__ = ("_id",)

    def __init__(self, id_bytes: bytes):
        self._id = self._check(id_bytes)

    def binary(self) -> bytes:
        return self._id

    @classmethod
    def from_binary(cls, id_bytes: bytes):
        return cls(id_bytes)

    @classmethod
    def from_hex(cls, hex_id: str):
        return cls(cls._bytes_of_hex(hex_id))

    @classmethod
    def nil(cls):
        return cls(b"\xff" * cls.SIZE)

    def __eq__(self, other):
        return type(other) is type(self) and other._id == self._id

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self._id)

    def __repr__(self):
        return f"{type(self).__name__}({self._id.hex()})"

    def __reduce__(self):
        return (type(self), (self._id,))


class JobID(_UniqueID):
    """A job: one driver and everything it started."""

    __slots__ = ()
    SIZE = 4


class NodeID(_UniqueID):
    """A node (one ``zray worker``)."""

    __slots__ = ()
    SIZE = P.ID_LEN


class WorkerID(_UniqueID):
    """A client process: a driver or an executor."""

    __slots__ = ()
    SIZE = P.ID_LEN


class TaskID(_UniqueID):
    """A task, actor creation or actor call: its submitter's id and a counter."""

    __slots__ = ()
    SIZE = P.TASK_ID_LEN


class ActorID(_UniqueID):
    """An actor: the id of the task that created it."""

    __slots__ = ()
    SIZE = P.TASK_ID_LEN
