"""An executor process: runs tasks one at a time, or hosts one actor.

::

    broker --EXEC--> inbox (I/O thread) --queue--> main thread: load fn, args
                                                  run user code
    broker <--DONE/YIELD-- out socket <----------- results, errors
    broker --CANCEL--> I/O thread --SIGUSR1--> main thread raises TaskCancelledError

A task runs on the main thread so that a cancel can interrupt it anywhere,
including ``time.sleep`` and blocking I/O: the I/O thread sends SIGUSR1 to the
main thread and the handler raises ``TaskCancelledError`` there.

An actor lives in its executor for its whole life. Sync actors run calls on
the main thread in arrival order; threaded actors (max_concurrency > 1) on a
thread pool; async actors on an event loop thread, up to max_concurrency
coroutines at once, where a cancel is ``task.cancel()``.

What user code prints is sent to the driver at the root of the call, prefixed
``(name pid=N)``; it is also written to this executor's log file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import queue
import signal
import sys
import threading

import cloudpickle

from zray import _protocol as P
from zray import _runtime, exceptions
from zray._client import Client
from zray._procutil import die_with_parent, setup_logging
from zray._protocol import Msg
from zray._refs import ObjectRef
from zray._serialization import deserialize, serialize, task_error
from zray.actor import ActorExit

log = logging.getLogger("zray.executor")


class _TaskStream:
    """sys.stdout/err replacement: lines go to the driver and to the log file."""

    def __init__(self, executor: "Executor", raw, is_err: bool):
        self.executor = executor
        self.raw = raw
        self.is_err = is_err
        self.buf = []
        self.lock = threading.Lock()

    def write(self, s):
        if not s:
            return 0
        try:
            self.raw.write(s)
        except Exception:
            pass
        with self.lock:
            self.buf.append(s)
            if "\n" not in s:
                return len(s)
            text = "".join(self.buf)
            cut = text.rfind("\n") + 1
            self.buf = [text[cut:]] if cut < len(text) else []
        self.executor.forward_log(text[:cut], self.is_err)
        return len(s)

    def flush(self):
        with self.lock:
            text = "".join(self.buf)
            self.buf = []
        if text:
            self.executor.forward_log(text, self.is_err)
        try:
            self.raw.flush()
        except Exception:
            pass

    def isatty(self):
        return False

    def fileno(self):
        return self.raw.fileno()

    @property
    def encoding(self):
        return getattr(self.raw, "encoding", "utf-8")


class Executor:
    def __init__(self):
        env = os.environ
        self.cid = bytes.fromhex(env["ZRAY_EXEC_ID"])
        self.node_id = bytes.fromhex(env["ZRAY_NODE_ID"])
        self.pid = os.getpid()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.fns: dict = {}
        self.main_thread = threading.main_thread().ident
        self.running_task = b""
        self.cancelled: set = set()
        self.driver = b""
        self.log_prefix = ""
        self.base_env = dict(os.environ)
        self.env_dirty = False
        self.actor = None
        self.actor_mode = ""  # "", "sync", "threaded", "async"
        self.spec = None  # the task or sync actor call running now (get_runtime_context)
        self.actor_spec = None  # the creation of the actor hosted here
        self.exiting = False  # exit_actor() began: calls still running here send no result
        self.loop = None
        self.pool = None
        self.async_tasks: dict = {}
        self.async_sem = None
        self.block_lock = threading.Lock()
        self.blocked = False
        signal.signal(signal.SIGUSR1, self._on_sigusr1)
        # SIGTERM from the node agent: leave the loop after the current task
        # (the agent SIGKILLs stragglers after a grace period).
        signal.signal(signal.SIGTERM, lambda *_: self.queue.put((P.Exit(), [])))
        self.client = Client(env["ZRAY_ADDRESS"], kind="executor", node_id=self.node_id,
                             cid=self.cid, on_exec=self._on_exec, on_cancel=self._on_cancel)
        self.client.on_block = self._on_block
        self.client.on_unblock = self._on_unblock
        _runtime.client = self.client
        _runtime.worker_mode = True
        self.stdout = _TaskStream(self, sys.stdout, False)
        self.stderr = _TaskStream(self, sys.stderr, True)
        sys.stdout, sys.stderr = self.stdout, self.stderr

    # ------------------------------------------------------------ I/O thread
    def _on_exec(self, msg, frames):
        with self.block_lock:
            if self.blocked and msg.TYPE == Msg.EXEC and msg.spec.kind == P.TASK:
                # A prefetched task arrived while our task waits in get(): it could be
                # the very task we wait for, so hand it back to be run elsewhere.
                self.keep_fn(msg, frames)
                self.client.send(P.encode(P.Reject(msg.spec.task_id)))
                return
            self.queue.put((msg, frames))

    def keep_fn(self, msg, frames):
        if msg.fn_included:  # the EXEC carried the function blob: keep it, the broker counts on it
            self.fns.setdefault(msg.spec.fid, frames[0])

    def _on_block(self) -> list:
        """Main thread, about to wait in get(): return the prefetched tasks not started."""
        with self.block_lock:
            self.blocked = True
            returned, keep = [], []
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                m = item[0]
                if m.TYPE == Msg.EXEC and m.spec.kind == P.TASK:
                    self.keep_fn(m, item[1])
                    returned.append(m.spec.task_id)
                else:
                    keep.append(item)
            for item in keep:
                self.queue.put(item)
            return returned

    def _on_unblock(self):
        with self.block_lock:
            self.blocked = False

    def _on_cancel(self, task_id: bytes, force: bool):
        self.cancelled.add(task_id)
        fut = self.async_tasks.get(task_id)
        if fut is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(fut.cancel)
            return
        if self.running_task == task_id and self.actor_mode == "":
            signal.pthread_kill(self.main_thread, signal.SIGUSR1)

    def _on_sigusr1(self, signum, frame):
        tid = self.running_task
        if tid and tid in self.cancelled:
            raise exceptions.TaskCancelledError(tid.hex())

    # ----------------------------------------------------------------- logs
    def forward_log(self, text: str, is_err: bool):
        driver = self.driver
        if driver and text.strip("\n"):
            prefix = self.log_prefix + ("!" if is_err else "")
            try:
                self.client.send(P.encode(P.Log(driver, prefix, text)))
            except Exception:
                pass

    # ------------------------------------------------------------- main loop
    def serve(self):
        self.client.send(P.encode(P.Ready()))
        while True:
            msg, frames = self.queue.get()
            if msg.TYPE != Msg.EXEC:
                break
            try:
                self.handle(msg, frames)
            except ActorExit:
                self.exit_actor()
            except Exception:
                log.exception("executor failure")
        self.client.close()

    def handle(self, msg: P.Exec, frames):
        spec = msg.spec
        kind = spec.kind
        pos = 0
        if msg.fn_included:
            self.fns[spec.fid] = frames[0]
            pos = 1
        task_id = spec.task_id
        if task_id in self.cancelled:
            self.finish_error(spec, exceptions.TaskCancelledError(task_id.hex()))
            return
        try:
            args, kwargs = self.load_args(spec, frames, pos, msg.n_args, msg.deps)
        except BaseException as e:  # noqa: B036 - reported to the caller
            self.finish_error(spec, e)
            return
        if kind == P.ACTOR_CALL and self.actor_mode in ("threaded", "async"):
            self.dispatch_concurrent(spec, args, kwargs)
            return
        self.prepare(spec, msg.gpu_ids)
        try:
            if kind == P.ACTOR_CREATE:
                self.create_actor(spec, args, kwargs)
                return
            if kind == P.ACTOR_CALL:
                fn = getattr(self.actor, spec.fid)
            else:
                fn = self.load_fn(spec.fid)
            self.running_task = task_id
            try:
                result = fn(*args, **kwargs)
                if spec.num_returns == P.STREAMING:
                    self.stream(spec, result)
                    return
                outs = self.split_returns(spec, result)
            finally:
                self.running_task = b""
        except ActorExit:
            raise  # no reply: the broker fails this call with ActorDiedError on our exit
        except BaseException as e:  # noqa: B036 - user code may raise anything
            self.finish_error(spec, e)
            return
        finally:
            self.restore()
        if task_id in self.cancelled:
            self.finish_error(spec, exceptions.TaskCancelledError(task_id.hex()))
            return
        self.finish_values(spec, outs)

    def exit_actor(self):
        self.exiting = True
        self.stdout.flush()
        self.stderr.flush()
        self.client.close()
        os._exit(P.ACTOR_EXIT_CODE)

    def load_fn(self, fid):
        fn = self.fns[fid]
        if isinstance(fn, (bytes, memoryview)) or hasattr(fn, "buffer"):
            fn = cloudpickle.loads(fn.buffer if hasattr(fn, "buffer") else fn)
            self.fns[fid] = fn
        return fn

    def load_args(self, spec, frames, pos, n_args, layout):
        if n_args:
            args, kwargs = deserialize(frames[pos:pos + n_args])
            args = list(args)
        else:
            args, kwargs = [], {}
        pos += n_args
        client = self.client
        for (index, oid), (n, loc) in zip(spec.deps, layout, strict=True):
            if loc is None:
                value = deserialize(frames[pos:pos + n])
                pos += n
            elif loc == client.node_id:
                kind, stored = client.store.read(oid)
                value = deserialize(stored)
            else:  # in another node's store: the broker copies it to ours first
                value = client.get_values([ObjectRef(oid, b"", client)], None)[0]
            if index == -1:  # the whole (args, kwargs), too large to travel inline
                args, kwargs = list(value[0]), value[1]
            elif isinstance(index, int):
                args[index] = value
            else:
                kwargs[index] = value
        return args, kwargs

    def prepare(self, spec, gpu_ids):
        self.spec = spec
        client = self.client
        client.current_task_id = spec.task_id
        client.current_task_name = spec.name
        client.job_id = spec.job
        client.driver_cid = spec.driver
        self.driver = spec.driver
        if spec.kind == P.TASK:
            self.log_prefix = f"({spec.name} pid={self.pid})"
        opts = spec.options
        env_vars = opts.get("env_vars")
        if env_vars:
            os.environ.update(env_vars)
            self.env_dirty = True
        if gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
            self.env_dirty = True
        self.gpu_ids = gpu_ids

    def restore(self):
        self.stdout.flush()
        self.stderr.flush()
        if self.actor is not None:
            return  # an actor keeps its environment for life
        client = self.client
        client.current_task_id = b""
        self.spec = None
        if self.env_dirty:  # comparing os.environ costs ~100 us: only after we changed it
            self.env_dirty = False
            os.environ.clear()
            os.environ.update(self.base_env)
        self.gpu_ids = []

    def split_returns(self, spec, result) -> list:
        n = spec.num_returns
        if n == 1:
            return [result]
        if n == 0:
            return []
        if inspect.isgenerator(result):
            result = list(result)
        if not isinstance(result, (tuple, list)) or len(result) != n:
            got = len(result) if isinstance(result, (tuple, list)) else type(result).__name__
            raise ValueError(f"Task {spec.name} declared num_returns={n} but returned {got}")
        return list(result)

    def stream(self, spec, gen):
        task_id = spec.task_id
        i = 0
        try:
            for value in gen:
                i += 1
                frames, nested = serialize(value)
                self.client.send(P.encode(P.Yield(task_id, i, P.VALUE, len(frames), nested)),
                                 frames)
        except BaseException as e:  # noqa: B036
            self.finish_error(spec, e)
            return
        self.client.send(P.encode(P.Done(task_id, [], [], False, [], "")))

    def finish_values(self, spec, values):
        if self.exiting:  # a threaded/async actor's call outlived exit_actor(): it fails
            return
        layout, frames, nested = [], [], []
        task_id = spec.task_id
        try:
            for i, v in enumerate(values, 1):
                f, n = serialize(v)
                nested.extend(n)
                stored = self.client.store_frames(P.object_id(task_id, i), P.VALUE, f)
                if stored is not None:  # large: written to this node's store
                    layout.append([P.VALUE, 0, *stored])
                    continue
                layout.append([P.VALUE, len(f), None, 0])
                frames.extend(f)
        except BaseException as e:  # noqa: B036
            self.finish_error(spec, e)
            return
        # Results holding refs go through the broker: it must learn of those refs (PUTs on
        # our socket, processed in order before this DONE) before the owner can use them.
        pushed = [] if nested else self.push_results(spec, layout, frames)
        self.client.send(P.encode(P.Done(task_id, layout, nested, False, pushed, "")), frames)

    def push_results(self, spec, layout, frames) -> list:
        """Hand the results straight to an owner on this node (one hop instead of two
        through the broker, which still gets DONE for its books). Returns, per result,
        whether it went; the broker pushes the others."""
        if spec.kind == P.ACTOR_CREATE or spec.num_returns <= 0:
            return []
        owner = spec.owner
        pushed, pos = [], 0
        for i, (kind, n, node_id, _) in enumerate(layout, 1):
            header = P.encode(P.Obj(P.object_id(spec.task_id, i), kind, node_id, None))
            pushed.append(self.client.push_direct(owner, header, frames[pos:pos + n]))
            pos += n
        return pushed

    def finish_error(self, spec, exc):
        if self.exiting:
            return
        task_id = spec.task_id
        if task_id in self.cancelled and not isinstance(exc, exceptions.TaskCancelledError):
            exc = exceptions.TaskCancelledError(task_id.hex())
        self.cancelled.discard(task_id)
        frames, text = task_error(exc, spec.name, self.pid)
        n = max(spec.num_returns, 1)
        retryable = False
        opts = spec.options
        rex = opts.get("retry_exceptions")
        if rex and not isinstance(exc, exceptions.TaskCancelledError):
            if rex is True:
                retryable = True
            else:
                try:
                    classes = tuple(cloudpickle.loads(rex))
                    retryable = isinstance(exc, classes)
                except Exception:
                    retryable = False
        layout = [[P.ERROR, len(frames), None, 0]] * n
        pushed = [] if retryable else self.push_results(spec, layout, frames * n)
        self.client.send(P.encode(P.Done(task_id, layout, [], retryable, pushed, text)),
                         frames * n)

    # ---------------------------------------------------------------- actors
    def create_actor(self, spec, args, kwargs):
        cls = self.load_fn(spec.fid)
        opts = spec.options
        self.log_prefix = f"({getattr(cls, '__name__', 'Actor')} pid={self.pid})"
        self.client.current_actor_id = spec.actor_id
        self.actor_spec = spec
        try:
            self.actor = cls(*args, **kwargs)
        except ActorExit:
            raise
        except BaseException as e:  # noqa: B036
            self.actor = None
            self.finish_error(spec, e)
            return
        finally:
            self.stdout.flush()
            self.stderr.flush()
        is_async = any(inspect.iscoroutinefunction(m) or inspect.isasyncgenfunction(m)
                       for _, m in inspect.getmembers(type(self.actor), inspect.isfunction))
        conc = opts.get("max_concurrency")
        if is_async:
            self.actor_mode = "async"
            self.start_loop(conc or 1000)
        elif conc and conc > 1:
            self.actor_mode = "threaded"
            self.pool = concurrent.futures.ThreadPoolExecutor(conc, thread_name_prefix="zray-actor")
        else:
            self.actor_mode = "sync"
        self.finish_values(spec, [None])

    def start_loop(self, conc: int):
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.async_sem = asyncio.Semaphore(conc)
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, name="zray-actor-loop", daemon=True).start()
        ready.wait()

    def dispatch_concurrent(self, spec, args, kwargs):
        method = getattr(self.actor, spec.fid)
        if self.actor_mode == "threaded":
            self.pool.submit(self.call_in_thread, spec, method, args, kwargs)
            return
        task_id = spec.task_id

        async def run():
            async with self.async_sem:
                if inspect.iscoroutinefunction(method):
                    return await method(*args, **kwargs)
                if inspect.isasyncgenfunction(method):
                    return [v async for v in method(*args, **kwargs)]
                return method(*args, **kwargs)

        def start():
            t = self.loop.create_task(run())
            self.async_tasks[task_id] = t
            if task_id in self.cancelled:
                t.cancel()
            t.add_done_callback(lambda t: self.async_done(spec, t))

        self.loop.call_soon_threadsafe(start)

    def async_done(self, spec, t):
        self.async_tasks.pop(spec.task_id, None)
        self.stdout.flush()
        if t.cancelled() or spec.task_id in self.cancelled:
            self.finish_error(spec, exceptions.TaskCancelledError(spec.task_id.hex()))
            return
        exc = t.exception()
        if isinstance(exc, ActorExit):
            self.exit_actor()
        if exc is not None:
            self.finish_error(spec, exc)
            return
        try:
            outs = self.split_returns(spec, t.result())
        except BaseException as e:  # noqa: B036
            self.finish_error(spec, e)
            return
        self.finish_values(spec, outs)

    def call_in_thread(self, spec, method, args, kwargs):
        try:
            result = method(*args, **kwargs)
            outs = self.split_returns(spec, result)
        except ActorExit:
            self.exit_actor()
        except BaseException as e:  # noqa: B036
            self.finish_error(spec, e)
            return
        finally:
            self.stdout.flush()
        self.finish_values(spec, outs)


def main():
    die_with_parent(int(os.environ.get("ZRAY_PARENT_PID", "0")) or None)
    setup_logging("executor", None, stderr=True, level=logging.WARNING)
    ex = Executor()
    _runtime.executor = ex
    prof = os.environ.get("ZRAY_PROFILE_EXECUTOR")
    if prof:  # cProfile the main loop; stats land in PATH.<pid> at exit
        import cProfile

        cProfile.runctx("ex.serve()", globals(), {"ex": ex}, f"{prof}.{os.getpid()}")
    else:
        ex.serve()
    os._exit(0)


if __name__ == "__main__":
    main()
