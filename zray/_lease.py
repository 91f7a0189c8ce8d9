"""Leased executors, the holder's side: plain tasks skip the broker, one by one or in bursts.

::

    f.remote() --submit()--> plain task, STREAK such of one function and shape in a row?
         |                      --REQ task_lease {fid, resources}--> broker (brokerd/leases.py):
         |                        an idle executor of our node, its resources held for us
         |                      connect <store>/t-<executor cid> (zray/_lane.py), LEASE hello
         |--> leases held for this function and shape: DCALL on the lease with the fewest
         |      calls in flight while it has fewer than WINDOW (zray/_direct.py's machinery:
         |      a route whose lane is the lease), else into ``backlog``; while calls queue
         |      (more than one per lease), one more lease is asked for (MAX_LEASES at most)
         '--> otherwise: SUBMIT to the broker, as before (our idle leases but one go back)
    get() in the calling thread, or the I/O thread <--DDONE on a lane-- a leased executor
         (workerd/lease.py); each answer lets the next backlog calls onto that lane
    LEASE(active=False, running) on the lane: the executor ended the lease (idle, revoked,
         or its task waits in get()); the calls we sent that it did not answer before it
         never ran, but for ``running``, whose DDONE follows: resubmitted through the
         broker, as is the backlog when no lease is left
    the lane closes without that (the executor died): the first call not answered is the
         one it ran (it runs them in order): resubmitted through the broker while it has
         max_retries left, else WorkerCrashedError (TaskCancelledError if cancelled with
         force); those behind it never ran: resubmitted, retries untouched
    LEASE(active=False) from the broker: the executor ended the lease before it took our
         lane (we connected too late: our hello waits unread): none of its calls ran; it
         may come before the grant's REPLY is handled (``ended_early``)

Which tasks: a plain task (not an actor's) of one function with one return, no
ObjectRef arguments (top-level or nested), only CPUs (no GPUs, custom resources,
memory, accelerator type), and no options but ``max_retries`` and
``retry_exceptions`` (so no runtime_env, scheduling strategy, placement group,
``max_calls``, generators). Anything else takes the broker path unchanged. The
first lease is asked for only after STREAK such tasks of the same function and shape
in a row, by a driver or executor with a store on this node; a refused one is asked
for again FIRST_BACKOFF_S later, doubling up to REFUSED_BACKOFF_S.

Results are the caller's values the broker never heard of, exactly as direct actor
calls' (``DirectCalls.unregistered``; a backlog call's from when it is queued): a ref
that escapes is PUT to the broker first; dropping the last ref sends nothing.
``ray.cancel`` of a call running on a lease asks the broker (REQ lease_cancel), which
interrupts it on the leased executor (forced: ends its process); of a call queued
behind it on the lease, fails it here at once and has the executor skip it (nothing
killed); of a backlog call, fails it here. The executor reports the tasks it ran to
the broker in batches (list_tasks, timeline). ``ZRAY_TASK_LEASES=0`` turns leases off
(read here and by workerd/lease.py); ``ZRAY_TASK_LEASE_WINDOW`` (calls in flight per
lease) and ``ZRAY_TASK_LEASE_MAX`` (leases per holder) tune them.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time

from zray import _direct, _lane, exceptions
from zray import _protocol as P
from zray._procutil import env_number
from zray._serialization import serialize_error

log = logging.getLogger("zray.lease")

ENABLED = os.environ.get("ZRAY_TASK_LEASES", "1") != "0"  # (checked: workerd/lease.py)
STREAK = 3  # tasks of one shape in a row before a lease is asked for
REFUSED_BACKOFF_S = 1.0  # a refused lease is asked for again this much later at most ...
FIRST_BACKOFF_S = 0.002  # ... and this soon at first (doubling), while a burst goes on
# calls in flight on one lease (sent, not answered): its executor runs them in order, so
# a short queue there hides the round trip; ZRAY_TASK_LEASE_WINDOW=1 is the sync lease
WINDOW = env_number("ZRAY_TASK_LEASE_WINDOW", 64, 1, 1024, int, "calls in flight per lease")
# leases one holder asks for while calls queue on the ones it has (the broker lends at
# most one per idle executor of the node, and only CPUs that are free)
MAX_LEASES = env_number("ZRAY_TASK_LEASE_MAX", 64, 1, 64, int, "leases per holder")
BACKLOG_MAX = 100_000  # calls queued here for the leases; beyond: the broker path
_OPTIONS = frozenset({"max_retries", "retry_exceptions"})


def for_client(client):
    """The client's TaskLeases (made on first use), or None where leases cannot be had."""
    leases = client.leases
    if leases is None:
        if (not ENABLED or client.store is None or client.direct is None
                or not client.direct.reply_to or client.kind not in ("driver", "executor")):
            return None
        leases = client.leases = TaskLeases(client)
    return leases


class _LeaseRoute(_direct._Route):
    """A lease seen as a route by zray/_direct.py: its lane carries the calls. ``state``:
    alive (takes calls), ending (the end mark named a call still running: its lane is
    read until its DDONE), ended."""

    __slots__ = ("leases", "lease_id", "fid", "resources", "end_seen")


class TaskLeases:
    """One client's leases (all of one function and shape), the calls queued for them
    (``backlog``) and the streak that asks for the first one."""

    def __init__(self, client):
        self.client = client
        self.direct = client.direct
        self.routes: list = []  # the leases that take calls now (_LeaseRoute, alive)
        self.lkey = None  # (fid, CPUs) of those leases
        self.backlog: collections.deque = collections.deque()  # _Calls for them, not sent
        self.key = None  # (fid, resources) of the streak
        self.streak = 0
        self.wait_until = 0.0  # no lease asked for before this (refused lately)
        self.backoff = FIRST_BACKOFF_S
        self.free = 0  # CPUs free when the broker last refused a lease (no executor)
        # tasks that went on leases (tests and benchmarks read it): a call handed back to
        # the broker's path before it ran (a lease's end, a backlog with no lease left) is
        # taken off again
        self.sent = 0
        self.granted = 0
        # lease ids whose end came before their route was made (the broker's end of a lease
        # its executor ended before taking our lane can overtake the grant's REPLY): the
        # last few, so that _acquire drops such a lease instead of waiting on it for good
        self.ended_early: collections.deque = collections.deque(maxlen=64)

    @property
    def route(self):
        """The first lease that takes calls, or None (tests read it)."""
        return self.routes[0] if self.routes else None

    # ------------------------------------------------------------ submit
    def submit(self, spec: P.TaskSpec, frames: list, keep) -> bool:
        """Send ``spec`` on a lease (or queue it for one), asking for a lease first where
        a streak says so; False when it must go through the broker (the caller SUBMITs it)."""
        res = spec.resources
        cpu = res.get("CPU")
        if (spec.deps or spec.nested or spec.num_returns != 1 or len(res) != 1
                or type(cpu) is not int or cpu <= 0 or not _OPTIONS.issuperset(spec.options)):
            self.streak = 0
            if len(self.routes) > 1:
                self._trim()
            return False
        key = (spec.fid, cpu)
        if self.routes and key == self.lkey:
            # every lease busy: this call would wait behind another, so ask for one more
            # lease first (Ray runs such a task at once where a CPU is free: tasks that
            # wait for each other without get() must not sit on one executor)
            if all(r.inflight for r in self.routes):
                if len(self.routes) < MAX_LEASES and time.monotonic() >= self.wait_until:
                    self._more(spec.fid, cpu)
                if self.free > 0 and all(r.inflight for r in self.routes):
                    self.free -= 1  # a CPU is free but no executor to lend: the broker's
                    return False  # path runs it now, not after the calls on our leases
            return self._send(spec, frames, keep)
        if key != self.key:
            self.key, self.streak = key, 0
        if len(self.routes) > 1:
            self._trim()
        self.streak += 1
        if self.streak < STREAK or time.monotonic() < self.wait_until:
            return False
        if self.client._awaiting > 1:  # (1: this task's own return)
            # our earlier tasks are in flight through the broker: a lease now would let
            # these overtake them (one caller's tasks on one CPU run in submission order);
            # a burst takes a lease at its first task once the last one is in
            return False
        if self.routes:  # leases of another function or shape: give them back first
            if not self._give_back_all():
                return False
        if self._acquire(spec.fid, cpu) is None:
            self.streak = 0
            self.wait_until = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, REFUSED_BACKOFF_S)
            return False
        self.backoff = FIRST_BACKOFF_S
        return self._send(spec, frames, keep)

    def _more(self, fid: bytes, cpu: int) -> None:
        """Ask for one more lease; the backlog spreads onto it. Refused: not again for a
        while (backing off as for the first)."""
        route = self._acquire(fid, cpu)
        if route is None:
            self.wait_until = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, REFUSED_BACKOFF_S)
            return
        self.backoff = FIRST_BACKOFF_S
        with self.direct.lock:
            self.answered(route)

    def _send(self, spec: P.TaskSpec, frames: list, keep) -> bool:
        """On the lease with the fewest calls in flight while it has room in its window,
        else into the backlog, which the leases' answers drain (``answered``)."""
        mr = spec.options.get("max_retries", 0)
        call = _direct._Call(spec, frames, keep, mr if type(mr) is int else 0)
        direct = self.direct
        with direct.lock:
            routes = [r for r in self.routes if r.state == "alive" and r.lane is not None]
            if not routes:
                return False
            route = min(routes, key=lambda r: len(r.inflight))
            if len(route.inflight) < WINDOW and not self.backlog:
                self._send_on(route, call)
                self.sent += 1
                return True
            if len(self.backlog) >= BACKLOG_MAX:
                return False
            self.backlog.append(call)
            direct.unregistered.update(spec.return_ids())
            lanes = [r.lane for r in routes]
        # nobody may come to read the lanes for these: the I/O thread drains them
        direct.need_io(lanes)
        self.sent += 1
        return True

    def _send_on(self, route: _LeaseRoute, call, later: bool = False) -> None:
        """(under direct.lock) A DCALL on the lease's lane (``later``: queued on it, sent by
        ``_flush_lane``). Its frames are kept until answered: sent again through the
        broker if the lease ends unread."""
        direct, spec = self.direct, call.spec
        task_id, lane = spec.task_id, route.lane
        route.inflight[task_id] = call
        call.lane = lane
        direct.by_task[task_id] = route
        direct.unregistered.update(spec.return_ids())
        header = P.encode(P.DCall(spec, len(call.frames), route.reply_to))
        if not later:
            direct._send_lane(lane, header, call.frames)
            return
        try:
            lane.send(header, call.frames, later=True)
        except _lane.LaneClosed:
            pass  # (its reader sees it closed: broke() settles the call)

    def _flush_lane(self, lane) -> None:
        """(under direct.lock) Send what ``_send_on(later=True)`` queued: one syscall for a
        window's worth of calls; what the socket does not take, the I/O thread sends."""
        direct = self.direct
        client = direct.client
        if client.mask_signals:  # a cancel signal must not cut a message in two
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _direct._CANCEL_SIGNALS)
        try:
            if not lane.flush():
                direct.need_io((lane,), out=True)
        except _lane.LaneClosed:
            direct.send_broke(lane)  # (read to its end: the end mark may be there)
        finally:
            if client.mask_signals:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def answered(self, route: _LeaseRoute) -> None:
        """(under direct.lock; _direct.DirectCalls.done) A call on ``route`` was answered:
        its window takes the next queued calls; an ending lease whose last call is in
        is done with."""
        if route.state == "alive":
            backlog, lane = self.backlog, route.lane
            if not backlog or lane is None:
                return
            while backlog and len(route.inflight) < WINDOW:
                self._send_on(route, backlog.popleft(), later=True)
            self._flush_lane(lane)
            # their callers may all wait elsewhere (on ``cond``): the I/O thread reads it
            self.direct.need_io((lane,))
        elif route.state == "ending" and not route.inflight and route.lane is not None:
            lane, route.lane = route.lane, None
            route.state = "ended"
            self.direct._forget_lane(lane)

    def _trim(self) -> None:
        """A task goes through the broker: give back our idle leases but one, so that
        their CPUs are not held from it until they idle out (or a revoke)."""
        with self.direct.lock:
            if self.backlog:
                return
            idle = [r for r in self.routes if not r.inflight]
            for route in idle[:len(idle) - 1] if len(idle) == len(self.routes) else idle:
                self._give_back(route)
                self.routes.remove(route)

    def _give_back_all(self) -> bool:
        """Return every lease (idle) to the broker; False if a call is on one or queued."""
        direct = self.direct
        with direct.lock:
            if self.backlog or any(r.inflight for r in self.routes):
                return False
            for route in self.routes:
                self._give_back(route)
            self.routes = []
        return True

    def _give_back(self, route: _LeaseRoute) -> None:
        """(under direct.lock) Return an idle lease to the broker (REQ lease_return) and
        close its lane (its executor sees it close and sends its last books)."""
        route.state = "ended"
        lane, route.lane = route.lane, None
        self.client.request_nowait("lease_return", {"lease_id": route.lease_id})
        if lane is not None:
            self.direct._forget_lane(lane)

    def _acquire(self, fid: bytes, cpu: int):
        client = self.client
        try:
            info = client.request("task_lease", {"fid": fid, "resources": {"CPU": cpu}},
                                  timeout=P.BROKER_TIMEOUT_S)
        except Exception as e:  # (a broker that does not lease: the broker path, quietly)
            log.debug("no lease: %s", e)
            return None
        if not info or "lease_id" not in info:
            free = info.get("free") if type(info) is dict else 0
            self.free = free if type(free) is int and 0 <= free <= 1024 else 0
            return None
        self.free = 0
        path = os.path.join(client.store.dir, "t-" + info["executor"].hex())
        try:
            lane = _lane.connect(path)
        except OSError as e:  # (its executor ends the lease once it idles)
            log.debug("no lane to the leased executor %s: %s", path, e)
            return None
        lease_id = info["lease_id"]
        try:
            lane.send(P.encode(P.Lease(lease_id, client.cid, True, fid)))
        except _lane.LaneClosed:
            lane.close()
            return None
        route = _LeaseRoute(b"")
        route.leases, route.lease_id, route.fid, route.resources = self, lease_id, fid, cpu
        route.end_seen = False
        route.state = "alive"
        route.reply_to = self.direct.reply_to
        route.lane = lane
        lane.owner = route
        with self.direct.lock:
            if lease_id in self.ended_early:  # over already: nothing was sent on it
                lane.close()
                return None
            self.direct.lanes[lane.fd] = lane
            self.routes.append(route)
            self.lkey = (fid, cpu)
        self.granted += 1
        return route

    # ------------------------------------------------------------ its end
    def ended(self, m: P.Lease) -> None:
        """(whoever reads the lane) LEASE(active=False): the executor ended the lease and
        read nothing after it: the calls it did not answer, but for ``m.running`` (still
        running: its DDONE follows), go through the broker."""
        if m.active:
            return
        direct = self.direct
        with direct.lock:
            route = next((r for r in self.routes if r.lease_id == m.lease_id), None)
            if route is None:
                self.ended_early.append(m.lease_id)  # (its route may not be made yet)
                return
            if route.lane is None:
                return
            route.end_seen = True
            self.routes.remove(route)
            running = route.inflight.pop(m.running, None) if m.running else None
            route.state = "ended"
            self._settle(route, ran=False)
            if running is not None:  # its lane is read till it is answered (or breaks)
                route.inflight[m.running] = running
                route.state = "ending"
            else:
                lane, route.lane = route.lane, None
                direct._forget_lane(lane)
            self._rehome(route)
            self.streak = 0

    def broke(self, route: _LeaseRoute) -> None:
        """(under direct.lock; _direct.DirectCalls._lane_broke) The lane closed: without a
        LEASE end first (or with one naming a call still running), the executor's process
        is gone."""
        if route.state not in ("alive", "ending") and not route.inflight:
            return
        route.state = "ended"
        if route in self.routes:
            self.routes.remove(route)
        self._settle(route, ran=True)
        self._rehome(route)
        self.streak = 0

    def _rehome(self, ended: _LeaseRoute) -> None:
        """(under direct.lock) A lease ended: the queued calls go on the other leases, or
        through the broker when none is left (watched as ``ended``'s)."""
        if not self.backlog:
            return
        routes = [r for r in self.routes if r.state == "alive" and r.lane is not None]
        if routes:
            for r in routes:
                self.answered(r)
            return
        direct = self.direct
        while self.backlog:
            call = self.backlog.popleft()
            direct.unregistered.difference_update(call.spec.return_ids())
            direct._send_broker(ended, call)
            self.sent -= 1

    def _settle(self, route: _LeaseRoute, ran: bool) -> None:
        """(under direct.lock) The calls in flight on an ended lease. Its executor runs
        them in the order sent, so only the first can have started: with ``ran`` False
        (the end mark) none did, and all are resubmitted, retries untouched; with ``ran``
        True (the executor died) the first one is retried while max_retries allows, else
        WorkerCrashedError (TaskCancelledError if cancelled with force), and the others
        are resubmitted as never run."""
        direct, client = self.direct, self.client
        failed, dropped = [], []
        first = ran
        for task_id in list(route.inflight):
            call = route.inflight.pop(task_id)
            direct.by_task.pop(task_id, None)
            spec = call.spec
            ran, first = first, False
            if ran and call.cancel is not None:
                err = exceptions.TaskCancelledError(task_id.hex())
            elif call.frames is not None and (not ran or call.retries != 0):
                if ran:
                    call.retries -= 1
                    log.warning("%s: its leased executor died; retrying the task", spec.name)
                    spec = call.spec = spec._replace(
                        options={**spec.options, "max_retries": call.retries})
                direct.unregistered.difference_update(spec.return_ids())
                direct._send_broker(route, call)
                if not ran:
                    self.sent -= 1  # (it never ran on the lease)
                continue
            elif not ran:  # (sent again after a retryable error, its frames let go)
                err = exceptions.WorkerCrashedError(
                    f"Task {spec.name} could not be retried: its lease ended.")
            else:
                mr = spec.options.get("max_retries", 0)
                err = exceptions.WorkerCrashedError(
                    f"Task {spec.name} failed: its leased executor process died. No retries "
                    f"left (max_retries={mr}).")
            direct.unregistered.difference_update(spec.return_ids())
            failed.append((P.object_id(task_id, 1), (P.ERROR, serialize_error(err))))
            dropped.append(call.keep)
            call.keep = None
        if failed:
            _file(client, failed)

    def cancel(self, route: _LeaseRoute, task_id: bytes, force: bool,
               recursive: bool = True) -> None:
        """(under direct.lock) ray.cancel of a call on the lease: the broker interrupts it
        (forced: ends the executor's process, and the call fails TaskCancelledError), and
        with ``recursive`` cancels the tasks it submitted. A call queued behind another on
        the lease has not started: the executor answers it TaskCancelledError when it
        comes to it, and nothing is killed."""
        call = route.inflight.get(task_id)
        if call is not None and next(iter(route.inflight)) != task_id:
            # queued behind the running call: not started, so it fails now, as a task
            # queued at the broker does; the executor skips it (INTERRUPT marks it)
            del route.inflight[task_id]
            self.direct.by_task.pop(task_id, None)
            self.direct.unregistered.difference_update(call.spec.return_ids())
            call.keep = None
            force = False
            err = exceptions.TaskCancelledError(task_id.hex())
            _file(self.client, [(P.object_id(task_id, 1), (P.ERROR, serialize_error(err)))])
        elif call is not None:
            call.cancel = force
        self.client.request_nowait("lease_cancel", {"task_id": task_id, "force": force,
                                                    "recursive": recursive,
                                                    "lease_id": route.lease_id})

    def unanswered(self) -> int:
        """Calls on our leases (sent or queued for them) not answered yet; the I/O thread
        reads their lanes meanwhile (the exit drain in zray/_api.py waits on this: the
        broker never sees these calls)."""
        direct = self.direct
        with direct.lock:
            n = len(self.backlog)
            lanes = []
            for route in direct.by_task.values():
                if getattr(route, "leases", None) is self:
                    n += 1
                    if route.lane is not None and route.lane not in lanes:
                        lanes.append(route.lane)
        if lanes:
            direct.need_io(lanes)
        return n

    def cancel_queued(self, task_id: bytes) -> bool:
        """(under direct.lock) ray.cancel of a call still in the backlog: it fails
        TaskCancelledError here, never sent. False if it is not there."""
        for call in self.backlog:
            if call.spec.task_id == task_id:
                self.backlog.remove(call)
                self.direct.unregistered.difference_update(call.spec.return_ids())
                call.keep = None
                err = exceptions.TaskCancelledError(task_id.hex())
                _file(self.client, [(P.object_id(task_id, 1), (P.ERROR, serialize_error(err)))])
                return True
        return False


def _file(client, values: list) -> None:
    """File ``[(oid, (kind, frames))]`` as arrived values and wake the waiters."""
    from zray._client import LOCAL

    arrived, fetch = [], []
    with client._ref_lock:
        for oid, value in values:
            client._arrived_locked(oid, LOCAL, value, None, arrived, fetch)
    with client.cond:
        client.cond.notify_all()
    for cb in arrived:
        try:
            cb()
        except Exception:
            log.exception("an object's done callback failed")
