"""Custom serializers for one class, Ray's ``ray.util.register_serializer`` /
``deregister_serializer``.

A registration is for this process (a driver, or the task or actor that calls it):
values of that exact class that this process serializes (arguments it passes,
results it returns, ``put``) go as ``deserializer(serializer(value))``. The
deserializer travels inside the value, so the receiving process needs no
registration. See ``zray._serialization`` for how the pickler applies it.
"""

from __future__ import annotations

from typing import Any, Callable

from zray import _serialization


def register_serializer(cls: type, *, serializer: Callable[[Any], Any],
                        deserializer: Callable[[Any], Any]) -> None:
    """Serialize instances of ``cls`` (exactly that class, not subclasses) as
    ``serializer(obj)``, rebuilt on the other side with ``deserializer(that)``.
    A second registration for the same class replaces the first."""
    if not isinstance(cls, type):
        raise TypeError(f"register_serializer() needs a class, got {type(cls).__name__}")
    if not callable(serializer):
        raise TypeError(f"serializer must be callable, got {type(serializer).__name__}")
    if not callable(deserializer):
        raise TypeError(f"deserializer must be callable, got {type(deserializer).__name__}")

    def reduce(obj):
        return deserializer, (serializer(obj),)

    _serialization._reducers[cls] = reduce


def deregister_serializer(cls: type) -> None:
    """Forget the serializer of ``cls`` in this process (nothing if it has none)."""
    _serialization._reducers.pop(cls, None)


__all__ = ["register_serializer", "deregister_serializer"]
