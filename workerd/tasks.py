"""Plain tasks: one at a time, on the executor's main thread.

::

    EXEC (TASK) --> load_call: function blob, args --> prepare: env, GPUs, context
                                                          |
                                  fn(*args, **kwargs) on the main thread
                                  (running_task set: a cancel interrupts it here)
                                                          |
                          restore: flush output, env, GPUs, context
                                                          |
        value(s) / generator / exception --> ResultSender --> DONE / YIELD...
                                   (a short task's DONE may wait for the next ones: held.py)
        sys.exit() --> the serve loop ends the process: the broker fails or retries
                       the task as a crash (WorkerCrashedError), as Ray does

The task runs on the main thread so that a cancel can interrupt it anywhere,
``time.sleep`` and blocking I/O included: ``ExecutorProcess`` marks the task
cancelled and sends SIGUSR1 to the main thread, whose handler raises
TaskCancelledError while ``running_task`` is that task. A cancel that lands
after the function returned still reports the task cancelled.

This runs once per task: it keeps the bound methods it calls and adds no
layers between the serve loop and the user's function.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from workerd.held import SHORT_S
from workerd.results import split_returns
from zray import _protocol as P
from zray.actor import ActorExit

if TYPE_CHECKING:
    from workerd.executor import ExecutorProcess


class TaskRunner:
    """Runs plain tasks (``P.TASK``) on the main thread and sends their results."""

    def __init__(self, proc: ExecutorProcess):
        self.proc = proc
        self.pid = proc.pid
        self.logs = proc.logs
        self.cancelled = proc.cancelled
        self.load_call = proc.load_call
        self.load_fn = proc.load_fn
        self.prepare = proc.prepare
        self.restore = proc.restore
        results = self.results = proc.results
        self.held = proc.held
        self.queue = proc.queue
        self.ran: dict = {}  # fid -> seconds its last call here took (may its DONE be held?)
        self.generator_returns = results.generator_returns
        self.finish_values = results.finish_values
        self.finish_error = results.finish_error
        self.cancelled_error = results.cancelled_error

    def run(self, msg: P.Exec, frames: list) -> bool:
        """Run one task to its end and send its results or its error (main thread).
        Returns whether the function was called (``max_calls`` counts those)."""
        spec = msg.spec
        held = self.held
        if held.items and (self.ran.get(spec.fid, 1.0) >= SHORT_S or spec.num_returns < 0):
            held.flush()  # this one may run long: the DONEs held must not wait for it
        loaded = self.load_call(msg, frames)
        if loaded is None:
            return False
        args, kwargs = loaded
        task_id = spec.task_id
        proc = self.proc
        self.prepare(spec, msg.gpu_ids)
        self.logs.prefix = f"({spec.name} pid={self.pid})"
        took, error = 1.0, None
        try:
            fn = self.load_fn(spec.fid)
            proc.running_task = task_id
            t0 = perf_counter()
            try:
                result = fn(*args, **kwargs)
                if spec.num_returns < 0:  # a generator: streamed, or stored item by item
                    outs = self.generator_returns(spec, result)
                    if outs is None:
                        return True
                else:
                    outs = split_returns(spec, result)
            finally:
                proc.running_task = b""
                took = self.ran[spec.fid] = perf_counter() - t0
        except (ActorExit, SystemExit):
            raise  # the serve loop ends the process (sys.exit: a crash, as in Ray)
        except BaseException as e:  # noqa: B036 - user code may raise anything
            error = e
        finally:
            self.restore()
        self.finish(spec, outs if error is None else None, error, took)
        return True

    def finish(self, spec: P.TaskSpec, outs, error, took: float) -> None:
        """Send the call's values or error; its DONE is held back (workerd/held.py) when
        the call was short and the next EXEC is already here: it goes with the next ones."""
        results = self.results
        results.hold = took < SHORT_S and not self.queue.empty()
        try:
            if error is not None:  # (a cancel that came while it ran: TaskCancelledError)
                self.finish_error(spec, error)
            elif spec.task_id in self.cancelled:
                self.cancelled_error(spec)
            else:
                self.finish_values(spec, outs)
        finally:
            results.hold = False
