"""``Pool``: the ``multiprocessing.Pool`` API on the cluster, Ray's
``ray.util.multiprocessing.Pool``.

::

    Pool (driver)                                   _PoolWorker actors (processes=N)
      map / starmap / *_async --chunks------------>  run_chunk(func, items, star)
      imap / imap_unordered   --one chunk per         (initializer ran once at start;
                                worker in flight-->    each item's error is kept, not
      apply / apply_async     --a chunk of one---->    raised, so a chunk always ends)
      AsyncResult / iterators <--[(ok, value)...]--

Work is cut into chunks (``chunksize`` items; for ``map`` by default about four
chunks per worker, as ``multiprocessing`` does) and the chunks are dealt round-robin
to the workers, which are actors (holding no CPU unless ``ray_remote_args`` say
so, as in Ray; a pool may not have more workers than the cluster has CPUs). A chunk's result is a list of ``(ok, value)`` pairs, so one item that
raises does not lose the others; the caller sees the first item's exception, as with
``multiprocessing``. With ``maxtasksperchild`` a worker that has been given that many
items is told to exit once its queued calls are done (``__ray_terminate__``) and a
fresh one takes its place.

``close()`` refuses new work and lets queued work finish; ``terminate()`` kills the
workers at once; ``join()`` (after either) waits for the workers to end. Leaving a
``with Pool() as p:`` block terminates the pool, as ``multiprocessing`` does.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from multiprocessing import TimeoutError
from typing import Any, Callable, Iterable, Iterator, Optional

from zray import _api

logger = logging.getLogger(__name__)

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"


class _PoolWorker:
    """One worker process of a Pool (an actor)."""

    def __init__(self, initializer: Optional[Callable], initargs: tuple):
        if initializer is not None:
            initializer(*initargs)

    def ping(self) -> bool:
        return True

    def run_chunk(self, func: Callable, items: list, star: bool) -> list:
        out = []
        for item in items:
            try:
                out.append((True, func(*item) if star else func(item)))
            except Exception as exc:  # kept per item: the rest of the chunk still runs
                out.append((False, _portable(exc)))
        return out


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that says what it was."""
    import cloudpickle

    try:
        cloudpickle.loads(cloudpickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _check_positive(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class AsyncResult:
    """The result of ``apply_async`` / ``map_async`` / ``starmap_async``."""

    def __init__(self, refs: list, single: bool, callback: Optional[Callable] = None,
                 error_callback: Optional[Callable] = None):
        self._refs = refs
        self._single = single
        self._value = None
        self._error: Optional[BaseException] = None
        self._done = False
        self._lock = threading.Lock()
        if callback is not None or error_callback is not None:
            # multiprocessing calls them from a thread of the pool once the result is in
            t = threading.Thread(target=self._run_callbacks, args=(callback, error_callback),
                                 name="zray-pool-callback", daemon=True)
            t.start()

    def _run_callbacks(self, callback, error_callback) -> None:
        try:
            self.wait()
            self._collect()
        except Exception:  # a cluster error: reported through error_callback below
            logger.debug("pool result failed", exc_info=True)
        if self._error is not None:
            if error_callback is not None:
                error_callback(self._error)
        elif callback is not None:
            callback(self._value)

    def _collect(self) -> None:
        with self._lock:
            if self._done:
                return
            try:
                chunks = _api.get(self._refs)
            except Exception as exc:  # the worker itself failed (died, was killed)
                self._error, self._done = exc, True
                return
            values = []
            for ok, value in itertools.chain.from_iterable(chunks):
                if not ok and self._error is None:
                    self._error = value
                values.append(value)
            self._value = values[0] if self._single else values
            self._done = True

    def ready(self) -> bool:
        """Whether the result is in (finished or failed)."""
        if self._done or not self._refs:
            return True
        ready, _ = _api.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait until the result is in or ``timeout`` seconds pass (no error either way)."""
        if self._refs and not self._done:
            _api.wait(self._refs, num_returns=len(self._refs), timeout=timeout)

    def get(self, timeout: Optional[float] = None):
        """The result (a list for the map variants); raises the first task's exception,
        or ``multiprocessing.TimeoutError`` if not in within ``timeout`` seconds."""
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        self._collect()
        if self._error is not None:
            raise self._error
        return self._value

    def successful(self) -> bool:
        """Whether the call finished without raising; ValueError if it is not ready."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        self._collect()
        return self._error is None


class IMapIterator:
    """The iterator of ``imap`` (in order) and ``imap_unordered`` (as they finish).

    One chunk per worker is in flight; the next chunk is cut from the iterable only
    when one comes back, so a huge (or endless) iterable is never read ahead."""

    def __init__(self, pool: "Pool", func: Callable, iterable: Iterable, chunksize: int,
                 ordered: bool):
        self._pool = pool
        self._func = func
        self._source = iter(iterable)
        self._chunksize = chunksize
        self._ordered = ordered
        self._exhausted = False
        self._in_flight: dict = {}  # ref -> (chunk number, worker number)
        self._finished: dict = {}  # chunk number -> its (ok, value) pairs
        self._next_chunk = 0  # number the next cut chunk gets
        self._next_out = 0  # ordered: the chunk whose items come next
        self._buffer: list = []  # (ok, value) pairs ready to hand out
        for worker in range(len(pool._workers)):
            self._submit_one(worker)

    def _submit_one(self, worker: int) -> None:
        if self._exhausted:
            return
        chunk = list(itertools.islice(self._source, self._chunksize))
        if not chunk:
            self._exhausted = True
            return
        ref = self._pool._submit(self._func, chunk, star=False, worker=worker)
        self._in_flight[ref] = (self._next_chunk, worker)
        self._next_chunk += 1

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        return self.next()

    def next(self, timeout: Optional[float] = None):
        """The next result; ``multiprocessing.TimeoutError`` if none comes within
        ``timeout`` seconds, StopIteration at the end."""
        while not self._buffer:
            if self._ordered and self._next_out in self._finished:
                self._buffer = self._finished.pop(self._next_out)
                self._next_out += 1
                continue
            if not self._in_flight:
                raise StopIteration
            ready, _ = _api.wait(list(self._in_flight), num_returns=1, timeout=timeout)
            if not ready:
                raise TimeoutError
            for ref in ready:
                number, worker = self._in_flight.pop(ref)
                pairs = _api.get(ref)
                if self._ordered:
                    self._finished[number] = pairs
                else:
                    self._buffer.extend(pairs)
                self._submit_one(worker)  # the worker that is free now gets the next chunk
        ok, value = self._buffer.pop(0)
        if not ok:
            raise value
        return value


class Pool:
    """A pool of worker processes (actors) on the cluster, with ``multiprocessing``'s API.

    ``processes`` defaults to the cluster's CPU count (more than it has is an error);
    ``initializer(*initargs)`` runs once in each worker; ``maxtasksperchild`` replaces a
    worker after that many items; ``ray_address`` is the cluster to connect to if this
    process is not connected yet (None: ``ZRAY_ADDRESS``, else a new local cluster with
    ``processes`` CPUs); ``ray_remote_args`` are the workers' actor options (default
    ``{"num_cpus": 0}``). ``context`` (a ``multiprocessing`` start-method context) has
    no meaning for actors and is refused.
    """

    def __init__(self, processes: Optional[int] = None, initializer: Optional[Callable] = None,
                 initargs: Optional[Iterable] = None, maxtasksperchild: Optional[int] = None,
                 context: Any = None, ray_address: Optional[str] = None,
                 ray_remote_args: Optional[dict] = None):
        if context is not None:
            raise ValueError("Pool(context=...) is not supported: the pool's processes are "
                             "actors, not multiprocessing children; leave context=None")
        _check_positive("processes", processes)
        _check_positive("maxtasksperchild", maxtasksperchild)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if ray_remote_args is not None and not isinstance(ray_remote_args, dict):
            raise TypeError("ray_remote_args must be a dict of actor options")
        if not _api.is_initialized():
            # ray_address, else ZRAY_ADDRESS, else a new local cluster sized for the pool
            if ray_address in (None, "local") and (ray_address == "local"
                                                   or not os.environ.get("ZRAY_ADDRESS")):
                _api.init(address=ray_address, num_cpus=processes)
            else:
                _api.init(address=ray_address)
        cpus = int(_api.cluster_resources().get("CPU", 0))
        if processes is None:
            processes = max(1, cpus)
        elif cpus < processes:
            raise ValueError(f"Tried to start a pool with {processes} processes on a cluster "
                             f"that has only {cpus} CPUs")
        self._initializer = initializer
        self._initargs = tuple(initargs or ())
        self._maxtasks = maxtasksperchild
        # As in Ray, a worker holds no CPU unless ray_remote_args say so: the pool is
        # sized by ``processes`` (checked against the cluster's CPUs above).
        self._actor_class = _api.remote(_PoolWorker).options(
            **{"num_cpus": 0, **(ray_remote_args or {})})
        self._state = _RUN
        self._workers: list = []  # [actor, items given]
        self._retired: list = []  # workers told to exit (maxtasksperchild) or closed
        self._outstanding: list = []  # every chunk ref not known to be done
        self._prune_at = 256
        self._next = 0
        self._lock = threading.Lock()
        self._workers = [[self._new_actor(), 0] for _ in range(processes)]

    def _new_actor(self):
        return self._actor_class.remote(self._initializer, self._initargs)

    def __repr__(self) -> str:
        return f"<zray.util.multiprocessing.Pool state={self._state} pool_size={len(self._workers)}>"

    # -- dispatch ------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _submit(self, func: Callable, items: list, star: bool, worker: Optional[int] = None):
        """Send a chunk to worker number ``worker`` (default: the next, round-robin)."""
        with self._lock:
            if worker is None:
                worker = self._next % len(self._workers)
                self._next += 1
            slot = self._workers[worker]
            if self._maxtasks is not None and slot[1] >= self._maxtasks:
                self._retire(slot[0])
                slot[0], slot[1] = self._new_actor(), 0
            slot[1] += len(items)
            ref = slot[0].run_chunk.remote(func, items, star)
            self._outstanding.append(ref)
            if len(self._outstanding) >= 2 * self._prune_at:  # forget finished chunks
                self._outstanding = _api.wait(self._outstanding,
                                              num_returns=len(self._outstanding),
                                              timeout=0)[1]
                self._prune_at = max(256, len(self._outstanding))
            return ref

    def _retire(self, actor) -> None:
        # The exit runs after the calls queued before it, so their results still come.
        self._retired.append((actor, actor.__ray_terminate__.remote()))

    def _chunks(self, func: Callable, iterable: Iterable, chunksize: Optional[int],
                star: bool) -> list:
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), len(self._workers) * 4)
            chunksize = max(1, chunksize + (1 if extra else 0))
        else:
            _check_positive("chunksize", chunksize, allow_none=False)
        return [self._submit(func, items[i:i + chunksize], star)
                for i in range(0, len(items), chunksize)]

    # -- the multiprocessing API ---------------------------------------------

    def apply(self, func: Callable, args: tuple = (), kwds: Optional[dict] = None, *,
              kwargs: Optional[dict] = None):
        """``func(*args, **kwds)`` in a worker; waits for and returns the result.
        (``kwargs=`` is Ray's name for ``kwds``.)"""
        return self.apply_async(func, args, kwds, kwargs=kwargs).get()

    def apply_async(self, func: Callable, args: tuple = (), kwds: Optional[dict] = None,
                    callback: Optional[Callable] = None,
                    error_callback: Optional[Callable] = None, *,
                    kwargs: Optional[dict] = None) -> AsyncResult:
        """``func(*args, **kwds)`` in a worker; an AsyncResult for it."""
        self._check_running()
        if kwds is not None and kwargs is not None:
            raise TypeError("give the keyword arguments as kwds= or kwargs=, not both")
        call = _Call(func, kwds if kwds is not None else (kwargs or {}))
        ref = self._submit(call, [tuple(args or ())], star=True)
        return AsyncResult([ref], True, callback, error_callback)

    def map(self, func: Callable, iterable: Iterable, chunksize: Optional[int] = None) -> list:
        """``[func(x) for x in iterable]`` on the workers, in order."""
        return self.map_async(func, iterable, chunksize).get()

    def map_async(self, func: Callable, iterable: Iterable, chunksize: Optional[int] = None,
                  callback: Optional[Callable] = None,
                  error_callback: Optional[Callable] = None) -> AsyncResult:
        """``map`` without waiting: an AsyncResult whose ``get()`` is the list."""
        self._check_running()
        return AsyncResult(self._chunks(func, iterable, chunksize, star=False), False,
                           callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable,
                chunksize: Optional[int] = None) -> list:
        """``[func(*args) for args in iterable]`` on the workers, in order."""
        return self.starmap_async(func, iterable, chunksize).get()

    def starmap_async(self, func: Callable, iterable: Iterable,
                      chunksize: Optional[int] = None, callback: Optional[Callable] = None,
                      error_callback: Optional[Callable] = None) -> AsyncResult:
        """``starmap`` without waiting: an AsyncResult whose ``get()`` is the list."""
        self._check_running()
        return AsyncResult(self._chunks(func, iterable, chunksize, star=True), False,
                           callback, error_callback)

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> IMapIterator:
        """Results of ``func`` over ``iterable`` in order, as an iterator that keeps one
        chunk per worker in flight."""
        self._check_running()
        _check_positive("chunksize", chunksize, allow_none=False)
        return IMapIterator(self, func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable, iterable: Iterable,
                       chunksize: int = 1) -> IMapIterator:
        """As ``imap``, but results come in the order they finish."""
        self._check_running()
        _check_positive("chunksize", chunksize, allow_none=False)
        return IMapIterator(self, func, iterable, chunksize, ordered=False)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Accept no more work; what was submitted still runs. ``join()`` waits for it."""
        if self._state == _RUN:
            self._state = _CLOSE
            for actor, _ in self._workers:
                self._retire(actor)

    def terminate(self) -> None:
        """Stop the workers now; unfinished work fails."""
        if self._state == _TERMINATE:
            return
        self._state = _TERMINATE
        for actor, _ in self._workers:
            _api.kill(actor)
        for actor, _ in self._retired:
            _api.kill(actor)
        self._outstanding = []

    def join(self) -> None:
        """Wait for the workers to end; the pool must be closed or terminated first."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        if self._state == _CLOSE:
            if self._outstanding:
                _api.wait(self._outstanding, num_returns=len(self._outstanding))
            exits = [ref for _, ref in self._retired]
            if exits:
                _api.wait(exits, num_returns=len(exits))
            self._outstanding = []

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()


class _Call:
    """``func`` with keyword arguments bound, for ``apply`` (items are positional)."""

    def __init__(self, func: Callable, kwds: dict):
        self.func, self.kwds = func, kwds

    def __call__(self, *args):
        return self.func(*args, **self.kwds)
