"""``inspect_serializability``: find what makes a value unpicklable, Ray's
``ray.util.inspect_serializability``.

The value is pickled as zray would pickle it (cloudpickle); if that fails, the walk
goes one level down and tries each part on its own: a function's globals and
closure variables, an object's attributes, a container's items. A part that fails
and has no failing part of its own is reported (a ``FailureTuple``); the walk stops
``depth`` levels down. What was tried is printed (to ``print_file``, default stdout)
as an indented tree, so a user can see the path from the value to the culprit.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import cloudpickle

_RULE_MAX = 80


class FailureTuple:
    """One unpicklable part: ``obj`` itself, ``path`` (the names from the inspected
    value down to it) and ``parent`` (the object that holds it)."""

    def __init__(self, obj: Any, path: tuple, parent: Any):
        self.obj = obj
        self.path = tuple(path)
        self.parent = parent

    @property
    def name(self) -> str:
        """The variable or attribute name of the culprit ("unknown" if it has none)."""
        return str(self.path[-1]) if self.path and self.path[-1] is not None else "unknown"

    def __repr__(self) -> str:
        path = " -> ".join("unknown" if p is None else str(p) for p in self.path)
        return f"FailTuple({self.name} [path={path}, obj={self.obj}, parent={self.parent}])"


class _Report:
    def __init__(self, print_file):
        self.file = print_file
        self.level = 0

    def line(self, text: str) -> None:
        print("    " * self.level + text, file=self.file)


def _pickle_error(obj) -> Optional[str]:
    try:
        cloudpickle.dumps(obj)
        return None
    except Exception as exc:  # anything pickling raises makes the value unserializable
        return f"{exc}" or type(exc).__name__


def _parts(obj) -> list:
    """(name, value) of the parts the walk tries below ``obj``."""
    if inspect.isfunction(obj):
        closure = inspect.getclosurevars(obj)
        return list(closure.globals.items()) + list(closure.nonlocals.items())
    if isinstance(obj, dict):
        return [(repr(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict) and not inspect.ismodule(obj):
        return list(attrs.items())
    return []


def _walk(obj, path: tuple, parent, depth: int, found: set, report: _Report) -> bool:
    """Add obj's failing parts (or obj) to ``found``; False if obj pickles."""
    error = _pickle_error(obj)
    if error is None:
        return False
    report.line(f"!!! FAIL serialization: {error}")
    failed_below = False
    if depth > 0:
        parts = _parts(obj)
        if inspect.isfunction(obj) and parts:
            report.line(f"Inspecting closure of '{obj.__qualname__}': "
                        f"{len(parts)} global and nonlocal variables")
        report.level += 1
        for name, value in parts:
            if _pickle_error(value) is None:
                continue
            report.line(f"Serializing '{name}' {value!r}...")
            failed_below |= _walk(value, path + (name,), obj, depth - 1, found, report)
        report.level -= 1
    if not failed_below:
        found.add(FailureTuple(obj, path, parent))
    return True


def inspect_serializability(base_obj: Any, name: Optional[str] = None, depth: int = 3,
                            print_file: Optional[Any] = None) -> tuple:
    """Whether ``base_obj`` can be serialized, and the parts that cannot.

    Returns ``(serializable, failures)``: a bool and a set of ``FailureTuple``. ``name``
    names ``base_obj`` in the report and in the failures' paths; ``depth`` bounds how
    far down the walk goes; the report is printed to ``print_file`` (default stdout)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int, got {depth!r}")
    report = _Report(print_file)
    title = f"Checking Serializability of {base_obj}"
    rule = "=" * min(len(title), _RULE_MAX)
    report.line(rule)
    report.line(title)
    report.line(rule)
    found: set = set()
    path = (name,) if name is not None else ()
    ok = not _walk(base_obj, path, None, depth, found, report)
    if not ok:
        report.line(rule)
        report.line("Non-serializable variables found:")
        for failure in found:
            report.line(f"\t{failure!r}")
        report.line("Remove them (or their imports) from what the function or class "
                    "captures, or create them inside the function or class instead.")
        report.line(rule)
    return ok, found


__all__ = ["inspect_serializability", "FailureTuple"]
