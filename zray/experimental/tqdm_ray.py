"""Progress bars from remote tasks and actors, drawn by the driver, as Ray's
``ray.experimental.tqdm_ray``.

::

    tqdm(range(n)) in a task                               the driver
      every update (at most one per flush_interval_s,      _Bars (one real tqdm.tqdm per
      and always the last) -> one line MAGIC + JSON   -->  (process, bar id), each on its
      through the executor's log forwarding (LOG ->        own row), fed by the client's
      broker -> PRINT), not through its log file           PRINT handler (_client._print_log)

The state line is plain JSON (desc, total, count, unit, closed), never pickled;
it reaches the driver that the task's output would reach (and not one started
with ``log_to_driver=False``). The driver draws every bar with ``tqdm.tqdm`` on
stderr at a row of its own, so bars of parallel tasks never interleave, and
other remote output printed meanwhile is written above the bars
(``tqdm.external_write_mode``). Used in the driver itself, a bar is drawn
directly by the same ``_Bars``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from typing import Iterable, Optional

MAGIC = "__zray_tqdm__:"  # zray/_client.py looks for it in remote output


def safe_print(*args, **kwargs) -> None:
    """print() that does not break the bars drawn on this process's terminal."""
    import tqdm as real

    with real.tqdm.external_write_mode(file=kwargs.get("file") or sys.stdout):
        print(*args, **kwargs)


class tqdm:  # noqa: N801 - Ray's name
    """A progress bar usable in remote tasks and actors (a subset of tqdm's arguments)."""

    DEFAULT_FLUSH_INTERVAL_SECONDS = 1.0

    def __init__(self, iterable: Optional[Iterable] = None, desc: Optional[str] = None,
                 total: Optional[int] = None, unit: Optional[str] = None,
                 position: Optional[int] = None, flush_interval_s: Optional[float] = None):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except (TypeError, AttributeError):
                total = None
        if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float))
                                  or total < 0):
            raise ValueError(f"total must be a number >= 0, got {total!r}")
        if flush_interval_s is not None and (not isinstance(flush_interval_s, (int, float))
                                             or flush_interval_s < 0):
            raise ValueError(f"flush_interval_s must be >= 0, got {flush_interval_s!r}")
        if position is not None and (not isinstance(position, int) or position < 0):
            raise ValueError(f"position must be an int >= 0, got {position!r}")
        self._iterable = iterable
        self._desc = "" if desc is None else str(desc)
        self._total = total
        self._unit = unit or "it"
        self._pos = position or 0
        self._uuid = uuid.uuid4().hex
        self._x = 0
        self._closed = False
        self._interval = (self.DEFAULT_FLUSH_INTERVAL_SECONDS if flush_interval_s is None
                          else flush_interval_s)
        self._last = 0.0
        self._dump(force=True)

    def set_description(self, desc) -> None:
        self._desc = "" if desc is None else str(desc)
        self._dump()

    def update(self, n: int = 1) -> None:
        self._x += n
        self._dump()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._dump(force=True)

    def refresh(self) -> None:
        self._dump(force=True)

    @property
    def total(self) -> Optional[int]:
        return self._total

    @total.setter
    def total(self, total: int) -> None:
        self._total = total
        self._dump()

    @property
    def n(self) -> int:
        return self._x

    @n.setter
    def n(self, n: int) -> None:
        self._x = n
        self._dump()

    def __iter__(self):
        if self._iterable is None:
            raise ValueError("No iterable provided")
        for item in self._iterable:
            self.update(1)
            yield item
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _state(self) -> dict:
        return {"uuid": self._uuid, "desc": self._desc, "total": self._total, "x": self._x,
                "unit": self._unit, "pos": self._pos, "closed": self._closed,
                "pid": os.getpid()}

    def _dump(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        forward = getattr(sys.stdout, "forward", None)  # an executor's TaskStream
        if forward is not None:
            forward(MAGIC + json.dumps(self._state()) + "\n", False)
        else:
            bars().update("", self._state())


class _Bars:
    """The driver's bars: one real tqdm per (source, bar id), each on its own row."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bars: dict = {}  # (source, uuid) -> tqdm.tqdm
        self.rows: dict = {}  # (source, uuid) -> row

    def active(self) -> bool:
        return bool(self.bars)

    def update(self, source: str, state: dict) -> None:
        import tqdm as real

        key = (source, str(state.get("uuid")))
        with self.lock:
            bar = self.bars.get(key)
            if bar is None:
                if state.get("closed"):
                    return
                used = set(self.rows.values())
                row = next(i for i in range(len(used) + 1) if i not in used)
                self.rows[key] = row
                desc = str(state.get("desc") or "")
                bar = real.tqdm(desc=f"{source} {desc}".strip(), total=state.get("total"),
                                unit=str(state.get("unit") or "it"), position=row,
                                leave=True, file=sys.stderr, dynamic_ncols=True)
                self.bars[key] = bar
            desc = f"{source} {state.get('desc') or ''}".strip()
            if bar.desc.rstrip(": ") != desc:
                bar.set_description(desc, refresh=False)
            total = state.get("total")
            if total != bar.total:
                bar.total = total
            x = state.get("x")
            if isinstance(x, (int, float)) and x != bar.n:
                bar.update(x - bar.n)
            else:
                bar.refresh()
            if state.get("closed"):
                bar.close()
                del self.bars[key]
                del self.rows[key]

    def write(self, out, text: str) -> None:
        """Write other output above the bars (they are redrawn below it)."""
        import tqdm as real

        with self.lock:
            with real.tqdm.external_write_mode(file=sys.stderr):
                out.write(text)
                out.flush()


_bars: Optional[_Bars] = None
_bars_lock = threading.Lock()


def bars() -> _Bars:
    global _bars
    with _bars_lock:
        if _bars is None:
            _bars = _Bars()
        return _bars


def driver_print(prefix: str, text: str, out) -> None:
    """The driver's PRINT handler when bars are involved: state lines feed the bars,
    other lines are written above them (called by zray/_client.py)."""
    b = bars()
    plain = []
    for line in text.splitlines():
        at = line.find(MAGIC)
        if at < 0:
            plain.append(f"{prefix} {line}\n")
            continue
        try:
            state = json.loads(line[at + len(MAGIC):])
            if not isinstance(state, dict):
                raise ValueError
        except ValueError:
            plain.append(f"{prefix} {line}\n")
            continue
        src = prefix.rstrip("!")
        b.update(src, state)
    if plain:
        b.write(out, "".join(plain))


def active() -> bool:
    return _bars is not None and _bars.active()


__all__ = ["safe_print", "tqdm"]
