"""Values to frames and back: pickle protocol 5 with out-of-band buffers.

``serialize(value)`` returns ``frames = [pickle_bytes, *buffers]`` and the ids
of every ObjectRef pickled inside the value. Buffers (numpy arrays, bytes-like
objects exposing PickleBuffer) travel as their own ZeroMQ frames, so they are
never copied into the pickle stream and land as views on the receiving side.

Plain ``pickle`` is tried first (it is several times faster than cloudpickle's
pure-Python reducer hooks); cloudpickle takes over for what pickle cannot do
by reference (lambdas, closures, classes defined in ``__main__``).

``register_serializer`` (``zray.util``) adds a reducer for one class to this process's
table (``_reducers``): while the table is not empty, values are pickled by Picklers
whose dispatch table has those reducers first. The reducer writes the deserializer and
the serializer's output into the stream, so whoever unpickles needs no registration of
its own (as in Ray, registrations are per process: a task that returns such values
registers the serializer itself).
"""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
import threading
import traceback

import cloudpickle

from zray import exceptions
from zray._protocol import ERROR, VALUE
from zray._store import INLINE_MAX

_local = threading.local()


def nested_collector() -> list | None:
    return getattr(_local, "nested", None)


# zray._refs.adopt_unpickled, set when zray._refs is imported (it imports this module;
# only its _rebuild_ref fills the list this is called with)
_adopt: list = [None]


def unpickled_refs() -> list | None:
    """While ``deserialize`` runs: the list that ObjectRefs unpickled in this thread join,
    to be counted in one step when the value is whole (``_refs._rebuild_ref``)."""
    return getattr(_local, "unpickled", None)


class _CollectRefs:
    """Context: collect the ids of ObjectRefs pickled while it is active."""

    __slots__ = ("prev", "oids")

    def __enter__(self):
        self.prev = getattr(_local, "nested", None)
        self.oids = []
        _local.nested = self.oids
        return self.oids

    def __exit__(self, *exc):
        _local.nested = self.prev


# class -> reducer, from zray.util.register_serializer (this process only)
_reducers: dict = {}


class _PicklerWithReducers(pickle.Pickler):
    @property
    def dispatch_table(self):  # read once, when the pickler is made
        return collections.ChainMap(_reducers, copyreg.dispatch_table)


class _CloudPicklerWithReducers(cloudpickle.Pickler):
    @property
    def dispatch_table(self):
        return collections.ChainMap(_reducers, cloudpickle.Pickler.dispatch_table)


def _pickle_with(pickler_class, value, buffers: list) -> bytes:
    out = io.BytesIO()
    pickler_class(out, protocol=5, buffer_callback=buffers.append).dump(value)
    return out.getvalue()


def _dumps_with_reducers(value, buffers: list) -> bytes:
    try:
        data = _pickle_with(_PicklerWithReducers, value, buffers)
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    buffers.clear()
    return _pickle_with(_CloudPicklerWithReducers, value, buffers)


def _dumps(value, buffers: list) -> bytes:
    if _reducers:  # register_serializer was used in this process
        return _dumps_with_reducers(value, buffers)
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    buffers.clear()
    return cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)


def serialize(value, copy_buffers: bool = False) -> tuple[list, list]:
    """Return (frames, nested_oids) for ``value``.

    With ``copy_buffers`` the out-of-band buffers are copied once into bytes,
    so later changes to the caller's arrays cannot change the stored object.
    """
    if type(value) is bytes and len(value) >= BYTES_OUT_OF_BAND:
        # pickle writes bytes in-band: a copy of the whole value before the store write
        return [_BYTES_STUB, memoryview(value)], []
    buffers: list = []
    with _CollectRefs() as nested:
        data = _dumps(value, buffers)
    if buffers:
        if copy_buffers:
            frames = [data] + [bytes(b.raw()) for b in buffers]
        else:
            frames = [data] + [b.raw() for b in buffers]
    else:
        frames = [data]
    return frames, nested


class _OutOfBandBytes:
    """Pickles as ``bytes(<next out-of-band buffer>)``: a bytes value whose bytes travel
    as their own frame (pickle keeps ``bytes`` in-band, copied into its stream)."""

    __slots__ = ()

    def __reduce__(self):
        return bytes, (pickle.PickleBuffer(b""),)


# A top-level bytes value this big goes out-of-band: the store's threshold, so such a value
# is written to the store straight from the caller's object (and read back with one copy).
BYTES_OUT_OF_BAND = INLINE_MAX
_BYTES_STUB = pickle.dumps(_OutOfBandBytes(), protocol=5, buffer_callback=lambda b: False)


def deserialize(frames: list):
    """Rebuild a value from ``[pickle_bytes, *buffers]`` (bytes or zmq Frames).

    Buffers are handed to pickle read-only and uncopied, as Ray hands them over: a
    numpy array in a value (an argument, a ``get`` result) is a read-only view onto
    the message frame or the store's mapping, whatever its size."""
    prev = getattr(_local, "unpickled", None)
    refs = _local.unpickled = []
    try:
        if len(frames) == 1:
            return pickle.loads(_buf(frames[0]))
        return pickle.loads(_buf(frames[0]), buffers=[_readonly(f) for f in frames[1:]])
    finally:
        _local.unpickled = prev
        if refs:
            _adopt[0](refs)  # every ref is counted, even if loads raised


def _buf(frame):
    # zmq.Frame exposes .buffer; bytes and memoryviews are used as they are.
    return frame.buffer if hasattr(frame, "buffer") else frame


def _readonly(frame):
    # A zmq Frame's buffer is writable; bytes and store views are read-only already.
    if type(frame) is bytes:
        return frame
    return memoryview(_buf(frame)).toreadonly()


def serialize_error(exc: BaseException) -> list:
    """Frames for an exception value; falls back to a plain RayError if unpicklable."""
    try:
        return serialize(exc)[0]
    except Exception:
        return serialize(exceptions.RayError(f"{type(exc).__name__}: {exc}"))[0]


def task_error(exc: BaseException, function_name: str, pid: int, ip: str = "") -> tuple:
    """Wrap an exception raised by user code: (RayTaskError frames, its text). The text
    travels in the DONE header so that the broker never has to unpickle an error."""
    if isinstance(exc, (exceptions.RayTaskError, exceptions.RuntimeEnvSetupError)):
        err = exc  # a failed runtime_env is raised as it is, as in Ray
    else:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        cause = exc
        try:  # the cause must survive the trip (custom __init__ signatures may not)
            cloudpickle.loads(cloudpickle.dumps(exc))
        except Exception:
            cause = exceptions.RayError(f"{type(exc).__name__}: {exc}")
        err = exceptions.RayTaskError(function_name, tb, cause, pid, ip)
    exc.__traceback__ = None
    try:
        text = str(err)
    except Exception:
        text = f"{type(exc).__name__} (unprintable)"
    return serialize_error(err), text[:MAX_ERROR_TEXT]


MAX_ERROR_TEXT = 64 * 1024  # the broker keeps it in actor death reasons: bounded


def load_error(frames: list) -> BaseException:
    err = deserialize(frames)
    if isinstance(err, exceptions.RayTaskError):
        return err.as_instanceof_cause()
    return err


def dumps_function(fn) -> bytes:
    buf = io.BytesIO()
    cloudpickle.dump(fn, buf, protocol=5)
    return buf.getvalue()


__all__ = ["serialize", "deserialize", "serialize_error", "task_error", "load_error",
           "dumps_function", "VALUE", "ERROR"]
