"""Direct actor calls, the caller's side: calls go straight to the actor's executor.

::

    handle.m.remote() --submit()--> route alive, plain call? --DCALL (lane or PUSH)--> actor's
                         |                                                      executor
                         '--> otherwise: SUBMIT to the broker, as before        (workerd/direct.py)
    get() in the calling thread <--DDONE on the lane-- executor (the thread that ran it)
    I/O thread <--DDONE (our PULL, or a lane nobody else reads)-- executor: the values
                         become LOCAL records we own
    I/O thread <--ROUTE-- broker: where the actor is (asked on a handle's first use), and
                          again whenever it restarts or dies
    ref pickled / passed on --register()--> PUT as owner first: the broker then knows it

Which path: a call goes direct when the broker said where the actor's executor
listens (ROUTE "alive"; same host: the address is ipc:// in that node's private
store dir; another host of a tcp cluster: its tcp address, CURVE, with our reply
PULL listening on tcp too: zray/_xhost.py), and the call has no ObjectRef
arguments (top-level or nested: the broker resolves and pins those), is not a generator (streaming/dynamic), and its
actor has no ``max_pending_calls`` (the broker counts those). Everything else,
and every call made before the route is known, takes the broker path.
``ZRAY_DIRECT_ACTOR_CALLS=0`` turns the direct path off.

Lanes (zray/_lane.py): on one host a route also has a lane, a Unix stream socket
to the executor's ``f-<cid>`` listener. A call made while nothing is in flight to
the actor (a sync ``ray.get(a.m.remote())``) goes on the lane, and ``get()`` reads
its reply off the lane in the calling thread (``wait_lane``): no hop through the
I/O thread and no ZeroMQ I/O threads on the way (measured on the 2-core dev box,
interleaved, medians: a sync call 324 -> 161 us). Calls to an ordered actor made
while others are in flight take the PUSH socket, whose I/O threads batch a burst
better than one syscall per call; the executor reads its lanes before its PULL,
so the actor's order holds across the switch. A threaded or async actor's calls
all take the lane, bursts included: the executor reads a burst in a few reads
and runs it on its pool or loop, and a get() of the burst reads the replies in
the calling thread, with no ZeroMQ or I/O-thread hop either way (1,000 calls in
flight to a max_concurrency=16 actor, interleaved, medians of 3: PUSH 18.5k
calls/s, lane 29k/s). A lane is read by whoever holds its
``rlock``: a thread in ``wait_lane``, else the I/O thread, which polls only the
lanes someone else waits on (``need_io``: a future, ``wait()``, a get that found
the lane taken, calls released from ``held``, bytes waiting for POLLOUT), until
nothing is in flight on them. A lane that closes (EOF: the executor died or
exits) is forgotten; ROUTE settles its calls in flight, as for the PUSH path, or
the death watch does if ROUTE is late (``_lane_broke``).

Order: an *ordered* actor (one call at a time, no concurrency groups) must run a
caller's calls in submission order whatever path they take. The caller keeps it:
calls of one path flow freely, but a call on the other path is held (``held``)
until every call of this path sent before it is finished (its result is here).
For an ordered actor that costs nothing: it could not have started the later
call before the earlier one ended. Threaded and async actors do not order their
calls (as in Ray), so nothing is held for them. A streaming call is waited for
until its stream ends (its completion object); a broker-path call with
``num_returns=0`` has no result to watch, so it is not waited for.

Death and restart: the broker pushes ROUTE "restarting" or "dead". Direct calls
in flight then are resubmitted through the broker while they have
``max_task_retries`` left (the broker runs them once the actor is back), else
fail here with ActorUnavailableError (restarting) or ActorDiedError (dead), the
errors the broker path gives. Results of a direct call are values this process
owns that the broker has never heard of (``unregistered``): a ref to one that
escapes (pickled into an argument, a put value, a return) is first PUT to the
broker; dropping the last ref sends nothing. ``ray.cancel`` of a direct call
goes through the broker (REQ direct_cancel), which interrupts it on the executor
as its own calls: a plain actor's main thread, busy with the call, would not
read a DCANCEL on its socket before the call ended.

A broken direct connection (the executor's process or host died) is noticed
before the broker's ROUTE comes: zray/_direct_watch.py; so is a lane that ends
(``_lane_broke``): its calls in flight then fail with ActorDiedError (or are
retried) DEATH_INFO_S later if the broker has not settled them first.

Threads: ``lock`` guards the routes; it is taken before the client's
``_send_lock`` (sends happen under it so that the order of calls holds), never
while holding ``_ref_lock`` or ``cond``. ``_io_lock`` (which lanes the I/O thread
polls) is taken under ``lock`` or alone; a lane's ``rlock`` is held while its
messages are filed (``_handle_batch``), so a thread that takes it next finds
them in their records.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import shutil
import signal
import tempfile
import threading
import time

import zmq

from zray import _lane, _xhost, exceptions
from zray import _protocol as P
from zray._direct_watch import DeathWatch
from zray._serialization import serialize_error
from zray._transport import send_parts

log = logging.getLogger("zray.direct")

ENABLED = os.environ.get("ZRAY_DIRECT_ACTOR_CALLS", "1") != "0"
_CANCEL_SIGNALS = {signal.SIGUSR1}
_ZIN, _ZOUT, _ZERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)  # (zmq.Poller's)
_DDONE_PREFIX = P._packb((P.Msg.DDONE, None, None, None, None))[:2]  # fixarray(5), DDONE


class _Call:
    __slots__ = ("spec", "frames", "keep", "retries", "cancel", "lane")

    def __init__(self, spec, frames, keep, retries):
        self.spec = spec
        self.frames = frames
        self.keep = keep  # the handle's ref and the arguments' refs, until sent / answered
        self.retries = retries  # max_task_retries left (-1: forever)
        self.cancel = None  # ray.cancel() before it was sent: force flag
        self.lane = None  # the lane it was sent on (else the PUSH socket)


class _Route:
    __slots__ = ("actor_id", "state", "address", "ordered", "incarnation", "reason", "sock",
                 "inflight", "broker_out", "held", "reply_to", "broken", "lane", "lane_failed")

    def __init__(self, actor_id):
        self.actor_id = actor_id
        self.state = "asking"  # then what ROUTE says: pending, alive, restarting, dead
        self.address = ""
        self.ordered = False
        self.incarnation = 0
        self.reason = ""
        self.sock = None  # PUSH to the executor's PULL
        self.inflight: dict = {}  # task id -> _Call sent direct, not answered (send order)
        self.broker_out: dict = {}  # task id -> _Call sent to the broker, result not here
        self.held: collections.deque = collections.deque()  # (direct?, _Call) in order
        self.reply_to = ""  # our PULL's address the executor reaches (ipc, or tcp: _xhost)
        self.broken = ""  # the address whose connection broke (zray/_direct_watch.py)
        self.lane = None  # a zray._lane.Lane to the executor (same host), if it has one
        self.lane_failed = False  # no lane to this address: the PUSH socket


class DirectCalls:
    """One client's direct calls: its routes, calls in flight and results it owns."""

    def __init__(self, client, here: frozenset):
        self.client = client
        self.here = here  # the record states in which a value is in this process
        self.lock = threading.Lock()
        self.routes: dict = {}  # actor id -> _Route
        self.by_task: dict = {}  # task id -> _Route of a direct call in flight
        # the object whose arrival ends a watched broker-path call (its first return; a
        # stream's completion object) -> _Route
        self.broker_tasks: dict = {}
        self.unregistered: set = set()  # oids of direct results the broker never heard of
        self.host = _xhost.host_id()
        # Lanes (zray/_lane.py): a thread waiting in get() for a call's result reads its
        # lane itself; the I/O thread reads only the lanes someone else waits on
        # (``need_io``: futures, wait(), a get that found the lane taken, held calls,
        # bytes waiting for POLLOUT), until nothing is in flight on them.
        self.lanes: dict = {}  # fd -> Lane
        self.io_lanes: set = set()  # the lanes the I/O thread polls
        self.io_parked: set = set()  # ... not now: a user thread reads them (rlock)
        self.io_changed = False  # io_lanes changed: the I/O thread polls anew
        self._io_lock = threading.Lock()
        self.tcp_reply_to = None  # tcp_pull's address, once bound (None: not tried)
        # PULL for the DDONEs of executors on other hosts (tcp, CURVE), polled by the I/O
        # thread; it takes DDONEs only (take_remote): a key holder can send it anything
        self.tcp_pull = None
        self.dropped = 0  # messages on tcp_pull that were not DDONEs
        self.watch = None  # DeathWatch of our direct connections, from the first one
        self._own_dir = None
        if client._direct is None:  # no store here: a reply inbox of our own
            self._bind_reply_inbox()
        self.reply_to = "ipc://" + client._direct_path if client._direct is not None else ""

    def _bind_reply_inbox(self) -> None:
        client = self.client
        try:
            d = tempfile.mkdtemp(prefix="zray-c-")  # 0700: only this user can connect
            path = os.path.join(d, "r")
            s = client._ctx.socket(zmq.PULL)
            s.setsockopt(zmq.RCVHWM, 0)
            s.setsockopt(zmq.LINGER, 0)
            s.bind("ipc://" + path)
        except (OSError, zmq.ZMQError):
            log.debug("no reply inbox: actor calls go through the broker", exc_info=True)
            return
        client._direct, client._direct_path, self._own_dir = s, path, d

    # ------------------------------------------------------------- submit
    def submit(self, spec: P.TaskSpec, frames: list, keep, max_task_retries: int) -> None:
        """Send actor call ``spec`` on the direct path or the broker's (module doc)."""
        opts = spec.options
        direct_ok = (self.reply_to and not spec.deps and not spec.nested
                     and spec.num_returns >= 0 and "counted" not in opts)
        mtr = opts.get("max_task_retries")
        call = _Call(spec, frames, keep, mtr if type(mtr) is int else max_task_retries)
        ask = False
        with self.lock:
            route = self.routes.get(spec.actor_id)
            if route is None:
                route = self.routes[spec.actor_id] = _Route(spec.actor_id)
                ask = True
            if ask:
                self.client.request_nowait("actor_route", {"actor_id": spec.actor_id})
            direct = direct_ok and route.state == "alive"
            if route.held or (route.ordered and (route.broker_out if direct else route.inflight)):
                route.held.append((direct, call))
                if route.lane is not None and route.inflight:  # they go once those are in
                    self.need_io((route.lane,))
                return
            if direct:
                self._send_direct(route, call)
            else:
                self._send_broker(route, call)

    def _send_direct(self, route: _Route, call: _Call) -> None:
        """(under lock)"""
        spec = call.spec
        if route.lane is None and not route.lane_failed:
            self._open_lane(route)
        # An ordered actor's call takes the lane when nothing is in flight to the actor
        # (a sync call: its caller reads the reply itself), or while the lane still has
        # bytes to send; else the PUSH socket, whose I/O threads batch a burst better.
        # Switching is safe for an ordered actor: a lane call is in the executor's socket
        # before the send returns, and the executor reads its lanes before its PULL.
        # A threaded or async actor's calls all take the lane (see the module doc).
        lane = route.lane
        if lane is not None and route.ordered and route.inflight and not lane.outq:
            lane = None
        call.lane = lane
        if lane is None and route.sock is None:
            s = self.client._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 0)
            _xhost.connect(s, route.address)
            route.sock = s
            if self.watch is None:
                self.watch = DeathWatch(self)
            self.watch.watch(route, s)
        task_id = spec.task_id
        route.inflight[task_id] = call
        self.by_task[task_id] = route
        self.unregistered.update(spec.return_ids())
        header = P.encode(P.DCall(spec, len(call.frames), route.reply_to))
        if lane is not None:
            self._send_lane(lane, header, call.frames)
        else:
            self._send(route.sock, header, call.frames)
        if call.retries == 0:  # (kept while it may be sent again)
            call.frames = None
        if call.cancel is not None:
            self._cancel_sent(route, task_id, call.cancel)

    def _send(self, sock, header, frames) -> None:
        client = self.client
        if client.mask_signals:  # a cancel signal must not cut a multipart message in two
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _CANCEL_SIGNALS)
        try:
            send_parts(sock, header, None, frames)
        finally:
            if client.mask_signals:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # ---------------------------------------------------------------- lanes
    def _open_lane(self, route: _Route) -> None:
        """(under lock) Connect to the executor's lane, if it listens for one."""
        path = _lane.lane_path(route.address)
        if not path:
            route.lane_failed = True
            return
        try:
            lane = _lane.connect(path)
        except OSError as e:
            log.debug("no lane to %s (%s): the PUSH socket", path, e)
            route.lane_failed = True
            return
        lane.owner = route
        self.lanes[lane.fd] = lane
        route.lane = lane

    def _send_lane(self, lane, header: bytes, frames) -> None:
        """(under lock) Send on a lane; what the socket does not take now, the I/O thread
        sends (POLLOUT). A lane gone means its executor is: ROUTE settles the call."""
        client = self.client
        if client.mask_signals:  # a cancel signal must not cut a message in two
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _CANCEL_SIGNALS)
        try:
            if not lane.send(header, frames):
                self.need_io((lane,), out=True)
        except _lane.LaneClosed:
            if lane.send_dead:  # the executor closed: read what it sent last, then EOF
                self.need_io((lane,))
            else:
                self._drop_lane(lane)
        finally:
            if client.mask_signals:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def send_broke(self, lane) -> bool:
        """A send on ``lane`` failed. When the peer closed it (``send_dead``: an executor
        that ended a lease sent its end mark first, and only that mark says which calls
        never ran, zray/_lease.py), the lane is read to its end and EOF settles the rest:
        True. False: the lane is closed on our side (drop it)."""
        if not lane.send_dead:
            return False
        self.need_io((lane,))
        return True

    def need_io(self, lanes, out: bool = False) -> None:
        """Have the I/O thread read ``lanes`` (and send what waits on them: ``out``) until
        nothing is in flight on them: nobody else may come to read them."""
        wake = False
        with self._io_lock:
            for lane in lanes:
                if lane.closed:
                    continue
                if out or lane not in self.io_lanes or (lane in self.io_parked
                                                        and not lane.rlock.locked()):
                    self.io_lanes.add(lane)
                    if not lane.rlock.locked():
                        self.io_parked.discard(lane)
                    self.io_changed = wake = True
        if wake:
            self.client.wake_io()

    def _call_lane(self, oid: bytes):
        """The lane that brings direct result ``oid``, or None."""
        task_id = oid[:P.TASK_ID_LEN]
        route = self.by_task.get(task_id)
        call = route.inflight.get(task_id) if route is not None else None
        return call.lane if call is not None else None

    def lanes_for(self, oids) -> list:
        """The lanes that bring any of ``oids`` (direct results in flight)."""
        out = []
        most = len(self.lanes)
        for oid in oids:
            lane = self._call_lane(oid)
            if lane is not None and lane not in out:
                out.append(lane)
                if len(out) >= most:
                    break
        return out

    def io_poll_set(self) -> list:
        """(I/O thread) [(fd, zmq poll events)] of the lanes to poll now: POLLIN unless a user
        thread reads the lane (parked), POLLOUT while bytes wait to be sent."""
        with self._io_lock:
            self.io_changed = False
            out = []
            for lane in self.io_lanes:
                if lane.closed:
                    continue
                ev = (0 if lane in self.io_parked else _ZIN) | (_ZOUT if lane.outq else 0)
                if ev:
                    out.append((lane.fd, ev))
            return out

    def _lane_closed(self, lane) -> None:
        """The executor closed the lane (it died or exits): its calls in flight wait for
        ROUTE to say what became of the actor, DEATH_INFO_S at most (_direct_watch.py)."""
        with self.lock:
            self._drop_lane(lane)

    def _drop_lane(self, lane) -> None:
        """(under lock) A lane closed: its route stops using lanes, the lane is forgotten,
        and its executor's process is taken for dead (``_lane_broke``)."""
        route = lane.owner
        if route is not None and route.lane is lane:
            route.lane = None
            route.lane_failed = True
            self._lane_broke(route)
        self._forget_lane(lane)

    def _lane_broke(self, route: _Route) -> None:
        """(under lock) The lane of ``route`` ended: only the executor's process held its
        other end (a Unix socket on this host), so that process is gone, whatever the broker
        says yet. As for a broken tcp connection (zray/_direct_watch.py): no more direct
        calls to that address, the broker is asked, and the calls in flight are settled by
        the broker's ROUTE or, DEATH_INFO_S later, by the watch thread (ActorDiedError, or
        retried through the broker while they have max_task_retries)."""
        if self.client.closed:
            return
        leases = getattr(route, "leases", None)
        if leases is not None:  # a leased executor's lane (zray/_lease.py): ending too
            leases.broke(route)
            return
        if route.state != "alive":
            return  # (a ROUTE already moved it on)
        log.info("the lane to actor %s (%s) closed: asking the broker",
                 route.actor_id.hex(), route.address)
        if route.sock is not None:  # (to the same process)
            route.sock.close(0)
            route.sock = None
        route.broken = route.address
        route.state = "asking"
        self.client.request_nowait("actor_route", {"actor_id": route.actor_id})
        if route.inflight:
            if self.watch is None:
                self.watch = DeathWatch(self)
            self.watch.settle_later(route, list(route.inflight), died=True)

    def _forget_lane(self, lane) -> None:
        """(under lock)"""
        with self._io_lock:
            self.lanes.pop(lane.fd, None)
            if lane in self.io_lanes:
                self.io_lanes.discard(lane)
                self.io_parked.discard(lane)
                self.io_changed = True
        lane.close()

    def read_lane(self, fd: int, ev: int) -> None:
        """(I/O thread, lane ``fd`` readable or writable) File what came on it, send what
        waits; stop polling it once nothing is in flight on it. Messages are filed before
        ``rlock`` is let go: a thread that takes it next finds them in their records."""
        lane = self.lanes.get(fd)
        if lane is None:
            return
        if ev & _ZOUT:
            try:
                if lane.flush():
                    self.io_changed = True  # all sent: poll it for POLLIN only
            except _lane.LaneClosed:
                if not lane.send_dead:
                    self._lane_closed(lane)
                    return
                ev |= _ZIN  # the executor closed: read what it sent last (a LEASE end), then EOF
        if not ev & (_ZIN | _ZERR):
            return
        if not lane.rlock.acquire(False):  # a user thread reads it: it wakes us when done
            with self._io_lock:
                if lane in self.io_lanes:
                    self.io_parked.add(lane)
                    self.io_changed = True
            return
        try:
            try:
                msgs = lane.read()
            except _lane.LaneClosed:
                self._lane_closed(lane)
                return
            if msgs:
                self.client._handle_batch(msgs)
        finally:
            lane.rlock.release()
        route = lane.owner
        with self._io_lock:
            if not route.inflight and not lane.outq and lane in self.io_lanes:
                self.io_lanes.discard(lane)
                self.io_changed = True

    def _lane_of(self, oids) -> object:
        """The lane that brings every one of ``oids`` (direct results in flight), or None."""
        lane = None
        for oid in oids:
            this = self._call_lane(oid)
            if this is None or this.closed or (lane is not None and this is not lane):
                return None
            lane = this
        return lane

    def wait_lane(self, oids: list, done, deadline) -> None:
        """(a user thread in get) When the results ``oids`` all come on one lane that no
        other thread reads: read it here until they are in (no wake-up of the I/O thread
        on the way), the deadline passes, or they stop being that lane's (a restart, a
        retry through the broker, the lane closing). The caller then waits as usual."""
        lane = self._lane_of(oids)
        if lane is None or not lane.rlock.acquire(False):
            return
        client = self.client
        try:
            poller = lane.poller
            if poller is None:
                poller = lane.poller = select.poll()
            i, n = 0, len(oids)
            while True:
                try:
                    if lane.outq:  # our calls not sent yet: send them as the lane takes them
                        try:
                            lane.flush()
                        except _lane.LaneClosed:
                            if not lane.send_dead:
                                raise  # (else: read what the executor sent last, then EOF)
                    msgs = lane.read()
                except _lane.LaneClosed:
                    self._lane_closed(lane)
                    return
                if msgs:
                    client._handle_batch(msgs)
                while i < n and done(oids[i]):
                    i += 1
                if i == n or client.broker_gone or client.closed:
                    return
                if self._lane_of(oids[i:i + 1]) is not lane:  # (the others when we get there)
                    return
                wait = 1.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return
                poller.register(lane.fd, select.POLLIN | (select.POLLOUT if lane.outq else 0))
                poller.poll(wait * 1000)
        finally:
            lane.rlock.release()
            if lane in self.io_parked:  # the I/O thread stood back for us
                self.need_io((lane,))

    def _send_broker(self, route: _Route, call: _Call) -> None:
        """(under lock) SUBMIT; its result is watched (the refs kept till it comes)."""
        spec = call.spec
        client = self.client
        done_oid = spec.return_ids()[0] if spec.num_returns != 0 else None
        call.keep = None
        if done_oid is not None:
            route.broker_out[spec.task_id] = call
            self.broker_tasks[done_oid] = route
            # A count of our own keeps the result coming to us even if the caller drops
            # its refs (broker_done gives it back).
            client.incref(done_oid)
        client.send_submit(spec, call.frames)
        call.frames = None
        if call.cancel is not None and done_oid is not None:
            client.send(P.encode(P.Cancel(done_oid, call.cancel, True)))

    def _flush(self, route: _Route) -> None:
        """(under lock) Send the held calls that may go now, in order. Their callers wait
        elsewhere (on ``cond``): the I/O thread reads the lane for them."""
        held = route.held
        while held:
            direct, call = held[0]
            direct = direct and route.state == "alive"
            if route.ordered and (route.broker_out if direct else route.inflight):
                return
            held.popleft()
            if direct:
                self._send_direct(route, call)
                if route.lane is not None:
                    self.need_io((route.lane,))
            else:
                self._send_broker(route, call)

    # ------------------------------------------------------- I/O thread
    def done(self, m: P.DDone, frames: list) -> tuple:
        """A DDONE: ([(oid, (kind, frames))] for the caller's records, [] when the call
        is no longer ours to answer (failed or resubmitted on a restart) or retried;
        the refs handed over with it, per return: Client.take_handed takes them, filed
        or not)."""
        try:  # (from an executor, not the broker: checked in full)
            task_id = P._task_id(m.task_id)
            P._direct_returns(m.returns)
            if type(m.retryable) is not bool:
                raise P.ProtocolError("DDONE: retryable must be a bool")
            handed = P._handed(m.handed)
            if handed and len(handed) != len(m.returns):
                raise P.ProtocolError("DDONE: handed does not match its returns")
        except P.ProtocolError as e:
            log.warning("dropping a malformed DDONE: %s", e)
            return [], []
        keep = None
        with self.lock:
            route = self.by_task.pop(task_id, None)
            if route is None:
                return [], handed
            call = route.inflight.pop(task_id, None)
            if m.retryable and call is not None and call.retries != 0:
                call.retries -= 1  # retry_exceptions covers it: call again
                log.info("retrying %s after an application error", call.spec.name)
                leases = getattr(route, "leases", None)
                if route.state == "alive":
                    if leases is not None:  # (its frames kept: the lease may end unread)
                        leases._send_on(route, call)
                    else:
                        self._send_direct(route, call)
                    if route.lane is not None:
                        self.need_io((route.lane,))
                else:
                    self.unregistered.difference_update(call.spec.return_ids())
                    self._send_broker(route, call)
                    if leases is not None:
                        leases.answered(route)
                return [], handed
            if call is not None:
                keep, call.keep = call.keep, None
            leases = getattr(route, "leases", None)
            if leases is not None:  # a lease's window takes its next call (zray/_lease.py)
                leases.answered(route)
            else:
                self._flush(route)
        del keep  # (outside the lock: dropping refs may send)
        tid_bytes = task_id
        out, pos = [], 0
        for i, (kind, n) in enumerate(m.returns, 1):
            out.append((tid_bytes + i.to_bytes(4, "little"), (kind, frames[pos:pos + n])))
            pos += n
        if pos != len(frames):
            log.warning("DDONE: frame count does not match its returns")
            return [], handed
        return out, handed

    def broker_done(self, oids: list) -> None:
        """Results of watched broker-path calls came: held calls may go now."""
        ours = []
        with self.lock:
            for oid in oids:
                route = self.broker_tasks.pop(oid, None)
                if route is None:
                    continue
                ours.append(oid)
                route.broker_out.pop(oid[:P.TASK_ID_LEN], None)
                self._flush(route)
        for oid in ours:  # (outside the lock: the last count may send a release)
            self.client.decref(oid)

    def route(self, m: P.Route) -> list:
        """A ROUTE: [(oid, (ERROR, frames))] for calls that fail here."""
        failed, dropped = [], []
        with self.lock:
            route = self.routes.get(m.actor_id)
            if route is None:
                route = self.routes[m.actor_id] = _Route(m.actor_id)
            state, address, reply_to = m.state, m.address, self.reply_to
            if state == "alive" and m.host != self.host:  # another host: tcp (_xhost.py)
                address, reply_to = m.tcp_address, self._tcp_reply_to() if m.tcp_address else ""
            if state == "alive" and (not address or not reply_to):
                state = "pending"  # no way there (or no reply inbox): the broker path only
            if address != route.broken or state != "alive":
                route.broken = ""
            elif state == "alive":  # our connection there broke: the broker has not noticed
                state = "pending"
            # a new process already (e.g. restarted while the broker was down): the calls
            # in flight to the old one are lost like those of a restart
            moved = bool(route.address and address and address != route.address)
            if address != route.address:
                if route.sock is not None:
                    route.sock.close(0)
                    route.sock = None
                if route.lane is not None:
                    self._forget_lane(route.lane)
                    route.lane = None
                route.lane_failed = False
            route.state, route.address, route.ordered = state, address, m.ordered
            route.reply_to = reply_to
            route.incarnation, route.reason = m.incarnation, m.reason
            if (state in ("restarting", "dead") or moved) and route.inflight:
                lost = list(route.inflight.values())
                route.inflight.clear()
                for call in lost:
                    spec = call.spec
                    self.by_task.pop(spec.task_id, None)
                    if state != "dead" and call.retries != 0 and call.frames is not None:
                        call.retries -= 1
                        self.unregistered.difference_update(spec.return_ids())
                        self._send_broker(route, call)
                        continue
                    if state != "dead":
                        err = exceptions.ActorUnavailableError(
                            f"The actor died while running {spec.name} and is restarting: "
                            f"{m.reason or 'it runs in a new process'}. The call may or may "
                            f"not have run.", m.actor_id.hex())
                    else:
                        err = exceptions.ActorDiedError(m.reason, m.actor_id.hex())
                    frames = serialize_error(err)
                    n = max(spec.num_returns, 1) if spec.num_returns else 0
                    for i in range(1, n + 1):
                        failed.append((P.object_id(spec.task_id, i), (P.ERROR, frames)))
                    dropped.append(call.keep)
                    call.keep = None
            self._flush(route)
            if state == "dead":
                self.routes.pop(m.actor_id, None)
                if route.sock is not None:
                    route.sock.close(0)
                    route.sock = None
                if route.lane is not None:
                    self._forget_lane(route.lane)
                    route.lane = None
        del dropped
        return failed

    def _tcp_reply_to(self) -> str:
        """(I/O thread) The tcp address of our reply PULL for executors on other hosts,
        bound on first need (CURVE server, zray/_xhost.py); "" if it cannot be."""
        if self.tcp_reply_to is None:
            self.tcp_reply_to = ""
            client = self.client
            poller = getattr(client, "_poller", None)
            if self.reply_to and client.address.startswith("tcp://") and poller is not None:
                s = client._ctx.socket(zmq.PULL)
                s.setsockopt(zmq.RCVHWM, 0)
                s.setsockopt(zmq.LINGER, 0)
                try:
                    self.tcp_reply_to = _xhost.listen_tcp(client._ctx, s, client.address)
                except (OSError, zmq.ZMQError):
                    s.close(0)
                    log.warning("no reply inbox for actors on other hosts: calls to them go "
                                "through the broker", exc_info=True)
                else:
                    self.tcp_pull = s
                    poller.register(s, zmq.POLLIN)
        return self.tcp_reply_to

    def take_remote(self, parts: list) -> bool:
        """(I/O thread) A message on tcp_pull: only a DDONE goes on (to done())."""
        if bytes(parts[0].buffer[:2]) == _DDONE_PREFIX:
            return True
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("dropping a message that is not a DDONE on the direct-call reply "
                        "socket (dropped so far: %d)", self.dropped)
        return False

    def rejoined(self) -> None:
        """A restarted broker took us back: ask it where each actor is again (direct
        calls in flight stay so: a ROUTE restarting / dead settles them)."""
        with self.lock:
            for actor_id, route in self.routes.items():
                route.state = "asking"
                if route.sock is not None:
                    route.sock.close(0)
                    route.sock = None
                self.client.request_nowait("actor_route", {"actor_id": actor_id})

    # ------------------------------------------------------------ user threads
    def cancel(self, oid: bytes, force: bool, recursive: bool = True) -> bool:
        """ray.cancel of a direct call (sent or held): True if handled here. ``recursive``
        is passed on for a task on a leased executor (zray/_lease.py); direct actor calls
        are cancelled as before."""
        task_id = oid[:P.TASK_ID_LEN]
        with self.lock:
            route = self.by_task.get(task_id)
            if route is not None:
                leases = getattr(route, "leases", None)
                if leases is not None:
                    leases.cancel(route, task_id, bool(force), bool(recursive))
                    return True
                self._cancel_sent(route, task_id, bool(force))
                return True
            for route in self.routes.values():
                for _, call in route.held:
                    if call.spec.task_id == task_id:
                        call.cancel = bool(force)
                        return True
            leases = self.client.leases
            if leases is not None and leases.backlog and leases.cancel_queued(task_id):
                return True  # queued for a lease, never sent (zray/_lease.py)
        return False

    def _cancel_sent(self, route: _Route, task_id: bytes, force: bool) -> None:
        """Cancel a call sent direct. Through the broker, which interrupts the actor's
        executor as for its own calls: a plain actor's main thread, busy with the very
        call, reads nothing from the direct socket until the call ends."""
        leases = getattr(route, "leases", None)
        if leases is not None:  # a task on a leased executor (zray/_lease.py)
            leases.cancel(route, task_id, force)
            return
        self.client.request_nowait("direct_cancel", {"actor_id": route.actor_id,
                                                     "task_id": task_id, "force": force})

    def register(self, oid: bytes) -> None:
        """A ref to direct result ``oid`` escapes: PUT it to the broker first (as its
        owner), waiting for the value if it has not come yet."""
        client = self.client
        records = client.records
        here = self.here

        def ready():
            rec = records.get(oid)
            return oid not in self.unregistered or rec is None or rec.state in here

        self.need_io(self.lanes_for([oid]))
        client.wait_for(ready, None)
        with self.lock:
            if oid not in self.unregistered:
                return
            self.unregistered.discard(oid)
        rec = records.get(oid)
        if rec is None or rec.value is None:
            return
        kind, frames = rec.value
        stored = client.store_frames(oid, kind, list(frames)) if client.store is not None else None
        if stored is not None:
            client.send(P.encode(P.Put(oid, kind, [], *stored)))
        else:
            client.send(P.encode(P.Put(oid, kind, [], None, 0)), list(frames))

    def forget(self, oid: bytes) -> bool:
        """The last ref to ``oid`` is gone: True if the broker never knew it (say nothing).
        A call still in flight on a lane then has no reader to come: the I/O thread reads
        it, so the call's answer still drops the handle's ref it keeps."""
        if oid in self.unregistered:
            self.unregistered.discard(oid)
            lane = self._call_lane(oid)
            if lane is not None:
                self.need_io((lane,))
            return True
        return False

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        with self.lock:
            for route in self.routes.values():
                if route.sock is not None:
                    route.sock.close(0)
                    route.sock = None
                route.lane = None
            for lane in list(self.lanes.values()):
                self._forget_lane(lane)
        if self.tcp_pull is not None:
            self.tcp_pull.close(0)
        _xhost.ZapHandlers.stop(self.client._ctx)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

