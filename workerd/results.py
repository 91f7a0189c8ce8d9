"""What a finished call sends: its return values, its stream items or its error.

::

    return values --serialize--> small: inline frames --------------------+
                                 large: written to this node's store -----+
                                                                          v
        owner on this node <--OBJ (PUSH)-- push_results          DONE + frames --> broker
    generator items (STREAMING) --serialize--> YIELD + frames --> broker ... then an empty DONE
    generator items (DYNAMIC) --put--> objects of their own; the one return value is a
                                       DynamicObjectRefGenerator of their refs
    an exception --task_error--> DONE: one ERROR per return, retryable? --> broker

Every call ends in exactly one DONE to the broker, which keeps the books and
frees the call's resources. A plain task's DONE may be held back and sent with
the next ones (``send_done``, workerd/held.py), never out of order. A result holding no refs is also pushed straight
to its owner when the owner runs on this node (``Client.push_direct``): three
hops instead of four (not for an actor call: its caller may kill the actor as
soon as it has the value, before the broker has the DONE, see ``pushable``). ``Done.pushed`` tells the broker which results went
that way; it forwards the others. A result holding refs goes only through the
broker, which must learn of those refs (PUTs sent on the same socket before
this DONE) before the owner can use them.

An error is retryable when the call's ``retry_exceptions`` covers it and it
is not a cancellation: the broker runs the task again instead of storing the
error, so nothing is pushed. A call cancelled while it ran reports
TaskCancelledError, whatever it raised.

Used from the main thread, an actor's thread pool and its event loop thread;
the client's out socket locks itself.
"""

from __future__ import annotations

import inspect
from typing import Optional

import cloudpickle

from workerd.held import HOLD_MAX
from zray import _protocol as P
from zray import exceptions
from zray._client import Client
from zray._procutil import exit_forked_child
from zray._refs import DynamicObjectRefGenerator, ObjectRef
from zray._serialization import deserialize, serialize, task_error
from zray.actor import ActorExit


def pushable(spec: P.TaskSpec) -> bool:
    """Whether a call's results may go straight to a local owner (``push_results``)."""
    # Not an actor call (broker path): its caller may kill the actor once it has the
    # value, and the kill overtook the DONE (a push is one syscall on the lane, the
    # DONE waits for libzmq's I/O thread, and a SIGKILL loses it): the broker then
    # failed the call, so a task given the ref got ActorDiedError and the state API
    # listed the call FAILED. Its direct calls never go through the broker at all.
    # (This also covers a restartable actor's calls, which the broker may run again, and
    # max_pending_calls calls, which the caller may only see finished after the broker.)
    return not (spec.kind in (P.ACTOR_CREATE, P.ACTOR_CALL) or spec.num_returns <= 0)


def split_returns(spec: P.TaskSpec, result) -> list:
    """A call's result as its list of ``num_returns`` values."""
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


class ResultSender:
    """Sends the results of calls: DONE (values or error) and YIELD (stream items)."""

    def __init__(self, client: Client, cancelled: set, pid: int):
        self.client = client
        self.cancelled = cancelled  # task ids cancelled while queued or running (shared)
        self.pid = pid
        self._ip = None  # this node's address, for RayTaskError's (pid=, ip=)
        # exit_actor() began: calls still running on other threads of a threaded or async
        # actor send nothing, so they fail with ActorDiedError like the calls queued behind
        self.exiting = False
        self.direct = None  # workerd.direct.DirectServer: calls that came direct reply there
        self.held = None  # workerd.held.HeldDones of a pool executor (plain tasks)
        self.hold = False  # hold this call's DONE back (set by the task runner per call)

    @property
    def ip(self) -> str:
        if self._ip is None:
            from zray.util.node import get_node_ip_address

            self._ip = get_node_ip_address()
        return self._ip

    def generator_returns(self, spec: P.TaskSpec, result) -> Optional[list]:
        """A generator call's result (``num_returns`` < 0). STREAMING: send its items
        now and return None (the call is answered). DYNAMIC: store each item as an
        object of its own and return the one value, a DynamicObjectRefGenerator of
        their refs; an error the generator raises is its last item, as in Ray."""
        if spec.num_returns == P.STREAMING:
            self.stream(spec, result)
            return None
        client = self.client
        refs = []
        try:
            for value in result:
                refs.append(client.put(value, ObjectRef))
        except (ActorExit, SystemExit):
            raise
        except BaseException as e:  # noqa: B036 - user code may raise anything
            refs.append(client.put(self.error_value(spec, e), ObjectRef, P.ERROR))
        return [DynamicObjectRefGenerator(refs)]

    def error_value(self, spec: P.TaskSpec, exc: BaseException) -> BaseException:
        """``exc`` as the RayTaskError a caller's get() raises."""
        return deserialize(task_error(exc, spec.name, self.pid, self.ip)[0])

    def stream(self, spec: P.TaskSpec, gen) -> None:
        """Send each item of a generator task as a YIELD, then an empty DONE."""
        task_id = spec.task_id
        i = 0
        try:
            for value in gen:
                i += 1
                self.send_item(task_id, i, value)
        except (ActorExit, SystemExit):
            raise  # the executor ends the process; the broker ends the stream
        except BaseException as e:  # noqa: B036
            self.finish_error(spec, e)
            return
        self.client.send(P.encode(P.Done(task_id, [], [], False, [], "")))

    async def stream_async(self, spec: P.TaskSpec, agen) -> None:
        """``stream`` for an async generator (an async actor's method, on its loop)."""
        task_id = spec.task_id
        i = 0
        try:
            async for value in agen:
                i += 1
                self.send_item(task_id, i, value)
        except (ActorExit, SystemExit):
            raise
        except BaseException as e:  # noqa: B036 - a cancel (CancelledError) included
            self.finish_error(spec, e)
            return
        self.client.send(P.encode(P.Done(task_id, [], [], False, [], "")))

    def send_item(self, task_id: bytes, index: int, value) -> None:
        frames, nested = serialize(value)
        self.client.send(P.encode(P.Yield(task_id, index, P.VALUE, len(frames), nested)), frames)

    def finish_values(self, spec: P.TaskSpec, values: list) -> None:
        """Send DONE with ``values``, pushing them to a local owner first where possible."""
        if self.client.forked:  # the child of a task's os.fork() returned: end it
            exit_forked_child()
        if self.exiting:
            return
        direct = self.direct
        if direct is not None and spec.task_id in direct.calls:
            try:
                direct.finish_values(spec, values)
            except BaseException as e:  # noqa: B036 - e.g. a value that does not pickle
                self.finish_error(spec, e)
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
        self.send_done(spec, layout, frames, nested, False, "")

    def send_done(self, spec: P.TaskSpec, layout: list, frames: list, nested: list,
                  retryable: bool, text: str) -> None:
        """DONE to the broker (its results first to a local owner, where they may go),
        now or, when ``hold`` is set for this call, with the next DONEs (workerd/held.py)."""
        held = self.held
        if held is not None:
            if self.hold and not nested:
                held.add((spec, layout, frames, nested, retryable, text,
                          not retryable and pushable(spec)))
                if len(held) >= HOLD_MAX:
                    held.flush()
                return
            held.flush()  # (the broker must see the DONEs in the order the tasks ran)
        # Results holding refs go through the broker: it must learn of those refs (PUTs on
        # our socket, processed in order before this DONE) before the owner can use them.
        # A retryable error is not a result: the task runs again.
        pushed = [] if nested or retryable else self.push_results(spec, layout, frames)
        self.client.send(P.encode(P.Done(spec.task_id, layout, nested, retryable, pushed, text)),
                         frames)

    def push_results(self, spec: P.TaskSpec, layout: list, frames: list) -> list:
        """Hand the results straight to an owner on this node (one hop instead of two
        through the broker, which still gets DONE for its books). Returns, per result,
        whether it went; the broker pushes the others."""
        if not pushable(spec):
            return []
        owner = spec.owner
        pushed, pos = [], 0
        for i, (kind, n, node_id, _) in enumerate(layout, 1):
            header = P.encode(P.Obj(P.object_id(spec.task_id, i), kind, node_id, None))
            pushed.append(self.client.push_direct(owner, header, frames[pos:pos + n]))
            pos += n
        return pushed

    def finish_error(self, spec: P.TaskSpec, exc: BaseException) -> None:
        """Send DONE with ``exc`` as every return (retryable if ``retry_exceptions`` says so)."""
        if self.client.forked:  # the child of a task's os.fork() raised (or sys.exit)
            exit_forked_child(exc)
        if self.exiting:
            return
        task_id = spec.task_id
        if task_id in self.cancelled and not isinstance(exc, exceptions.TaskCancelledError):
            exc = exceptions.TaskCancelledError(task_id.hex())
        self.cancelled.discard(task_id)
        frames, text = task_error(exc, spec.name, self.pid, self.ip)
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
        direct = self.direct
        if direct is not None and task_id in direct.calls:
            direct.reply(task_id, [[P.ERROR, len(frames)]] * n, frames * n, retryable, text)
            return
        self.send_done(spec, [[P.ERROR, len(frames), None, 0]] * n, frames * n, [], retryable,
                       text)

    def cancelled_error(self, spec: P.TaskSpec) -> None:
        """Send DONE with TaskCancelledError: the call was cancelled before it could finish."""
        self.finish_error(spec, exceptions.TaskCancelledError(spec.task_id.hex()))
