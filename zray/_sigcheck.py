"""Arguments checked against the function's parameters at ``.remote()``, as Ray does.

``f.remote(1, 2, 3)`` for ``def f(a, b=1)`` raises TypeError in the caller, not an
error from the executor later. The check is a stub with the same parameters (names,
kinds, which have defaults) and an empty body, compiled once per function: calling it
costs what a Python call costs (~0.1 us), and its TypeError is Python's own
("say() takes from 1 to 2 positional arguments but 3 were given").

The parameters travel as plain data (``params``: ``[[name, kind, has_default]]``, in
an actor handle's config), and a stub is built only from names that are identifiers
and kinds that exist: a handle received from elsewhere can never put code into it.
"""

from __future__ import annotations

import inspect
import keyword
from typing import Callable

_P = inspect.Parameter
_KIND_OF = {int(k): k for k in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD, _P.VAR_POSITIONAL,
                                 _P.KEYWORD_ONLY, _P.VAR_KEYWORD)}
_built: dict = {}  # (name, params as a tuple) -> stub, or None when it cannot be built


def params_of(fn, drop_first: bool = False) -> list | None:
    """``fn``'s parameters as data (``drop_first``: a method's ``self``); None if Python
    cannot tell them (a builtin, a C extension's callable)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    ps = list(sig.parameters.values())
    if drop_first and ps and ps[0].kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD):
        ps = ps[1:]
    return [[p.name, int(p.kind), p.default is not p.empty] for p in ps]


def checker(name: str, params) -> Callable | None:
    """A function that raises TypeError where a call with these arguments would; None
    when ``params`` is None or not well-formed (then nothing is checked)."""
    if params is None:
        return None
    try:
        key = (name, tuple((n, k, d) for n, k, d in params))
    except (TypeError, ValueError):
        return None
    if key in _built:
        return _built[key]
    stub = _built[key] = _build(name, key[1])
    return stub


def _build(name: str, params: tuple) -> Callable | None:
    out = []
    for n, k, d in params:
        if (type(n) is not str or not n.isidentifier() or keyword.iskeyword(n)
                or type(k) is not int or k not in _KIND_OF or type(d) is not bool):
            return None
        out.append(_P(n, _KIND_OF[k], default=None if d else _P.empty))
    try:
        text = str(inspect.Signature(out))  # (refuses a bad order: ValueError)
        ns: dict = {}
        exec(f"def _stub{text}:\n    pass\n", ns)  # noqa: S102 - identifiers only, checked
    except (ValueError, SyntaxError):
        return None
    stub = ns["_stub"]
    short = name.rsplit(".", 1)[-1]
    if not short.isidentifier():
        short = "function"
    stub.__name__, stub.__qualname__ = short, name  # (what its TypeError names)
    return stub
