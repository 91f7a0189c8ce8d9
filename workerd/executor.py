"""An executor process: runs plain tasks one at a time, or hosts one actor.

::

    broker --EXEC--> inbox (Client I/O thread) --queue--> main thread: ExecutorProcess.serve
                                                            |-- TASK ---------> TaskRunner.run
                                                            |-- ACTOR_CREATE -> create_actor
                                                            '-- ACTOR_CALL ---> ActorHost.handle
    broker <--DONE/YIELD-- out socket <---- ResultSender <---- results, errors
           <--BATCH of DONEs-- HeldDones <-'   (short tasks run back to back: workerd/held.py)
    broker --RECALL--> I/O thread: tasks sent ahead, not started --REJECT--> broker
    owner  <--OBJ (PUSH)-- results for an owner on this node
    broker --INTERRUPT--> I/O thread --SIGUSR1--> main thread raises TaskCancelledError
                                     '----------> ActorHost.cancel (async actor: task.cancel())
    user code in get() --BLOCK [prefetched task ids]--> broker;  UNBLOCK when it returns
    print() --> TaskStream --LOG--> broker --PRINT--> driver

The pieces, one module each:

* ``ExecutorProcess`` (here) owns what the process has once: the ``Client``
  and its I/O thread, the inbox ``queue`` that thread fills and the main
  thread drains, the function blobs received (``fns``), the ids of cancelled
  tasks, and the environment and GPUs a call runs under (``prepare`` /
  ``restore``).
* ``TaskRunner`` (workerd/tasks.py) runs a plain task on the main thread.
* ``create_actor`` and ``ActorHost`` (workerd/actors.py): the actor, and its
  calls on the main thread, a thread pool or an event loop (``ActorMode``).
* ``ResultSender`` (workerd/results.py): DONE, YIELD and direct pushes, once
  for all of them.
* ``TaskStream`` and ``LogForwarder`` (workerd/logs.py): printed output.
* ``HeldDones`` (workerd/held.py): the DONEs of short tasks held back while the
  next task is already queued, sent together (flushed before this process waits in
  ``get``, leaves, or runs a task not known to be short).

Prefetch: the broker may send the next task while one runs. When the running
task blocks in ``get``, ``on_block`` takes the unstarted tasks out of the queue
and the BLOCK hands them back; a task that arrives while blocked is REJECTed.
Either way the task could be the very one being waited for. The broker may send
several tasks ahead for a short function (brokerd/window.py); it RECALLs those
not started when the running one takes long and another executor is idle: the
I/O thread takes them out of the queue and REJECTs them.

Cancellation: the I/O thread records the task id in ``cancelled``. A call
not yet started is answered with TaskCancelledError at once. A plain task is
interrupted on the main thread by SIGUSR1 (anywhere, ``time.sleep``
included); an async actor call is cancelled on its loop; other actor calls
run on (see workerd/actors.py).

Exit: EXIT or SHUTDOWN from the broker, losing the broker, or SIGTERM from
the node agent ends the serve loop after the current call (SIGTERM during a
plain task: at once, the task is not waited for); ActorExit (``exit_actor()``) ends the
process at once with ``ACTOR_EXIT_CODE``, and so does ``sys.exit(0)`` in an actor;
any other ``sys.exit()`` in user code ends it with another code (``system_exit``:
a crash, as Ray sees it). A function with ``max_calls`` retires the process after
its Nth call here (``calls``, ``retire``): the DONE of that call, then EXIT to the
broker on the same socket (so the broker has the result before it learns we leave,
and queues again whatever it had sent us ahead); the broker answers EXIT, and only
then the process exits 0, so the node's EXEC_DIED can never reach the broker first.
EXECs still in the queue are never started. ``zray._runtime.executor`` is this
process's ``ExecutorProcess``.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Optional

import cloudpickle

from workerd import lease as _lease
from workerd.actors import ActorHost, create_actor
from workerd.held import HeldDones
from workerd.logs import LogForwarder, TaskStream
from workerd.renv import RuntimeEnvSetup
from workerd.results import ResultSender
from workerd.tasks import TaskRunner
from zray import _protocol as P
from zray import _runtime, exceptions
from zray._client import Client
from zray._procutil import die_with_parent, exit_forked_child, setup_logging
from zray._protocol import Msg
from zray._refs import ObjectRef
from zray._serialization import deserialize
from zray.actor import ActorExit

log = logging.getLogger("zray.executor")
_NO_ENV: dict = {}  # the inherited runtime_env of a task that has none (never mutated)


class ExecutorProcess:
    """The executor's process-wide state: client, inbox, functions, cancels, env."""

    def __init__(self):
        env = os.environ
        self.cid = bytes.fromhex(env["ZRAY_EXEC_ID"])
        self.node_id = bytes.fromhex(env["ZRAY_NODE_ID"])
        self.pid = os.getpid()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # (msg, frames) for the main thread
        self.next_item = self.queue.get  # what the main thread runs next
        self.fns: dict = {}  # fid -> pickled blob, or the function once loaded
        self.calls: dict = {}  # fid -> calls run here, for functions with max_calls
        self.main_thread = threading.main_thread().ident
        self.running_task = b""  # the plain task on the main thread: SIGUSR1 cancels it
        self.cancelled: set = set()
        self.base_env = dict(os.environ)
        self.env_dirty = False
        self.gpu_ids: list = []  # zray.get_gpu_ids() of the current call
        self.actor: Optional[ActorHost] = None  # set once this process's actor is built
        self.spec: Optional[P.TaskSpec] = None  # the task or sync actor call running now
        self.actor_spec: Optional[P.TaskSpec] = None  # the creation of the actor hosted here
        self.block_lock = threading.Lock()
        self.blocked = False
        self.renv: Optional[RuntimeEnvSetup] = None  # this process's runtime_env, once set up
        self.retiring = False  # leave the pool after this call (its runtime_env failed)
        signal.signal(signal.SIGUSR1, self._on_sigusr1)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.client = Client(env["ZRAY_ADDRESS"], kind="executor", node_id=self.node_id,
                             cid=self.cid, on_exec=self._on_exec, on_cancel=self._on_cancel,
                             token=bytes.fromhex(env.pop("ZRAY_EXEC_TOKEN", "")))
        self.client.on_block = self._on_block
        self.client.on_unblock = self._on_unblock
        if self.client.store is not None:  # the same large argument, task after task
            self.client.store.keep_reads()
        _runtime.client = self.client
        _runtime.worker_mode = True
        self.logs = LogForwarder(self.client)
        self.stdout = TaskStream(self.logs.forward, sys.stdout, False, self.logs.mark)
        self.stderr = TaskStream(self.logs.forward, sys.stderr, True, self.logs.mark)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.results = ResultSender(self.client, self.cancelled, self.pid)
        self.held = self.results.held = HeldDones(self.client)  # (plain tasks only)
        self.tasks = TaskRunner(self)
        self.lease = _lease.start(self)  # leased to a client now and then: workerd/lease.py

    # ------------------------------------------------------------ I/O thread
    def _on_exec(self, msg, frames):
        if msg.TYPE == Msg.RECALL:
            self._recall(set(msg.task_ids))
            return
        if msg.TYPE == Msg.LEASE and self.lease is not None:
            if msg.active:
                self.lease.latest = msg.lease_id
            elif msg.lease_id != self.lease.latest:
                return  # a revoke of a lease already over: it must not end the next one
        with self.block_lock:
            if self.blocked and msg.TYPE == Msg.EXEC and msg.spec.kind == P.TASK:
                # A prefetched task arrived while our task waits in get(): it could be
                # the very task we wait for, so hand it back to be run elsewhere.
                self.keep_fn(msg, frames)
                self.client.send(P.encode(P.Reject(msg.spec.task_id)))
                return
            self.queue.put((msg, frames))
        if self.lease is not None:
            self.lease.wake()  # (a leased main thread polls its lane: see workerd/lease.py)

    def keep_fn(self, msg, frames):
        if msg.fn_included:  # the EXEC carried the function blob: keep it, the broker counts on it
            self.fns.setdefault(msg.spec.fid, frames[0])

    def _on_block(self) -> list:
        """Main thread, about to wait in get(): return the prefetched tasks not started.
        The DONEs held back go first: what it waits for may be one of them."""
        self.held.flush(masked=True)
        if self.lease is not None:  # leased: the calls queued behind it go back (lease.py)
            self.lease.blocked()
        with self.block_lock:
            self.blocked = True
            return self._take_queued(lambda task_id: True)

    def _take_queued(self, wanted) -> list:
        """(under block_lock) Take the queued task EXECs whose ids ``wanted`` accepts out of
        the queue (their function blobs kept), leaving everything else in order; their ids."""
        taken, keep = [], []
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            m = item[0]
            if m.TYPE == Msg.EXEC and m.spec.kind == P.TASK and wanted(m.spec.task_id):
                self.keep_fn(m, item[1])
                taken.append(m.spec.task_id)
            else:
                keep.append(item)
        for item in keep:  # (in order: the main thread takes them first to last)
            self.queue.put(item)
        return taken

    def _recall(self, task_ids: set) -> None:
        """I/O thread: the broker wants these tasks sent ahead back (the task running here
        takes long and another executor is idle): those still queued go back, REJECTed;
        one the main thread already took runs here as usual."""
        with self.block_lock:
            back = self._take_queued(task_ids.__contains__)
        for task_id in back:
            self.client.send(P.encode(P.Reject(task_id)))

    def _on_unblock(self):
        with self.block_lock:
            self.blocked = False

    def _on_cancel(self, task_id: bytes, force: bool):
        self.cancelled.add(task_id)
        actor = self.actor
        if actor is not None:
            actor.cancel(task_id)
        elif self.running_task == task_id:
            signal.pthread_kill(self.main_thread, signal.SIGUSR1)

    def _on_sigterm(self, signum, frame):
        """SIGTERM from the node agent (it stops): leave the loop; a plain task running
        now is not waited for (as Ray's workers do; the broker retries it elsewhere per
        max_retries, its node being gone): a driver's exit used to wait out the agent's
        2 s grace for every task still running. An actor's call ends first (the agent
        SIGKILLs stragglers after its grace period)."""
        if self.running_task and self.actor is None:
            os._exit(128 + signum)
        self.queue.put((P.Exit(), []))

    def _on_sigusr1(self, signum, frame):
        tid = self.running_task
        if tid and tid in self.cancelled:
            raise exceptions.TaskCancelledError(tid.hex())

    # ------------------------------------------------------------- main loop
    def serve(self):
        self.client.send(P.encode(P.Ready()))
        run_task = self.tasks.run
        exec_type, task, actor_call = Msg.EXEC, P.TASK, P.ACTOR_CALL  # looked up once, not per task
        held, empty = self.held, self.queue.empty
        while True:
            if held.items and empty():  # nothing more to run now: send what was held back
                held.flush()
            # (a plain actor's direct calls come from its own socket too: workerd/direct.py)
            msg, frames = self.next_item()
            if msg.TYPE != exec_type:
                if msg.TYPE == Msg.LEASE and self.lease is not None:
                    held.flush()
                    try:
                        self.lease.serve(msg, frames)
                    except SystemExit as e:
                        self.system_exit(e)
                    except ActorExit:  # (as the broker path's tasks)
                        self.exit_actor()
                    continue
                held.flush()
                break
            try:
                kind = msg.spec.kind
                if kind == task:
                    if run_task(msg, frames) and msg.spec.options.get("max_calls"):
                        if self.count_call(msg.spec):
                            self.retire()
                            break
                    elif self.retiring:  # its runtime_env failed: a later task tries anew
                        self.retire()
                        break
                elif kind == actor_call:
                    self.actor.handle(msg, frames)
                else:
                    create_actor(self, msg, frames)
            except ActorExit:
                self.exit_actor()
            except SystemExit as e:
                self.system_exit(e)
            except Exception:
                log.exception("executor failure")
            if self.client.forked:  # user code forked and the child got back here
                exit_forked_child()
        self.client.close()

    def count_call(self, spec: P.TaskSpec) -> bool:
        """Count a finished call of a function with ``max_calls``; True when this process
        has run it that many times and must be replaced (as Ray does)."""
        n = self.calls[spec.fid] = self.calls.get(spec.fid, 0) + 1
        limit = spec.options["max_calls"]
        return type(limit) is int and n >= limit

    def retire(self) -> None:
        """Leave the pool after max_calls: EXIT (after the last DONE, same socket), then
        wait for the broker's EXIT back; EXECs that arrive meanwhile were sent ahead and the
        broker queues them again, so they are dropped here."""
        self.held.flush()
        self.client.send(P.encode(P.Exit()))
        deadline = time.monotonic() + P.BROKER_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                msg, _ = self.queue.get(timeout=left)
            except queue.Empty:
                return
            if msg.TYPE != Msg.EXEC:
                return

    def exit_actor(self, code: int = P.ACTOR_EXIT_CODE):
        """Leave now (any thread). With ACTOR_EXIT_CODE the broker restarts nothing; the
        call that exited gets no reply (the broker fails it when it learns of the exit)."""
        self.results.exiting = True  # calls still running on other threads fail with us
        self.held.flush()  # (finished before: their results stand)
        self.stdout.flush()
        self.stderr.flush()
        self.client.close()
        os._exit(code)

    def system_exit(self, e: SystemExit):
        """``sys.exit()`` in user code ends the process, as in Ray: a task fails as if
        its worker crashed (WorkerCrashedError, retried per max_retries); an actor dies,
        intentionally (no restart) only for ``sys.exit(0)`` (Ray: exit code None or
        non-zero is a system error, so max_restarts applies)."""
        if self.client.forked:  # the child of a task's os.fork(): end it as Python would
            exit_forked_child(e)
        code = e.code
        log.warning("sys.exit(%r) in %s: the executor exits", code,
                    "an actor" if self.client.current_actor_id else "a task")
        if code == 0 and self.client.current_actor_id:
            self.exit_actor(P.ACTOR_EXIT_CODE)
        self.exit_actor(code if type(code) is int and code not in (0, P.ACTOR_EXIT_CODE)
                        else 1)

    # ------------------------------------------------- per call, main thread
    def load_fn(self, fid: bytes):
        fn = self.fns[fid]
        if isinstance(fn, (bytes, memoryview)) or hasattr(fn, "buffer"):
            fn = cloudpickle.loads(fn.buffer if hasattr(fn, "buffer") else fn)
            self.fns[fid] = fn
        return fn

    def load_call(self, msg: P.Exec, frames: list) -> Optional[tuple]:
        """Keep the EXEC's function blob and decode its arguments: ``(args, kwargs)``,
        or None when the call is already answered (cancelled, or its arguments failed)."""
        spec = msg.spec
        pos = 0
        if msg.fn_included:
            self.fns[spec.fid] = frames[0]
            pos = 1
        if spec.task_id in self.cancelled:
            self.results.cancelled_error(spec)
            return None
        renv = spec.options.get("renv")
        if renv is not None and spec.kind != P.ACTOR_CALL:
            # Before the arguments and the function are unpickled: they may need its modules.
            try:
                self.setup_env(renv)
            except BaseException as e:  # noqa: B036 - reported to the caller
                self.results.finish_error(spec, e)
                self.retiring = spec.kind == P.TASK
                return None
        try:
            n_args = msg.n_args
            if n_args:
                args, kwargs = deserialize(frames[pos:pos + n_args])
                args = list(args)
            else:
                args, kwargs = [], {}
            pos += n_args
            client = self.client
            for (index, oid), (n, loc) in zip(spec.deps, msg.deps, strict=True):
                if loc is None:
                    value = deserialize(frames[pos:pos + n])
                    pos += n
                elif loc == client.node_id:
                    _, stored = client.store.read(oid)
                    value = deserialize(stored)
                else:  # in another node's store: the broker copies it to ours first
                    value = client.get_values([ObjectRef(oid, b"", client)], None)[0]
                if index == -1:  # the whole (args, kwargs), too large to travel inline
                    args, kwargs = list(value[0]), value[1]
                elif isinstance(index, int):
                    args[index] = value
                else:
                    kwargs[index] = value
        except BaseException as e:  # noqa: B036 - reported to the caller
            self.results.finish_error(spec, e)
            return None
        return args, kwargs

    def setup_env(self, wire) -> None:
        """Set this process up for the runtime_env ``wire`` (once; see workerd/renv.py)."""
        setup = self.renv
        if setup is None:
            setup = self.renv = RuntimeEnvSetup(self.client)
        elif setup.error is None and type(wire) is dict and setup.key == wire.get("key"):
            return
        updates = setup.apply(wire)
        os.environ.update(updates)
        self.base_env.update(updates)

    def prepare(self, spec: P.TaskSpec, gpu_ids: list) -> None:
        """Set the context, env_vars and GPUs a call runs under."""
        self.spec = spec
        client = self.client
        client.current_task_id = spec.task_id
        client.current_task_name = spec.name
        client.job_id = spec.job
        client.driver_cid = spec.driver
        self.logs.driver = spec.driver
        self.logs.task = spec
        env_vars = spec.options.get("env_vars")
        if spec.kind != P.ACTOR_CALL:  # an actor keeps what it was created with, GPUs too
            # What this task runs with, its children inherit (Ray: runtime_env is inherited).
            renv = spec.options.get("renv")
            _runtime.job_renv = renv
            _runtime.job_runtime_env = ({"env_vars": env_vars} if env_vars else {}) if (
                env_vars or renv) else _NO_ENV
            self.gpu_ids = gpu_ids
        if env_vars:
            os.environ.update(env_vars)
            self.env_dirty = True
        if gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
            self.env_dirty = True

    def restore(self) -> None:
        """After a task (or a failed actor creation): flush its output, undo ``prepare``.

        An actor keeps its environment for life and never calls this."""
        self.stdout.flush()
        self.stderr.flush()
        self.client.current_task_id = b""
        self.spec = None
        if self.env_dirty:  # comparing os.environ costs ~120 us: only after we changed it
            self.env_dirty = False
            os.environ.clear()
            os.environ.update(self.base_env)
        self.gpu_ids = []


def main():
    die_with_parent(int(os.environ.get("ZRAY_PARENT_PID", "0")) or None)
    setup_logging("executor", None, stderr=True, level=logging.WARNING)
    ex = ExecutorProcess()
    _runtime.executor = ex
    # Everything imported so far lives as long as the process: keep it out of every
    # collection (user code's own garbage is still collected as usual).
    gc.freeze()
    prof = os.environ.get("ZRAY_PROFILE_EXECUTOR")
    if prof:  # cProfile the main loop; stats land in PATH.<pid> at exit
        import cProfile

        cProfile.runctx("ex.serve()", globals(), {"ex": ex}, f"{prof}.{os.getpid()}")
    else:
        ex.serve()
    os._exit(0)


if __name__ == "__main__":
    main()
