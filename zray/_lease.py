"""Leased executors, the holder's side: a sync loop of plain tasks skips the broker.

::

    f.remote() --submit()--> plain task, nothing of ours in flight, STREAK such in a row?
         |                      --REQ task_lease {fid, resources}--> broker (brokerd/leases.py):
         |                        an idle executor of our node, its resources held for us
         |                      connect <store>/t-<executor cid> (zray/_lane.py), LEASE hello
         |--> lease held, nothing in flight on it, same function and shape:
         |      DCALL on the lane (zray/_direct.py's machinery: a route whose lane is the lease)
         '--> otherwise: SUBMIT to the broker, as before
    get() in the calling thread <--DDONE on the lane-- the leased executor (workerd/lease.py)
    LEASE(active=False) on the lane: the executor ended the lease (idle); the calls we
         sent that it did not answer before it never ran: resubmitted through the broker
    LEASE(active=False) from the broker: the executor ended the lease before it took our
         lane (we connected too late: our hello waits unread), same as above; it may come
         before the grant's REPLY is handled (``ended_early``)
    the lane closes without that (the executor died): the call in flight is resubmitted
         through the broker while it has max_retries left, else WorkerCrashedError; one
         cancelled with force=True: TaskCancelledError

Which tasks: a plain task (not an actor's) of one function with one return, no
ObjectRef arguments (top-level or nested), only CPUs (no GPUs, custom resources,
memory, accelerator type), and no options but ``max_retries`` and
``retry_exceptions`` (so no runtime_env, scheduling strategy, placement group,
``max_calls``, generators), submitted while nothing else of ours is in flight
(the sync pattern: ``ray.get(f.remote())``). Anything else, and any task while
the leased executor is busy, takes the broker path unchanged. The lease is asked
for only after STREAK such tasks of the same function and shape in a row, by a
driver or executor with a store on this node; one that is refused waits
REFUSED_BACKOFF_S before asking again.

Results are the caller's values the broker never heard of, exactly as direct actor
calls' (``DirectCalls.unregistered``): a ref that escapes is PUT to the broker first;
dropping the last ref sends nothing. ``ray.cancel`` asks the broker (REQ
lease_cancel), which interrupts the task on the leased executor. The executor
reports the tasks it ran to the broker in batches (list_tasks, timeline).
``ZRAY_TASK_LEASES=0`` turns leases off (read here and by workerd/lease.py).
"""

from __future__ import annotations

import collections
import logging
import os
import time

from zray import _direct, _lane, exceptions
from zray import _protocol as P
from zray._serialization import serialize_error

log = logging.getLogger("zray.lease")

ENABLED = os.environ.get("ZRAY_TASK_LEASES", "1") != "0"  # (checked: workerd/lease.py)
STREAK = 3  # sync tasks of one shape in a row before a lease is asked for
REFUSED_BACKOFF_S = 1.0
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
    """A lease seen as a route by zray/_direct.py: its lane carries the calls."""

    __slots__ = ("leases", "lease_id", "fid", "resources", "end_seen")


class TaskLeases:
    """One client's lease (at most one at a time) and the streak that asks for it."""

    def __init__(self, client):
        self.client = client
        self.direct = client.direct
        self.route = None  # the lease held now (_LeaseRoute), or None
        self.key = None  # (fid, resources) of the streak
        self.streak = 0
        self.wait_until = 0.0  # no lease asked for before this (refused lately)
        self.sent = 0  # tasks sent on leases (tests and benchmarks read it)
        self.granted = 0
        # lease ids whose end came before their route was made (the broker's end of a lease
        # its executor ended before taking our lane can overtake the grant's REPLY): the
        # last few, so that _acquire drops such a lease instead of waiting on it for good
        self.ended_early: collections.deque = collections.deque(maxlen=64)

    # ------------------------------------------------------------ submit
    def submit(self, spec: P.TaskSpec, frames: list, keep) -> bool:
        """Send ``spec`` on the lease, asking for one first where a streak says so; False
        when it must go through the broker (the caller SUBMITs it)."""
        res = spec.resources
        cpu = res.get("CPU")
        if (spec.deps or spec.nested or spec.num_returns != 1 or len(res) != 1
                or type(cpu) is not int or cpu <= 0 or not _OPTIONS.issuperset(spec.options)):
            self.streak = 0
            return False
        route = self.route
        key = (spec.fid, cpu)
        if route is not None:
            if route.state == "alive" and not route.inflight and route.fid == spec.fid \
                    and route.resources == cpu:
                return self._send(route, spec, frames, keep)
            if route.state == "alive" and route.inflight:
                return False  # busy: the broker path
            if route.state != "alive":
                self.route = route = None
        if self.client._awaiting > 1 or key != self.key:  # (1: this task's own return)
            self.key, self.streak = key, 0
        self.streak += 1
        if self.streak < STREAK or time.monotonic() < self.wait_until:
            return False
        if route is not None:  # a lease of another function or shape: give it back first
            if not self._give_back(route):
                return False
        route = self._acquire(spec.fid, cpu)
        if route is None:
            self.streak = 0
            self.wait_until = time.monotonic() + REFUSED_BACKOFF_S
            return False
        return self._send(route, spec, frames, keep)

    def _send(self, route: _LeaseRoute, spec: P.TaskSpec, frames: list, keep) -> bool:
        mr = spec.options.get("max_retries", 0)
        call = _direct._Call(spec, frames, keep, mr if type(mr) is int else 0)
        direct = self.direct
        with direct.lock:
            if route.state != "alive" or route.lane is None or route.inflight:
                return False  # (another thread's task took it meanwhile)
            direct._send_direct(route, call)
            call.frames = frames  # kept until answered: sent again if the lease ends unread
        self.sent += 1
        return True

    def _give_back(self, route: _LeaseRoute) -> bool:
        """Return an idle lease to the broker (REQ lease_return) and close its lane (its
        executor sees it close and sends its last books). False if a call is on it."""
        direct = self.direct
        with direct.lock:
            if route.inflight or route.state != "alive":
                return False
            route.state = "ended"
            lane, route.lane = route.lane, None
            self.client.request_nowait("lease_return", {"lease_id": route.lease_id})
            if lane is not None:
                direct._forget_lane(lane)
            if self.route is route:
                self.route = None
        return True

    def _acquire(self, fid: bytes, cpu: int):
        client = self.client
        try:
            info = client.request("task_lease", {"fid": fid, "resources": {"CPU": cpu}},
                                  timeout=P.BROKER_TIMEOUT_S)
        except Exception as e:  # (a broker that does not lease: the broker path, quietly)
            log.debug("no lease: %s", e)
            return None
        if not info:
            return None
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
            self.route = route
        self.granted += 1
        return route

    # ------------------------------------------------------------ its end
    def ended(self, m: P.Lease) -> None:
        """(whoever reads the lane) LEASE(active=False): the executor ended the lease and
        read nothing after it: the calls it did not answer go through the broker."""
        direct = self.direct
        with direct.lock:
            route = self.route
            lane = route.lane if route is not None else None
            if m.active:
                return
            if route is None or m.lease_id != route.lease_id or lane is None:
                if route is None or m.lease_id != route.lease_id:
                    self.ended_early.append(m.lease_id)  # (its route may not be made yet)
                return
            route.end_seen = True
            route.state = "ended"
            route.lane = None
            self._settle(route, ran=False)
            direct._forget_lane(lane)
            if self.route is route:
                self.route = None
            self.streak = 0

    def broke(self, route: _LeaseRoute) -> None:
        """(under direct.lock; _direct.DirectCalls._lane_broke) The lane closed: without a
        LEASE end first, the executor's process is gone."""
        if route.state != "alive" and not route.inflight:
            return
        route.state = "ended"
        self._settle(route, ran=not route.end_seen)
        if self.route is route:
            self.route = None
        self.streak = 0

    def _settle(self, route: _LeaseRoute, ran: bool) -> None:
        """(under direct.lock) The calls in flight on an ended lease: ``ran`` False, never
        started (resubmitted, retries untouched); True, their executor died running them
        (retried while max_retries allows, else WorkerCrashedError; TaskCancelledError
        for one cancelled with force)."""
        direct, client = self.direct, self.client
        failed, dropped = [], []
        for task_id in list(route.inflight):
            call = route.inflight.pop(task_id)
            direct.by_task.pop(task_id, None)
            spec = call.spec
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
        with ``recursive`` cancels the tasks it submitted."""
        call = route.inflight.get(task_id)
        if call is not None:
            call.cancel = force
        self.client.request_nowait("lease_cancel", {"task_id": task_id, "force": force,
                                                    "recursive": recursive})


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
