"""Exceptions raised by zray, with Ray Core's names and class hierarchy.

``RayTaskError.as_instanceof_cause()`` builds a class that derives from both
``RayTaskError`` and the user's exception class, so ``except ValueError`` and
``except zray.exceptions.RayTaskError`` both catch a remote ``ValueError``.
"""

from __future__ import annotations

from typing import Optional


class RayError(Exception):
    """Base class of every zray error."""


class RaySystemError(RayError):
    """An internal error of the zray runtime."""


class RayTaskError(RayError):
    """A task or actor method raised; ``cause`` is the original exception."""

    def __init__(
        self,
        function_name: str = "",
        traceback_str: str = "",
        cause: Optional[BaseException] = None,
        pid: int = 0,
        ip: str = "",
    ):
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.pid = pid
        self.ip = ip
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"{type(self.cause).__name__ if self.cause else 'RayTaskError'}"
        return (
            f"{head}: {self.function_name}() failed (pid={self.pid}, ip={self.ip})\n"
            f"{self.traceback_str}".rstrip()
        )

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self):
        return (
            _rebuild_task_error,
            (self.function_name, self.traceback_str, self.cause, self.pid, self.ip),
        )

    def as_instanceof_cause(self) -> "RayTaskError":
        """Return an equivalent error that is also an instance of the cause's class."""
        cause_cls = type(self.cause) if self.cause is not None else None
        if cause_cls is None or isinstance(self, cause_cls) or issubclass(cause_cls, RayTaskError):
            return self
        return _dual_error(cause_cls, self)


_dual_classes: dict = {}


def _dual_error(cause_cls, err: RayTaskError) -> RayTaskError:
    cls = _dual_classes.get(cause_cls)
    if cls is None:
        try:
            cls = type(
                f"RayTaskError({cause_cls.__name__})",
                (RayTaskError, cause_cls),
                {"__init__": _dual_init, "__reduce__": RayTaskError.__reduce__,
                 "__str__": RayTaskError.__str__, "__module__": __name__},
            )
        except TypeError:  # e.g. a cause class with an incompatible layout
            return err
        _dual_classes[cause_cls] = cls
    # Built-in exceptions with a __new__ of their own (MemoryError, ExceptionGroup,
    # OSError...) refuse ``cls.__new__(cls)``: Python only lets the __new__ of the
    # built-in type the instance's layout comes from make it. Call that one with
    # the cause's args (ExceptionGroup needs its message and exceptions), then its
    # __init__ (which fills OSError's errno or UnicodeError's fields).
    base = _layout_base(cls)
    new = None
    for args in (tuple(err.cause.args), ()):
        try:
            new = base.__new__(cls, *args)
            break
        except Exception:
            continue
    if new is None:  # e.g. a BaseExceptionGroup of non-Exceptions: keep the plain error
        return err
    try:
        base.__init__(new, *err.cause.args)
    except Exception:
        pass
    _dual_init(new, err.function_name, err.traceback_str, err.cause, err.pid, err.ip)
    return new


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined in Python


def _layout_base(cls: type) -> type:
    """The built-in type whose __new__ may create instances of ``cls``."""
    while cls.__flags__ & _HEAPTYPE:
        cls = cls.__base__
    return cls


def _dual_init(self, function_name="", traceback_str="", cause=None, pid=0, ip=""):
    self.function_name = function_name
    self.traceback_str = traceback_str
    self.cause = cause
    self.pid = pid
    self.ip = ip
    self.args = (RayTaskError._message(self),)


def _rebuild_task_error(function_name, traceback_str, cause, pid, ip):
    return RayTaskError(function_name, traceback_str, cause, pid, ip)


class TaskCancelledError(RayError):
    """The task was cancelled with ``zray.cancel``."""

    def __init__(self, task_id: str = "", error_message: str = ""):
        self.task_id = task_id
        self.error_message = error_message
        super().__init__(error_message or f"Task {task_id} was cancelled")

    def __reduce__(self):
        return (TaskCancelledError, (self.task_id, self.error_message))


class GetTimeoutError(RayError, TimeoutError):
    """``get`` or ``wait`` ran out of time."""


class WorkerCrashedError(RayError):
    """The process running the task died (and retries, if any, ran out)."""


class RayActorError(RayError):
    """The actor died or could not be created; its calls fail with this."""

    def __init__(self, message: str = "The actor died unexpectedly.", actor_id: str = ""):
        self.actor_id = actor_id
        self.error_msg = message
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.error_msg, self.actor_id))


class ActorDiedError(RayActorError):
    """The actor's process died, or it was killed."""


class ActorUnavailableError(RayActorError):
    """The actor is restarting and cannot take calls right now."""


class ObjectLostError(RayError):
    """Every copy of the object is gone and it cannot be rebuilt."""

    def __init__(self, object_ref_hex: str = "", message: str = ""):
        self.object_ref_hex = object_ref_hex
        super().__init__(message or f"Object {object_ref_hex} is lost: no copy remains.")

    def __reduce__(self):
        return (type(self), (self.object_ref_hex, str(self)))


class ObjectFetchTimedOutError(ObjectLostError):
    """Fetching the object from its node timed out."""


class OwnerDiedError(ObjectLostError):
    """The process that owned the object died."""


class ReferenceCountingAssertionError(ObjectLostError, AssertionError):
    """The object was freed while a reference to it was still in use."""


class ObjectStoreFullError(RayError):
    """The node's object store is full and spilling cannot free room."""


class OutOfMemoryError(RayError):
    """The task was killed because the node ran out of memory."""


class RuntimeEnvSetupError(RayError):
    """The task's runtime_env could not be set up."""


class TaskUnschedulableError(RayError):
    """No node can ever satisfy the task's requirements."""


class ActorUnschedulableError(RayError):
    """No node can ever satisfy the actor's requirements."""


class CrossLanguageError(RayError):
    """Kept for Ray compatibility; zray is Python only."""


class PendingCallsLimitExceeded(RayError):
    """Too many calls are pending on an actor."""


class ObjectReconstructionFailedError(ObjectLostError):
    """The object was lost and rebuilding it from lineage failed."""


class ObjectFreedError(ObjectLostError):
    """The object was freed by the application while a reference to it remained."""

    def __init__(self, object_ref_hex: str = "", message: str = ""):
        super().__init__(object_ref_hex, message or (
            f"Object {object_ref_hex} was freed by the application and cannot be read."))


class ActorAlreadyExistsError(ValueError, RayError):
    """A named actor with this name already exists in the namespace (``get_if_exists=True``
    returns the existing one instead). Also a ValueError, as in Ray."""

    def __init__(self, error_message: str = "An actor with this name already exists."):
        self.error_message = error_message
        super().__init__(error_message)

    def __reduce__(self):
        return (type(self), (self.error_message,))


class ActorHandleNotFoundError(ValueError, RayError):
    """The actor handle refers to no actor this cluster knows (e.g. one from a session
    before ``shutdown()``). Also a ValueError, as in Ray."""

    def __init__(self, error_message: str = "The actor handle refers to an unknown actor."):
        self.error_message = error_message
        super().__init__(error_message)

    def __reduce__(self):
        return (type(self), (self.error_message,))


class AsyncioActorExit(RayError):
    """An async actor leaving through ``exit_actor()`` (Ray raises it inside the actor)."""


class NodeDiedError(RayError):
    """The node is dead or cannot be reached."""


class LocalRayletDiedError(RayError):
    """The node agent of the task's node died (Ray: the local raylet)."""


class OutOfDiskError(RayError):
    """Storing the object failed: the object store and the spill disk are both full."""


class PlasmaObjectNotAvailable(RayError):
    """An object was not available within the given timeout (kept for Ray compatibility)."""


class TaskPlacementGroupRemoved(RayError):
    """The placement group of the task was removed."""


class ActorPlacementGroupRemoved(RayError):
    """The placement group of the actor was removed."""


class AuthenticationError(RayError):
    """The peer could not prove it holds the cluster key (zray: CURVE, see zray._security)."""


class RpcError(RayError):
    """An error of the underlying messaging layer."""

    def __init__(self, message: str = "", rpc_code: Optional[int] = None):
        self.rpc_code = rpc_code
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.rpc_code))


class UnserializableException(RayError):
    """An exception raised remotely could not be unpickled here; this carries its text
    and the traceback that was captured where it was raised."""

    def __init__(self, original_stack_trace: str = ""):
        self.original_stack_trace = original_stack_trace
        super().__init__(original_stack_trace)

    def __str__(self) -> str:
        return ("Failed to deserialize the exception raised remotely; its original "
                f"stack trace:\n{self.original_stack_trace}")

    def __reduce__(self):
        return (type(self), (self.original_stack_trace,))


class UserCodeException(RayError):
    """An exception raised by user code, wrapped (kept for Ray compatibility)."""


class ObjectRefStreamEndOfStreamError(RayError):
    """A streaming generator has no more ObjectRefs to read."""


class OufOfBandObjectRefSerializationException(RayError):
    """An ObjectRef was serialized out of band with cloudpickle (Ray's name, typo included)."""


class StreamingGeneratorReplayInconsistentError(RaySystemError):
    """A retried streaming generator yielded a different number of items than its first run."""


class RayDirectTransportError(RaySystemError):
    """A direct (node-to-node) object transfer failed."""


# Ray's names that do not end in "Error"; compiled-graph and channel errors are left out.
_OTHER_NAMES = ("PendingCallsLimitExceeded", "AsyncioActorExit", "PlasmaObjectNotAvailable",
                "TaskPlacementGroupRemoved", "ActorPlacementGroupRemoved",
                "UnserializableException", "UserCodeException",
                "OufOfBandObjectRefSerializationException")

__all__ = [name for name in dir() if name.endswith("Error") or name in _OTHER_NAMES]
