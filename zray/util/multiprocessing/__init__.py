"""``multiprocessing.Pool`` on the cluster, Ray's ``ray.util.multiprocessing``: ``Pool``
(workers are actors), and ``TimeoutError`` / ``JoinableQueue`` from ``multiprocessing``
(the names Ray's module exports alongside it)."""

from multiprocessing import JoinableQueue, TimeoutError

from zray.util.multiprocessing.pool import AsyncResult, IMapIterator, Pool

__all__ = ["Pool", "TimeoutError", "JoinableQueue", "AsyncResult", "IMapIterator"]
