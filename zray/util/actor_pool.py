"""``ActorPool``: spread work over a fixed set of actors, Ray's ``ray.util.ActorPool``.

Flow of one value::

    submit(fn, v) --idle actor?--yes--> fn(actor, v) -> ObjectRef   (actor now busy)
                       |                        |
                       no                       v
                       +--> backlog  <---  a result is taken (get_next*): the actor
                            (FIFO)         goes back to the idle set, and the oldest
                                           backlog entry is submitted to it

The pool lives in the driver (or whichever process made it); it never talks to the
cluster except through ``fn``'s ObjectRefs and ``wait``/``get`` on them. An actor is
busy from the call ``fn`` makes until its result has been taken from the pool, so
results that nobody reads keep their actors busy. An actor whose result raised
``ActorDiedError`` is dropped from the pool instead of being handed out again.

Ordered reads (``get_next``) return results in submission order; unordered reads
(``get_next_unordered``) return whichever finished first; after an unordered read an
ordered one is refused, as in Ray.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Iterator, Optional

from zray import _api, exceptions

_TIMEOUT_TEXT = "Timed out waiting for result"


class ActorPool:
    """A pool of actors that work is spread over, one call per actor at a time."""

    def __init__(self, actors: list):
        self._idle: list = list(actors)
        self._busy: dict = {}  # ObjectRef (or tuple of refs) -> (index, actor)
        self._by_index: dict = {}  # submission index -> the ref(s) fn returned
        self._submitted = 0  # index the next submission gets
        self._returned = 0  # index the next ordered read returns
        self._backlog: deque = deque()  # (fn, value) waiting for an idle actor

    # -- submitting ----------------------------------------------------------

    def submit(self, fn: Callable[[Any, Any], Any], value: Any) -> None:
        """Run ``fn(actor, value)`` on an idle actor (or once one is free); read its
        result with ``get_next`` / ``get_next_unordered``."""
        if not self._idle:
            self._backlog.append((fn, value))
            return
        actor = self._idle.pop()
        ref = fn(actor, value)
        self._busy[_key(ref)] = (self._submitted, actor)
        self._by_index[self._submitted] = ref
        self._submitted += 1

    def map(self, fn: Callable[[Any, Any], Any], values: Iterable) -> Iterator:
        """Apply ``fn(actor, value)`` to every value; an iterator over the results in the
        order of ``values``. Results of earlier submissions not yet read are dropped."""
        self._drop_pending(ordered=True)
        for v in values:
            self.submit(fn, v)
        return self._results(self.get_next)

    def map_unordered(self, fn: Callable[[Any, Any], Any], values: Iterable) -> Iterator:
        """As ``map``, but results come in the order they finish."""
        self._drop_pending(ordered=False)
        for v in values:
            self.submit(fn, v)
        return self._results(self.get_next_unordered)

    def _results(self, read) -> Iterator:
        while self.has_next():
            yield read()

    def _drop_pending(self, ordered: bool) -> None:
        # What is still pending from earlier submits is read and thrown away (finished
        # ones) or abandoned (unfinished ones), so the new map starts on its own.
        while self.has_next():
            try:
                if ordered:
                    self.get_next(timeout=0, ignore_if_timedout=True)
                else:
                    self.get_next_unordered(timeout=0, ignore_if_timedout=True)
            except TimeoutError:
                pass
            except Exception:  # an error of an abandoned submission is nobody's
                pass

    # -- reading results -----------------------------------------------------

    def has_next(self) -> bool:
        """Whether any submitted result has not been read yet."""
        return bool(self._busy)

    def get_next(self, timeout: Optional[float] = None, ignore_if_timedout: bool = False):
        """The next result in submission order, waiting up to ``timeout`` seconds.

        Raises ``TimeoutError`` if it is not ready in time; with ``ignore_if_timedout``
        that result is skipped for good (its actor goes back to the pool)."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        if self._returned >= self._submitted:
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        ref = self._by_index[self._returned]
        ready = True
        if timeout is not None:
            refs = _refs(ref)
            ready = len(_api.wait(refs, num_returns=len(refs), timeout=timeout)[0]) == len(refs)
            if not ready and not ignore_if_timedout:
                raise TimeoutError(_TIMEOUT_TEXT)
        del self._by_index[self._returned]
        self._returned += 1
        _, actor = self._busy.pop(_key(ref))
        if not ready:
            self._give_back(actor)
            raise TimeoutError(f"{_TIMEOUT_TEXT}. The task {ref} has been ignored.")
        return self._take(ref, actor)

    def get_next_unordered(self, timeout: Optional[float] = None,
                           ignore_if_timedout: bool = False):
        """Any finished result (the first to finish), waiting up to ``timeout`` seconds.

        Raises ``TimeoutError`` if none is ready in time; with ``ignore_if_timedout`` one
        pending result is skipped for good (its actor goes back to the pool)."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        done = self._first_done(timeout)
        if done is None:
            if not ignore_if_timedout:
                raise TimeoutError(_TIMEOUT_TEXT)
            key = next(iter(self._busy))
        else:
            key = done
        index, actor = self._busy.pop(key)
        ref = self._by_index.pop(index)
        self._returned = max(self._returned, index + 1)
        if done is None:
            self._give_back(actor)
            raise TimeoutError(f"{_TIMEOUT_TEXT}. The task {ref} has been ignored.")
        return self._take(ref, actor)

    def _first_done(self, timeout: Optional[float]):
        """The key of a submission whose refs are all ready, or None after ``timeout``."""
        singles = [k for k in self._busy if not isinstance(k, tuple)]
        groups = [k for k in self._busy if isinstance(k, tuple)]
        if not groups:
            ready, _ = _api.wait(singles, num_returns=1, timeout=timeout)
            return ready[0] if ready else None
        # fn returned several refs: a submission is done when all of them are.
        every = [r for k in self._busy for r in _refs(k)]
        deadline_wait = timeout
        while True:
            ready, _ = _api.wait(every, num_returns=len(every), timeout=0)
            done = set(ready)
            for k in self._busy:
                if all(r in done for r in _refs(k)):
                    return k
            if deadline_wait is not None and deadline_wait <= 0:
                return None
            step = 0.05 if deadline_wait is None else min(0.05, deadline_wait)
            _api.wait(every, num_returns=min(len(done) + 1, len(every)), timeout=step)
            if deadline_wait is not None:
                deadline_wait -= step

    def _take(self, ref, actor):
        alive = True
        try:
            return _api.get(ref)
        except exceptions.ActorDiedError:
            alive = False
            raise
        finally:
            self._give_back(actor, alive)

    def _give_back(self, actor, alive: bool = True) -> None:
        if alive:
            self._idle.append(actor)
        if self._backlog and self._idle:
            self.submit(*self._backlog.popleft())

    # -- the actors ----------------------------------------------------------

    def has_free(self) -> bool:
        """Whether an actor is idle and no submission waits for one."""
        return bool(self._idle) and not self._backlog

    def pop_idle(self):
        """Take an idle actor out of the pool; None if none is free."""
        return self._idle.pop() if self.has_free() else None

    def push(self, actor) -> None:
        """Add an actor to the pool (it takes the oldest waiting submission, if any)."""
        busy = [a for _, a in self._busy.values()]
        if actor in self._idle or actor in busy:
            raise ValueError("Actor already belongs to current ActorPool")
        self._give_back(actor)


def _key(ref):
    return tuple(ref) if isinstance(ref, list) else ref


def _refs(ref) -> list:
    return list(ref) if isinstance(ref, (list, tuple)) else [ref]
