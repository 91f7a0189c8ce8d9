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

from typing import TYPE_CHECKING

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
        results = proc.results
        self.generator_returns = results.generator_returns
        self.finish_values = results.finish_values
        self.finish_error = results.finish_error
        self.cancelled_error = results.cancelled_error

    def run(self, msg: P.Exec, frames: list) -> bool:
        """Run one task to its end and send its results or its error (main thread).
        Returns whether the function was called (``max_calls`` counts those)."""
        loaded = self.load_call(msg, frames)
        if loaded is None:
            return False
        args, kwargs = loaded
        spec = msg.spec
        task_id = spec.task_id
        proc = self.proc
        self.prepare(spec, msg.gpu_ids)
        self.logs.prefix = f"({spec.name} pid={self.pid})"
        try:
            fn = self.load_fn(spec.fid)
            proc.running_task = task_id
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
        except (ActorExit, SystemExit):
            raise  # the serve loop ends the process (sys.exit: a crash, as in Ray)
        except BaseException as e:  # noqa: B036 - user code may raise anything
            self.finish_error(spec, e)
            return True
        finally:
            self.restore()
        if task_id in self.cancelled:
            self.cancelled_error(spec)
            return True
        self.finish_values(spec, outs)
        return True
