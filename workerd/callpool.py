"""The thread pool a threaded actor (or a concurrency group) runs its calls on.

::

    receiving thread --submit(fn, *args)--> SimpleQueue --> up to ``size`` daemon threads,
        started one at a time while no thread is free; each runs fn(*args), then takes
        the next

What ``concurrent.futures.ThreadPoolExecutor`` does for an actor, less what an
actor does not use: no Future per call (nobody waits on one: a call answers its
caller itself), no shutdown. Measured on a threaded actor's small calls (2-core
VM): the Future and the idle semaphore cost the receiving thread and the pool
about 6 us of Python per call.

At most ``size`` calls run at once (max_concurrency). A call never waits in the
queue while fewer than ``size`` threads exist and none is free: ``free`` counts
the threads that will take a queued call without being asked; ``submit`` takes
one, or starts a thread when there is none (as the executor's idle semaphore
does).
"""

from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger("zray.executor")


class CallPool:
    """``size`` threads at most, started as calls need them (module doc)."""

    def __init__(self, size: int, name: str):
        self.size = size
        self.name = name
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = 0
        self.free = 0  # threads that will take a queued call without being asked
        self.lock = threading.Lock()

    def submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` on a pool thread (now, or when one is free)."""
        self.queue.put((fn, args))
        with self.lock:
            if self.free:
                self.free -= 1
                return
            if self.threads >= self.size:
                return  # every thread is busy: the first one free takes it
            self.threads += 1
            n = self.threads
        threading.Thread(target=self._work, name=f"{self.name}_{n - 1}", daemon=True).start()

    def _work(self) -> None:
        get, lock = self.queue.get, self.lock
        while True:
            fn, args = get()
            try:
                fn(*args)
            except BaseException:  # noqa: B036 - a pool thread outlives any call
                log.exception("an actor call failed outside its own error handling")
            del fn, args
            with lock:
                self.free += 1
