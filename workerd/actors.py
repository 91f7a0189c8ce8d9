"""The one actor an executor hosts: created once, then called until the process ends.

::

    EXEC (ACTOR_CREATE) --> create_actor: ActorMode of the class; cls(*args) on the main
                            thread (ASYNC: __init__, async or not, on the event loop) --> DONE [None]
    EXEC (ACTOR_CALL) ----> ActorHost.handle, picked by the mode at creation:
        SYNC      method() on the main thread, in arrival order -------+
        THREADED  pool.submit(method): max_concurrency threads --------+--> ResultSender --> DONE
                  (workerd/callpool.py)                                 |
        ASYNC     loop.create_task(method()) on the event loop thread,  |
                  at most max_concurrency at once (a semaphore) -------+
    INTERRUPT ----> ActorHost.cancel (I/O thread): ASYNC: task.cancel() on the loop;
                    SYNC: the call runs on, then reports TaskCancelledError;
                    THREADED: the call runs on; only an error it raises becomes one;
                    one still waiting for a free thread is answered TaskCancelledError
                    at once and never starts
    exit_actor() --ActorExit--> ExecutorProcess.exit_actor: os._exit(ACTOR_EXIT_CODE)
    sys.exit() --SystemExit--> ExecutorProcess.system_exit: the process ends (sys.exit(0):
                               as exit_actor(); any other code: a crash, restarted per
                               max_restarts), in every mode

An actor gets a fresh executor process (never a pooled one) and keeps it, with
the environment of its creation (CUDA_VISIBLE_DEVICES included), for life:
calls never restore it.
A class with any ``async def`` method (``__init__`` included) or async generator
is an async actor; otherwise ``max_concurrency`` > 1 makes it threaded. Sync calls
go through ``prepare`` like tasks (context and env_vars of the call; the GPUs stay
the actor's); threaded and async calls run under the context set at creation.
A generator method streams its items (YIELD) in every mode, an async generator
on the loop; with ``num_returns="dynamic"`` its items are stored one by one.

A call that raises ActorExit sends no reply: the broker fails it with
ActorDiedError when the process exits, and does not restart the actor.

Concurrency groups (``@remote(concurrency_groups={"io": 2})``, a method's
``concurrency_group``, carried by each call in its spec's options): as in Ray,
each group runs its calls apart from the others, at most its own max
concurrency at once: on a thread pool of that size (SYNC and THREADED actors),
or on an event loop thread of its own with a semaphore of that size (ASYNC).
Calls of no group run as above (the default group), except that a SYNC
actor's run on a one-thread pool, in order, so that the main thread stays
free to start other groups' calls. ``call_grouped`` routes them; an actor
without groups never goes through it.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import threading
from typing import TYPE_CHECKING, Optional

from workerd import direct
from workerd.callpool import CallPool
from workerd.logs import CALL
from workerd.results import split_returns
from zray import _protocol as P
from zray.actor import ActorExit

if TYPE_CHECKING:
    from workerd.executor import ExecutorProcess


class ActorMode(enum.Enum):
    """How an actor runs its calls; fixed at creation."""

    SYNC = "sync"  # one call at a time on the main thread, in arrival order
    THREADED = "threaded"  # max_concurrency > 1: calls on a thread pool
    ASYNC = "async"  # async methods: coroutines on an event loop thread

    @classmethod
    def of(cls, actor_cls: type, max_concurrency: Optional[int]) -> ActorMode:
        is_async = any(inspect.iscoroutinefunction(m) or inspect.isasyncgenfunction(m)
                       for _, m in inspect.getmembers(actor_cls, inspect.isfunction))
        if is_async:
            return cls.ASYNC
        if max_concurrency and max_concurrency > 1:
            return cls.THREADED
        return cls.SYNC


def create_actor(proc: ExecutorProcess, msg: P.Exec, frames: list) -> None:
    """Build the actor of an ACTOR_CREATE (main thread), set ``proc.actor`` and reply."""
    loaded = proc.load_call(msg, frames)
    if loaded is None:
        return
    args, kwargs = loaded
    spec = msg.spec
    results = proc.results
    proc.prepare(spec, msg.gpu_ids)
    try:
        cls = proc.load_fn(spec.fid)
        proc.logs.prefix = f"({getattr(cls, '__name__', 'Actor')} pid={proc.pid})"
        proc.client.current_actor_id = spec.actor_id
        proc.actor_spec = spec
        host = ActorHost(proc, cls, spec.options.get("max_concurrency"),
                         spec.options.get("concurrency_groups"))
        try:
            host.construct(args, kwargs)
        finally:
            proc.stdout.flush()
            proc.stderr.flush()
    except (ActorExit, SystemExit):
        raise
    except BaseException as e:  # noqa: B036 - the caller learns why the actor died
        results.finish_error(spec, e)
        proc.restore()
        return
    proc.actor = host
    results.direct = direct.start(proc, host)  # callers may call it straight (workerd/direct.py)
    proc.logs.direct = results.direct  # (their output: on their lane, see LogForwarder)
    results.finish_values(spec, [None])


async def _construct_on_loop(cls: type, args, kwargs):
    """``cls(*args, **kwargs)`` where ``__init__`` may be ``async def``."""
    new = cls.__new__
    obj = new(cls) if new is object.__new__ else new(cls, *args, **kwargs)
    if isinstance(obj, cls):
        ret = obj.__init__(*args, **kwargs)
        if inspect.isawaitable(ret):
            await ret
    return obj


class ActorHost:
    """This process's actor instance, and how its calls run (``mode``)."""

    def __init__(self, proc: ExecutorProcess, cls: type, max_concurrency: Optional[int],
                 groups: Optional[dict] = None):
        self.proc = proc
        self.instance = None  # built by construct()
        self.mode = ActorMode.of(cls, max_concurrency)
        self.cls = cls
        self.cancelled = proc.cancelled
        self.load_call = proc.load_call
        self.prepare = proc.prepare
        self.stdout, self.stderr = proc.stdout, proc.stderr
        results = proc.results
        self.generator_returns = results.generator_returns
        self.stream = results.stream
        self.stream_async = results.stream_async
        self.finish_values = results.finish_values
        self.finish_error = results.finish_error
        self.cancelled_error = results.cancelled_error
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.pool: Optional[CallPool] = None
        self.async_tasks: dict = {}  # task id -> asyncio.Task of an ASYNC call in flight
        # task id -> spec of a THREADED call queued for a free thread, not started: whoever
        # pops it first (the thread starting it, or a cancel) decides its fate
        self.waiting: dict = {}
        self.async_sem: Optional[asyncio.Semaphore] = None
        if self.mode is ActorMode.ASYNC:
            self.loop, self.async_sem = self.start_loop(max_concurrency or 1000)
            self.handle = self.call_async
        elif self.mode is ActorMode.THREADED or groups:
            # With concurrency groups even a one-at-a-time actor runs its default group on
            # a thread of its own (in order): the main thread must stay free to start the
            # other groups' calls.
            self.pool = CallPool(max_concurrency or 1, "zray-actor")
            self.handle = self.call_threaded
        else:
            self.handle = self.call_sync
        self.groups: dict = {}  # concurrency group name -> how its calls start
        if groups:
            for name, conc in groups.items():
                if self.mode is ActorMode.ASYNC:
                    loop, sem = self.start_loop(conc, f"zray-actor-loop-{name}")
                    self.groups[name] = functools.partial(self.call_async, loop=loop, sem=sem)
                else:
                    pool = CallPool(conc, f"zray-actor-{name}")
                    self.groups[name] = functools.partial(self.call_threaded, pool=pool)
            self.call_default = self.handle
            self.handle = self.call_grouped

    def construct(self, args: list, kwargs: dict) -> None:
        """Build the instance (main thread). An async actor's ``__init__``, ``async def``
        or not, runs on its event loop, as in Ray: what it schedules there (a server, a
        background task) runs from then on."""
        if self.mode is not ActorMode.ASYNC:
            self.instance = self.cls(*args, **kwargs)
            return
        proc = self.proc

        async def build():
            try:
                return await _construct_on_loop(self.cls, args, kwargs)
            except SystemExit as e:  # it would stop the loop, and this wait with it
                proc.system_exit(e)

        self.instance = asyncio.run_coroutine_threadsafe(build(), self.loop).result()

    @staticmethod
    def start_loop(conc: int, name: str = "zray-actor-loop") -> tuple:
        """An event loop on a thread of its own, and the semaphore (of ``conc``) that
        bounds the calls running on it."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        sem = []

        def run():
            asyncio.set_event_loop(loop)
            sem.append(asyncio.Semaphore(conc))
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, name=name, daemon=True).start()
        ready.wait()
        return loop, sem[0]

    def cancel(self, task_id: bytes) -> None:
        """I/O thread: interrupt a call if it can be (an ASYNC call in flight), or answer
        a THREADED one still waiting for a free thread (it never starts), as Ray does."""
        fut = self.async_tasks.get(task_id)
        if fut is not None:
            fut.get_loop().call_soon_threadsafe(fut.cancel)
            return
        spec = self.waiting.pop(task_id, None)
        if spec is not None:
            self.cancelled_error(spec)

    def call_grouped(self, msg: P.Exec, frames: list) -> None:
        """Start a call in its concurrency group (main thread); no group: the default."""
        start = self.groups.get(msg.spec.options.get("concurrency_group"))
        (start or self.call_default)(msg, frames)

    # ------------------------------------------------------- one call, by mode
    def call_sync(self, msg: P.Exec, frames: list) -> None:
        """Run one call on the main thread and send its results."""
        loaded = self.load_call(msg, frames)
        if loaded is None:
            return
        args, kwargs = loaded
        spec = msg.spec
        self.prepare(spec, msg.gpu_ids)
        try:
            result = getattr(self.instance, spec.fid)(*args, **kwargs)
            if spec.num_returns < 0:  # a generator: streamed, or stored item by item
                outs = self.generator_returns(spec, result)
                if outs is None:
                    return
            else:
                outs = split_returns(spec, result)
        except (ActorExit, SystemExit):
            raise  # no reply: the broker fails this call with ActorDiedError on our exit
        except BaseException as e:  # noqa: B036 - user code may raise anything
            self.finish_error(spec, e)
            return
        finally:
            self.stdout.flush()
            self.stderr.flush()
        if spec.task_id in self.cancelled:
            self.cancelled_error(spec)
            return
        self.finish_values(spec, outs)

    def call_threaded(self, msg: P.Exec, frames: list, pool=None) -> None:
        """Hand one call to the thread pool, or a concurrency group's (main thread)."""
        loaded = self.load_call(msg, frames)
        if loaded is None:
            return
        args, kwargs = loaded
        spec = msg.spec
        self.waiting[spec.task_id] = spec
        (pool or self.pool).submit(self.run_in_thread, spec, getattr(self.instance, spec.fid),
                                   args, kwargs)

    def returns_of(self, spec: P.TaskSpec, produce) -> Optional[list]:
        """Call ``produce()`` and make what it gives the call's returns; None when the call
        is answered already (a stream, an error sent) or the process is ending."""
        try:
            result = produce()
            if spec.num_returns < 0:  # a generator: streamed (None), or DYNAMIC
                return self.generator_returns(spec, result)
            return split_returns(spec, result)
        except ActorExit:
            self.proc.exit_actor()
        except SystemExit as e:
            self.proc.system_exit(e)
        except BaseException as e:  # noqa: B036 - user code may raise anything
            self.finish_error(spec, e)
        return None

    def run_in_thread(self, spec: P.TaskSpec, method, args, kwargs) -> None:
        if self.waiting.pop(spec.task_id, None) is None:
            return  # cancelled while it waited for a free thread: answered then (cancel)
        CALL.set(spec)  # (this thread's call, for its output: LogForwarder)
        try:
            outs = self.returns_of(spec, lambda: method(*args, **kwargs))
        finally:
            self.stdout.flush()
        if outs is not None:
            self.finish_values(spec, outs)

    def call_async(self, msg: P.Exec, frames: list, loop=None, sem=None) -> None:
        """Start one call as a task on the event loop, or on a concurrency group's (main
        thread)."""
        loaded = self.load_call(msg, frames)
        if loaded is None:
            return
        args, kwargs = loaded
        spec = msg.spec
        method = getattr(self.instance, spec.fid)
        task_id = spec.task_id
        if loop is None:
            loop, sem = self.loop, self.async_sem

        async def run():
            CALL.set(spec)  # (this task's own context: its output's call, LogForwarder)
            async with sem:
                try:
                    if inspect.iscoroutinefunction(method):
                        return await method(*args, **kwargs)
                    result = method(*args, **kwargs)
                    if spec.num_returns == P.STREAMING:
                        if inspect.isasyncgen(result):
                            await self.stream_async(spec, result)
                        else:
                            self.stream(spec, result)
                        return _ANSWERED
                    if inspect.isasyncgen(result):
                        return [v async for v in result]
                    return result
                except SystemExit as e:  # it would stop the loop: end the process here
                    self.proc.system_exit(e)

        def start():
            t = loop.create_task(run())
            self.async_tasks[task_id] = t
            if task_id in self.cancelled:
                t.cancel()
            t.add_done_callback(lambda t: self.async_done(spec, t))

        if asyncio._get_running_loop() is loop:  # (started from a lane its loop reads)
            loop.call_soon(start)
        else:
            loop.call_soon_threadsafe(start)

    def async_done(self, spec: P.TaskSpec, t: asyncio.Task) -> None:
        self.async_tasks.pop(spec.task_id, None)
        self.stdout.flush()
        if t.cancelled() or spec.task_id in self.cancelled:
            self.cancelled_error(spec)
            return
        exc = t.exception()
        if isinstance(exc, ActorExit):
            self.proc.exit_actor()
        if exc is not None:
            self.finish_error(spec, exc)
            return
        result = t.result()
        if result is _ANSWERED:  # a stream, answered as it ran
            return
        # (a generator runs here: DYNAMIC, or a sync one for a count of returns)
        outs = self.returns_of(spec, lambda: result)
        if outs is not None:
            self.finish_values(spec, outs)


_ANSWERED = object()  # an async call's result when it already sent its reply (a stream)
