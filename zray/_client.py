"""The client runtime shared by drivers and executors.

::

    user threads                       I/O thread                   broker
    ------------                       ----------                   ------
    .remote() / put() / REFS    --out DEALER (send-only, lock)-->   ROUTER
    get() / wait() wait on `cond`  <-- records / replies ----- inbox DEALER <-- OBJ, REPLY,
                                                                     LOG, EXEC, CANCEL

* The *out* socket is only ever sent on, by any thread, under ``_send_lock``;
  submissions, puts and releases therefore reach the broker in program order.
* The *inbox* belongs to the I/O thread. It files pushed objects into their
  records, stores replies, prints forwarded logs, hands EXEC messages to an
  executor's main thread and delivers cancellations, then wakes the waiters
  with one ``notify_all`` per drained batch, if the batch holds what one of them
  waits for (see Wake-ups).
* Results that executors on this node push to us come on result lanes
  (zray/_resultlane.py): a thread in ``get()`` waiting only for such results reads
  them itself; otherwise the I/O thread does.
* A ref unpickled here (borrowed) is announced to the broker (REFS +1, sent
  before anything else this client sends); when the last ref to an object goes
  the broker is told (REFS -1, batched by RELEASE_BATCH / RELEASE_DELAY_MS).

Local objects
=============
Every object this process holds an ObjectRef to has one record,
``records[oid]`` (a ``LocalObject``): its ref count, its ``ObjectState``, its
value once here, and the callbacks (``ObjectRef.future``) waiting for it. The
first ref made or unpickled here creates the record; dropping the last one
deletes it, value and all. A value that arrives for an oid without a record is
dropped. One exception: an item of an open stream (``ObjectRefGenerator``)
arrives before its ref is made, so it gets a record with ref count 0, which
``close_stream`` deletes if the item was never taken.

States::

    PENDING        a ref is held; nothing asked, nothing heard
    AWAITING_PUSH  a return of a task we submitted: the broker pushes it unasked
    SUBSCRIBED     we sent SUB: the broker pushes it once it is ready
    REMOTE         ready, in another node's store (wait() counts it as ready)
    FETCHING       REMOTE and we sent SUB: the broker moves it to us
    LOCAL          the value's frames are in this process
    STORED         the value is in this node's store; get() maps the file

Transitions (the message or call that makes each)::

    first ObjectRef (incref)         -> PENDING
    PENDING        --submit (expect_push)----------------> AWAITING_PUSH
    PENDING        --get/wait/future (SUB)---------------> SUBSCRIBED
    REMOTE         --get/future (SUB)--------------------> FETCHING
    not LOCAL/STORED --OBJ naming another node's store---> REMOTE
    any            --OBJ with frames (or a blob), put()--> LOCAL
    any            --OBJ naming our node's store, put()--> STORED   (a later copy
                                                         replaces an earlier value)
    any            --last ObjectRef dropped (decref)-----> record deleted, REFS -1 queued

Wake-ups
========
A waiter on ``cond`` says what wakes it, under ``cond``: ``get()`` of many refs
(and ``wait()`` of all of them) names one oid in ``_watch``, the last one still
missing (results come mostly in submission order, so a get of 1,000 is woken
about once, not once per arriving result); ``wait(num_returns < n)``,
``wait_for`` and a stream's next item count in ``_watch_any`` (any arrival).
After filing a batch's values the I/O thread notifies only if one of them is
watched, a waiter takes any, a value turned up in another node's store (a
get() must fetch it: ``_remote_seen``), or the batch held anything else a
waiter may want (replies, stream ends, the broker gone). A waiter names its
oid and then checks the states, both under ``cond``; the I/O thread sets the
states and then reads the watch: one of the two always sees the other.

Threads: records change only under ``_ref_lock``: user threads take it in
incref/decref/put/_subscribe, the I/O thread once per run of OBJ/STREAM_END
messages in a drained batch. An arriving value and the last decref of its
object are therefore atomic with respect to each other: either the decref
deletes the record with its value, or the arrival finds no record and drops
the value. Waiters read ``state`` and ``value`` without the lock (a value is
set before its state says it is here, and is never unset). Lock order:
``cond`` -> ``_send_lock`` -> ``_ref_lock``; nothing sends, notifies or runs a
callback while holding ``_ref_lock``.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import zmq

from zray import _direct, _resultlane, exceptions
from zray import _protocol as P
from zray._protocol import Msg
from zray._reconnect import ReplayLog
from zray._security import await_reply, secure_client, watch_handshake
from zray._serialization import deserialize, load_error, serialize
from zray._store import INLINE_MAX, ObjectStore, parse_blob
from zray._transport import NOBLOCK, readable, recv_parts, send_parts

IN_STORE = "in store"  # LocalObject.value's frames when the value is in this node's store

log = logging.getLogger("zray.client")
_CANCEL_SIGNALS = {signal.SIGUSR1}
# Releases ride in batches: one REFS message per RELEASE_BATCH dropped refs or
# per RELEASE_DELAY_MS, not one per ref (a sync loop would otherwise pay for an
# extra message per call).
RELEASE_BATCH = 256
RELEASE_DELAY_MS = 100
# A driver's SUBMITs of one burst go out as one C->B BATCH (one send, one wake-up of the
# broker's socket, one message for its loop instead of one per task): a .remote() within
# SUBMIT_BURST_S of the previous one queues its SUBMIT and wakes the I/O thread, which
# sends what has queued once it runs (when the caller blocks, or at its next GIL switch);
# anything else sent on the out socket, and SUBMIT_BATCH queued SUBMITs, send them at
# once. A lone .remote() (a sync loop) is sent at once: no thread hop on its way. Program
# order is kept. Executors send each SUBMIT at once (a cancel signal must not find one
# half-queued).
SUBMIT_BATCH = 256
SUBMIT_BURST_S = 0.0002
# While a burst goes on (a SUBMIT within BURST_POLL_S), the I/O thread polls every
# BURST_POLL_MS and sends what queued meanwhile, so the burst's SUBMITs need no
# wake-up each (a pipe write per queued chunk cost the caller ~8 us a task); a caller
# that blocks (get, wait) sends what it queued itself first.
BURST_POLL_S = 0.005
BURST_POLL_MS = 1
# A driver awaiting more than COALESCE_INFLIGHT task results (``_awaiting``) whose I/O
# thread was woken for at most COALESCE_FEW messages, none of which a waiter wanted,
# waits COALESCE_S before it polls again, so that results streaming in from executors
# (pushed one message each) are taken several per wake-up: each wake-up costs a poll,
# a thread switch and a GIL hand-over (~20 us). A driver waiting on one task (a sync
# loop) is never delayed, nor a batch that wakes a waiter; executors never wait.
COALESCE_INFLIGHT = 16
COALESCE_FEW = 2
COALESCE_S = 0.0005
ARRIVALS_KEPT = 4096  # a waiter that missed more than this many arrivals looks at all


class ObjectState(enum.IntEnum):
    """Where a local object's value is, as far as this process knows (see the module doc)."""

    PENDING = 0
    AWAITING_PUSH = 1
    SUBSCRIBED = 2
    REMOTE = 3
    FETCHING = 4
    LOCAL = 5
    STORED = 6


PENDING, AWAITING_PUSH, SUBSCRIBED, REMOTE, FETCHING, LOCAL, STORED = ObjectState
_HERE = frozenset({LOCAL, STORED})  # get() can read it
_READY = frozenset({REMOTE, FETCHING, LOCAL, STORED})  # wait() counts it as ready


@dataclass(slots=True)
class LocalObject:
    """This process's record of one object it holds refs to."""

    refcount: int = 0
    state: ObjectState = PENDING
    # (kind, frames | IN_STORE) once LOCAL or STORED: one attribute, so that a
    # reader never sees the kind of one copy with the frames of another.
    value: Optional[tuple] = None
    node_id: Optional[bytes] = None  # REMOTE / FETCHING: the node whose store has it
    callbacks: Optional[list] = None  # run (outside the lock) once the value is here
    # the refs inside an inline reply's value (handed to us, REFS 3): held while this is
    nested: Optional[list] = None


def _cancel_pairs(ops: list) -> list:
    """REFS ops without the (oid, +1) ... (oid, -1) pairs that cancel: a ref borrowed and
    dropped again before the batch went out (a get() of a list of 10,000 refs, then
    dropping it, sends nothing). A pair never spans a send: the +1s go out before
    anything else is sent. An escape (0) between them keeps both."""
    plus: dict = {}
    drop = []
    for i, item in enumerate(ops):
        oid, op = item[0], item[1]
        if op == 1:
            plus[oid] = i
        elif op == -1:
            j = plus.pop(oid, None)
            if j is not None:
                drop.append(j)
                drop.append(i)
        else:
            plus.pop(oid, None)
    if not drop:
        return ops
    gone = set(drop)
    return [op for i, op in enumerate(ops) if i not in gone]


@dataclass(slots=True)
class _Stream:
    """An open ObjectRefGenerator: its items arrive before their refs exist."""

    end: Optional[int] = None  # the item count, once STREAM_END came
    top: int = 0  # the highest item index that arrived


def _stream_index(oid: bytes) -> int:
    return int.from_bytes(oid[P.TASK_ID_LEN:], "little")


class Client:
    def __init__(
        self,
        address: str,
        kind: str = "driver",
        node_id: bytes = b"",
        job_id: bytes = b"",
        cid: Optional[bytes] = None,
        on_exec: Optional[Callable] = None,
        on_cancel: Optional[Callable] = None,
        connect_timeout: float = 15.0,
        token: bytes = b"",
    ):
        self.address = address
        self.kind = kind
        self._token = token  # an executor's spawn token (see P.Hello)
        self.cid = cid or os.urandom(P.ID_LEN)
        self.node_id = node_id
        self.job_id = job_id or self.cid[:4]
        self.driver_cid = self.cid if kind == "driver" else b""
        self._ids = itertools.count(1)
        self._on_exec = on_exec
        self._on_cancel = on_cancel
        self._ctx = zmq.Context()
        self._watches: list = []  # handshake watches until the broker's WELCOME
        self._out = self._socket(P.out_ident(self.cid))
        self._inbox = self._socket(P.inbox_ident(self.cid))
        self._push: dict = {}  # owner cid -> PUSH socket to its direct inbox, or None
        self._direct = None  # PULL: results pushed by executors on this node
        self._direct_path = ""
        self._send_lock = threading.Lock()
        self.cond = threading.Condition(threading.Lock())
        self._ref_lock = threading.RLock()  # guards records, _streams, _pending_refs
        self.records: dict[bytes, LocalObject] = {}  # oid -> its record (module doc)
        self.store = ObjectStore(node_id) if node_id else None
        self._release_store = False  # a store object was released: flush at the next send
        self._pending_refs: list = []  # [(oid, +1 | -1)] in order, sent as one REFS
        self._pending_addref = False
        self._release_since = 0.0
        self._submits: list = []  # [(header, frames)]: SUBMITs queued for one BATCH
        self._batch_submits = kind != "executor"
        self._last_submit = 0.0  # when the last SUBMIT was made (SUBMIT_BURST_S)
        self._io_idle = True  # the I/O thread polls long: a queued SUBMIT must wake it
        self._wake_r, self._wake_w = os.pipe()  # a queued SUBMIT wakes the I/O thread
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Who waits on `cond` for which objects (changed under `cond`; read by the I/O
        # thread after it filed a batch's values): a batch of values wakes the waiters
        # only if one of them arrived that a waiter named, or a waiter takes any
        # arrival (module doc, "Wake-ups").
        self._watch: dict = {}  # oid -> how many waiters wait for it in particular
        self._watch_any = 0  # waiters woken by any arrival (wait(num_returns<n), streams)
        self._remote_seen = 0  # values found in another node's store (get() fetches them)
        # What came while `_watch_any` waiters wait (appended under `cond`): a wait() for
        # some of many refs looks at the new arrivals only, not at all its refs again.
        self._arrivals: collections.deque = collections.deque(maxlen=ARRIVALS_KEPT)
        self._arrival_seq = 0  # how many were ever appended to _arrivals
        self._awaiting = 0  # records AWAITING_PUSH (see COALESCE_INFLIGHT)
        self._replies: dict = {}
        self._unawaited: set = set()  # ids of requests sent with request_nowait
        self._streams: dict[bytes, _Stream] = {}  # task_id -> its open stream
        self.current_task_id = b""
        self.current_task_name = ""
        self.current_actor_id = b""
        # actor id -> calls sent to it since the broker last counted those unfinished
        # (only for actors with max_pending_calls; zray/actor.py _reserve_call)
        self.actor_calls: dict[bytes, int] = {}
        self.print_logs = True  # init(log_to_driver=False): drop remote output (PRINT)
        self.closed = False
        self.forked = False  # this is a forked copy: see forked_away()
        self.broker_gone = False
        self.last_broker = time.monotonic()
        self.mask_signals = kind == "executor"
        self.on_block: Optional[Callable] = None  # executor: hand back prefetched tasks
        self.on_unblock: Optional[Callable] = None
        # Closed from a restarted broker's rehello until our replay is sent: user threads'
        # messages wait, so none reaches the broker between our HELLO and the replay
        # (a task whose function or arguments it does not know yet).
        self._gate = threading.Event()
        self._gate.set()
        self.replay = ReplayLog(self._ref_lock)  # what a restarted broker is told again (zray/_reconnect.py)
        self.info = self._handshake(connect_timeout)
        self.epoch = self.info.get("epoch")  # the broker incarnation that welcomed us
        self.results = None  # result lanes from executors here (zray/_resultlane.py)
        self._result_out = None  # ... and ours to owners here, as an executor
        if self.store is not None:
            self._bind_direct()
            if _resultlane.ENABLED and self._direct is not None and kind != "cli":
                self.results = _resultlane.ResultInbox.open(self, self.store.dir)
                self._result_out = _resultlane.ResultLanes(self.store.dir)
        self.direct = None  # direct actor calls (zray/_direct.py)
        self.on_close: list = []  # run first by close(): sockets of ours others own
        if _direct.ENABLED and kind != "cli":
            self.direct = _direct.DirectCalls(self, _HERE)
        self.leases = None  # leases of executors for our sync tasks (zray/_lease.py)
        self._io = threading.Thread(target=self._io_loop, name="zray-io", daemon=True)
        self._io.start()

    # ----------------------------------------------------------------- sockets
    def _socket(self, identity: bytes):
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, identity)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.LINGER, 2000)
        secure_client(s, self.address, wait=5.0)
        self._watches.append(watch_handshake(s, self.address))
        s.connect(self.address)
        return s

    def _hello(self) -> None:
        self._inbox.send(P.encode(P.Hello(P.VERSION, self.kind, self.node_id, os.getpid(),
                                          self.job_id, self._token)))

    def _rejoin(self, info: dict) -> None:
        """A WELCOME after the handshake (I/O thread): the broker restarted and asks us
        to say HELLO again ({rehello}), or took us back (a new epoch): replay our state."""
        if "rehello" in info:
            if info["rehello"] == self.epoch:
                # The broker that welcomed us forgot us (a driver silent too long, an
                # executor it let go): we are gone, as when the broker is.
                log.error("the zray broker dropped this %s", self.kind)
                self.broker_gone = True
                self._gate.set()
                if self._on_exec is not None:
                    self._on_exec(P.Exit(), [])
                with self.cond:
                    self.cond.notify_all()
                return
            if self.kind == "executor" and not self.current_actor_id:
                # A pool process: the restarted broker has a fresh pool; our owners
                # resubmit what we ran.
                log.warning("the zray broker restarted: this pool executor leaves")
                self.broker_gone = True
                if self._on_exec is not None:
                    self._on_exec(P.Exit(), [])
                return
            with self._send_lock:  # queued SUBMITs are in the replay log: sent from there
                self._submits = []
            self._gate.clear()
            self._hello()
        elif "error" in info:  # e.g. our node has not vouched for us again yet: retried
            log.info("the restarted zray broker refused us for now: %s", info["error"])
        elif info.get("epoch") and info.get("epoch") != self.epoch:
            self.epoch = info["epoch"]
            nodes = info.get("nodes")
            try:
                self.replay.replay(self, set(nodes) if isinstance(nodes, list) else set())
                if self.direct is not None:  # the new broker has not heard us ask
                    self.direct.rejoined()
            finally:
                self._gate.set()

    def results_on_lost_nodes(self, live_nodes: set) -> set:
        """Task ids of results this client knows to be in a node store that is not
        among ``live_nodes`` (for a restarted broker: zray/_reconnect.py)."""
        with self._ref_lock:
            records = list(self.records.items())
        gone = set()
        for oid, rec in records:
            state = rec.state
            if state in (REMOTE, FETCHING):
                node = rec.node_id
            elif state is STORED:
                node = self.node_id
            else:
                continue
            if node not in live_nodes:
                gone.add(oid[:P.TASK_ID_LEN])
        return gone

    def held_objects(self, skip_tasks: set) -> tuple:
        """For a restarted broker (zray/_reconnect.py): the PUTs of the values this
        client owns and holds ([(header, frames)]: inline frames, or the node store
        they are in), the refs it borrowed ([(oid, +1)]) and the oids it waits for.
        Returns of the tasks in ``skip_tasks`` (resubmitted) are left out."""
        with self._ref_lock:
            records = list(self.records.items())
        puts, borrowed, subs = [], [], []
        unregistered = self.direct.unregistered if self.direct is not None else ()
        for oid, rec in records:
            if oid[:P.TASK_ID_LEN] in skip_tasks or oid in unregistered:
                continue  # its task is resubmitted (or a direct call's: no broker knew it)
            state, value = rec.state, rec.value
            if oid[:P.ID_LEN] != self.cid:
                borrowed.append((oid, 1))
            elif state is LOCAL and value is not None and value[1] is not IN_STORE:
                puts.append((P.encode(P.Put(oid, value[0], [], None, 0)), list(value[1])))
            elif state is STORED and value is not None:
                puts.append((P.encode(P.Put(oid, value[0], [], self.node_id, 0)), []))
            elif state in (REMOTE, FETCHING) and rec.node_id:
                puts.append((P.encode(P.Put(oid, P.VALUE, [], rec.node_id, 0)), []))
            if state in (SUBSCRIBED, FETCHING):
                subs.append(oid)
        return puts, borrowed, subs

    def send_submit(self, spec: P.TaskSpec, frames) -> None:
        """SUBMIT a task, remembering it until its result comes (for a broker restart)."""
        header = P.encode(P.Submit(spec))
        self.replay.record_submit(spec, header, frames)
        results = self.results
        if results is not None and results.changed and self._awaiting > 1:
            results.need_io()  # results will come while nobody waits: the I/O thread reads
        if self._batch_submits:
            now = time.monotonic()
            burst, self._last_submit = now - self._last_submit < SUBMIT_BURST_S, now
            if burst:
                self._queue_submit(header, frames)
                return
        self.send(header, frames)  # (sends anything queued first)

    def _queue_submit(self, header: bytes, frames) -> None:
        """Queue a SUBMIT for the burst's BATCH (SUBMIT_BATCH); the I/O thread sends it."""
        if self.forked:
            return
        if (not self._gate.is_set() and threading.current_thread() is not self._io
                and not self.cond._is_owned()):
            self._gate.wait(P.BROKER_TIMEOUT_S)  # (as in send)
        with self._send_lock:
            if self._pending_addref or len(self._pending_refs) >= RELEASE_BATCH:
                self._flush_refs_locked()  # holds first, as for any message we send
            q = self._submits
            q.append((header, frames))
            if len(q) >= SUBMIT_BATCH:
                self._flush_submits_locked()
                return
            if len(q) > 1 or not self._io_idle:
                return  # the I/O thread was woken by the first, or polls briefly
        try:
            os.write(self._wake_w, b"s")
        except BlockingIOError:
            pass  # (the pipe is full of wake-ups: the I/O thread is woken already)

    def flush_queued(self) -> None:
        """Send the SUBMITs queued for a BATCH now (a user thread about to block)."""
        if self._submits and self._gate.is_set() and not self.forked:
            with self._send_lock:
                self._flush_submits_locked()

    def _flush_submits_locked(self) -> None:
        """Send the queued SUBMITs (under ``_send_lock``): one as it is, more as a BATCH."""
        q, self._submits = self._submits, []
        if len(q) == 1:
            send_parts(self._out, q[0][0], None, q[0][1])
        elif q:
            parts = P.encode_batch(q)
            send_parts(self._out, parts[0], None, parts[1:])

    def send_fn(self, fid: bytes, nested: list, blob) -> None:
        header = P.encode(P.Fn(fid, nested))
        self.replay.record_fn(fid, header, blob)
        self.send(header, [blob])

    def _handshake(self, timeout: float) -> dict:
        self._hello()
        try:
            answered = await_reply(self._inbox, self._watches, timeout)
        except ConnectionError:  # the broker refused our key (or its absence)
            self._ctx.destroy(linger=0)
            raise
        if not answered:
            self._ctx.destroy(linger=0)
            raise ConnectionError(f"no zray broker answered at {self.address} within {timeout:.0f}s")
        try:
            msg = P.decode(self._inbox.recv())
        except P.ProtocolError as e:
            self._ctx.destroy(linger=0)
            raise ConnectionError(f"bad handshake reply from {self.address}: {e}") from None
        if msg.TYPE != Msg.WELCOME:
            self._ctx.destroy(linger=0)
            raise ConnectionError(f"unexpected handshake reply {msg.TYPE.name}")
        if "error" in msg.info:
            self._ctx.destroy(linger=0)
            raise ConnectionError(f"the zray broker at {self.address} refused this client: "
                                  f"{msg.info['error']}")
        return msg.info

    def _bind_direct(self):
        """Executors on this node push our task results here, skipping the broker hop."""
        try:
            self.store.check_dirs()  # a private dir, or UnsafePathError
            path = os.path.join(self.store.dir, f"c-{self.cid.hex()}")
            s = self._ctx.socket(zmq.PULL)
            s.setsockopt(zmq.RCVHWM, 0)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(f"ipc://{path}")
        except (OSError, zmq.ZMQError):
            log.debug("no direct inbox; results come through the broker", exc_info=True)
            return
        self._direct, self._direct_path = s, path

    def push_direct(self, owner: bytes, header: bytes, frames, lane: bool = True) -> bool:
        """Send an OBJ straight to ``owner`` if it lives on this node; False if not sent.
        ``lane``: on its result lane if it has one (zray/_resultlane.py), else the PUSH."""
        if self.store is None or self.forked:
            return False
        if lane and self._result_out is not None:
            sent = self._result_out.push(owner, header, frames)
            if sent is not None:
                return sent
        with self._send_lock:
            sock = self._push.get(owner, False)
            if sock is False:
                path = os.path.join(self.store.dir, f"c-{owner.hex()}")
                sock = None
                if os.path.exists(path):
                    sock = self._ctx.socket(zmq.PUSH)
                    sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer not there
                    sock.setsockopt(zmq.SNDHWM, 10000)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(f"ipc://{path}")
                if len(self._push) >= 256:  # forget the oldest owners
                    for old in list(self._push)[:64]:
                        s = self._push.pop(old)
                        if s is not None:
                            s.close(0)
                self._push[owner] = sock
            if sock is None:
                return False
            try:
                send_parts(sock, header, None, frames, NOBLOCK)
                return True
            except zmq.Again:
                return False  # not connected (yet): the broker pushes it

    def send(self, header: bytes, frames: list = ()) -> None:
        """Send one message on the out socket (any thread)."""
        if self.forked:  # a forked child must never write to its parent's sockets
            return
        if (not self._gate.is_set() and threading.current_thread() is not self._io
                and not self.cond._is_owned()):  # (the I/O thread needs `cond` to go on)
            self._gate.wait(P.BROKER_TIMEOUT_S)  # the broker restarted: after our replay
        if self.mask_signals:
            # An executor's cancel signal must not cut a multipart message in two.
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _CANCEL_SIGNALS)
        try:
            with self._send_lock:
                # Holds (+1) go out before anything else we send (a DONE could let the
                # giver of a ref free it); releases wait for a batch or the timer.
                if self._submits:  # queued SUBMITs go first: program order
                    self._flush_submits_locked()
                if (self._pending_addref or self._release_store
                        or len(self._pending_refs) >= RELEASE_BATCH):
                    self._flush_refs_locked()
                send_parts(self._out, header, None, frames)
        finally:
            if self.mask_signals:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _flush_refs_locked(self):
        if self._submits:  # (a release must not overtake a SUBMIT that uses the object)
            self._flush_submits_locked()
        with self._ref_lock:
            ops, self._pending_refs = self._pending_refs, []
            self._pending_addref = self._release_store = False
        if len(ops) > 1:
            ops = _cancel_pairs(ops)
        if ops:
            self._out.send(P.encode(P.Refs(ops)))

    # ---------------------------------------------------------------- I/O loop
    def _io_loop(self):
        inbox, direct = self._inbox, self._direct
        poller = self._poller = zmq.Poller()  # (zray/_direct.py adds its tcp reply PULL)
        poller.register(inbox, zmq.POLLIN)
        if direct is not None:
            poller.register(direct, zmq.POLLIN)
        wake = self._wake_r
        poller.register(wake, zmq.POLLIN)
        direct_calls = self.direct
        lanes: dict = {}  # fd -> poll events: direct calls' lanes we read (zray/_direct.py)
        results, rlanes = self.results, {}  # result lanes (zray/_resultlane.py): fd -> events
        last_hb = time.monotonic()
        coalesce = self.kind == "driver"
        while True:
            # Once closed, one last turn that does not wait: what already came is still
            # handled (a line a task printed just before the result the driver exits on)
            final = self.closed
            try:
                if direct_calls is not None and direct_calls.io_changed:
                    lanes = self._poll_lanes(poller, lanes, direct_calls.io_poll_set())
                if results is not None and results.changed:
                    rlanes = self._poll_lanes(poller, rlanes, results.io_poll_set())
                if time.monotonic() - self._last_submit < BURST_POLL_S:
                    self._io_idle = False  # (see BURST_POLL_S)
                    timeout = BURST_POLL_MS
                else:
                    self._io_idle = True  # then look at the queue: see _queue_submit
                    timeout = RELEASE_DELAY_MS if self._pending_refs else 500
                    if self._submits:
                        timeout = 0
                if final:
                    timeout = 0
                ready = dict(poller.poll(timeout))
                if wake in ready:
                    try:
                        os.read(wake, 4096)
                    except BlockingIOError:
                        pass
                if self._submits and self._gate.is_set():  # (not while a replay waits)
                    with self._send_lock:
                        self._flush_submits_locked()
                if ready:
                    batch = []
                    for sock in (direct, inbox):
                        if sock is None or sock not in ready:
                            continue
                        if sock is inbox:
                            self.last_broker = time.monotonic()
                        while readable(sock):
                            parts = recv_parts(sock)
                            # The broker's turn may come as one BATCH, and so may the results
                            # an executor here pushes us together (workerd/held.py).
                            try:
                                batch.extend(P.unbatch(parts))
                            except P.ProtocolError as e:
                                log.warning("dropping malformed message from %s: %s",
                                            "broker" if sock is inbox else "direct inbox", e)
                    remote = self.direct.tcp_pull if self.direct is not None else None
                    if remote is not None and remote in ready:  # DDONEs from other hosts
                        while True:
                            try:
                                parts = recv_parts(remote)
                            except zmq.Again:
                                break
                            if self.direct.take_remote(parts):
                                batch.append(parts)
                    woke = self._handle_batch(batch)
                    if results is not None:
                        for fd in rlanes:
                            if fd in ready:
                                results.on_ready(fd)
                    for fd in lanes:
                        ev = ready.get(fd)
                        if ev:
                            direct_calls.read_lane(fd, int(ev))
                    if (coalesce and not woke and len(batch) <= COALESCE_FEW
                            and timeout != BURST_POLL_MS and self._awaiting > COALESCE_INFLIGHT):
                        time.sleep(COALESCE_S)  # (never while SUBMITs queue up)
                now = time.monotonic()
                if self._pending_refs and now - self._release_since >= RELEASE_DELAY_MS / 1000:
                    with self._send_lock:
                        self._flush_refs_locked()
                if now - last_hb > P.HEARTBEAT_S:
                    inbox.send(P.encode(P.Heartbeat()))
                    last_hb = now
                    if now - self.last_broker > P.BROKER_TIMEOUT_S and not self.broker_gone:
                        # The broker answers every heartbeat: it is gone (or restarted
                        # and forgot us). Fail waiters instead of hanging forever.
                        log.error("no word from the zray broker at %s for %.0fs", self.address,
                                  now - self.last_broker)
                        self.broker_gone = True
                        self._gate.set()
                        if self._on_exec is not None:
                            self._on_exec(P.Exit(), [])
                        with self.cond:
                            self.cond.notify_all()
            except zmq.ContextTerminated:
                return
            except Exception:  # never let the I/O thread die silently
                if self.closed:
                    return
                log.exception("zray I/O thread error")
            if final:
                return

    @staticmethod
    def _poll_lanes(poller, old: dict, now: list) -> dict:
        """(I/O thread) Poll the lanes in ``now`` [(fd, events)] instead of ``old``."""
        new = dict(now)
        for fd in old:
            if fd not in new:
                poller.unregister(fd)
        for fd, ev in new.items():
            if old.get(fd) != ev:
                poller.register(fd, ev)
        return new

    def wake_io(self) -> None:
        """Have the I/O thread look at what it polls again (zray/_direct.py need_io)."""
        try:
            os.write(self._wake_w, b"l")
        except BlockingIOError:
            pass  # (full of wake-ups: it is woken already)

    def _handle_batch(self, batch) -> bool:
        """File a drained batch of messages; True if it woke the waiters."""
        notify = False
        arrived: list = []  # callbacks of objects now here, run once the lock is released
        fetch: list = []  # objects ready elsewhere that a callback waits for
        lock = self._ref_lock
        held = False  # records change under _ref_lock, taken once per run of OBJ/STREAM_END
        decoded = []  # decoded before taking the lock: user threads wait on it less
        direct = self.direct
        watched = direct.broker_tasks if direct is not None else None
        came: list = []  # watched broker-path calls whose result came (zray/_direct.py)
        filed: list = []  # oids whose OBJ came: they wake a waiter that watches them
        remote_seen = self._remote_seen
        for msg in batch:
            try:
                decoded.append((P.decode_from_broker(P.buffer_of(msg[0])), msg))
            except P.ProtocolError as e:
                log.warning("dropping malformed message from broker: %s", e)
        try:
            for m, msg in decoded:
                mtype = m.TYPE
                if mtype == Msg.OBJ:
                    if m.codec is not None:
                        if held:  # decompressing a blob takes a while: not under the lock
                            lock.release()
                            held = False
                        value = (m.kind, parse_blob(m.codec, P.buffer_of(msg[1]))[1])
                        state = LOCAL
                    elif m.node_id is None:
                        value, state = (m.kind, msg[1:]), LOCAL
                    elif m.node_id == self.node_id:
                        value, state = (m.kind, IN_STORE), STORED
                    else:
                        value, state = None, REMOTE
                    if not held:
                        lock.acquire()
                        held = True
                    self._arrived_locked(m.oid, state, value, m.node_id, arrived, fetch)
                    if watched and m.oid in watched:
                        came.append(m.oid)
                    filed.append(m.oid)
                    continue
                if mtype == Msg.STREAM_END:
                    if not held:
                        lock.acquire()
                        held = True
                    stream = self._streams.get(m.task_id)
                    self.replay.finished(m.task_id, end=True)
                    if stream is not None:
                        stream.end = m.count
                    notify = True
                    continue
                if held:  # the handlers below may send: never under _ref_lock
                    lock.release()
                    held = False
                if mtype == Msg.DDONE or mtype == Msg.ROUTE:
                    if direct is not None:
                        handed = release = None
                        if mtype == Msg.DDONE:
                            values, handed = direct.done(m, msg[1:])
                        else:
                            values = direct.route(m)
                        with lock:
                            for oid, value in values:
                                self._arrived_locked(oid, LOCAL, value, None, arrived, fetch)
                                filed.append(oid)
                            if handed:
                                release = self.take_handed(values, handed)
                        for oid in release or ():  # (not under the lock, as a drop)
                            self.decref(oid)
                        notify = True
                    continue
                if mtype == Msg.EXEC or mtype == Msg.RECALL:  # (RECALL: workerd/executor.py)
                    if self._on_exec is not None:
                        self._on_exec(m, msg[1:])
                elif mtype == Msg.LOG:  # a leased executor's output, on its lane (lease.py)
                    if self.print_logs and m.driver == self.cid:
                        self._print_log(m.prefix, m.text)
                elif mtype == Msg.LEASE:  # leased executors (zray/_lease.py, workerd/lease.py)
                    if m.holder == self.cid:  # our lease ends: on its lane
                        if self.leases is not None:
                            self.leases.ended(m)
                    elif self._on_exec is not None:  # the broker leases us to a client
                        self._on_exec(m, msg[1:])
                elif mtype == Msg.REPLY:
                    if m.req_id in self._unawaited:  # (request_nowait): only errors matter
                        self._unawaited.discard(m.req_id)
                        if not m.ok:
                            log.warning("the broker refused a request: %s", m.result)
                    else:
                        self._replies[m.req_id] = (m.ok, m.result)
                    notify = True
                elif mtype == Msg.PRINT:
                    if self.print_logs:
                        self._print_log(m.prefix, m.text)
                elif mtype == Msg.INTERRUPT:
                    if self._on_cancel is not None:
                        self._on_cancel(m.task_id, m.force)
                elif mtype == Msg.WELCOME:
                    self._rejoin(m.info)
                elif mtype in (Msg.EXIT, Msg.SHUTDOWN):
                    if self._on_exec is not None:
                        self._on_exec(m, [])
                    self.broker_gone = True
                    self._gate.set()
                    notify = True
        finally:
            if held:
                lock.release()
        if came:
            direct.broker_done(came)
        for cb in arrived:
            try:
                cb()
            except Exception:
                log.exception("an object's done callback failed")
        if fetch:
            self.send(P.encode(P.Sub(fetch)))
        if filed and not notify:  # (read after the values were filed: see wait_objects)
            if self._watch_any or self._remote_seen != remote_seen:
                notify = True
            else:
                watch = self._watch
                if watch:
                    for oid in filed:
                        if oid in watch:
                            notify = True
                            break
        if notify:
            with self.cond:
                if filed and self._watch_any:  # (see wait_objects)
                    self._arrivals.extend(filed)
                    self._arrival_seq += len(filed)
                self.cond.notify_all()
        results = self.results
        if results is not None and results.reading:
            results.poke()  # a thread reading the result lanes may wait for what came
        return notify

    def _arrived_locked(self, oid: bytes, state: ObjectState, value, node_id,
                        arrived: list, fetch: list) -> None:
        """An OBJ: move ``oid``'s record to ``state`` (LOCAL, STORED or REMOTE).
        Called by the I/O thread holding ``_ref_lock``."""
        self.replay.finished(oid[:P.TASK_ID_LEN], stored=node_id is not None)
        rec = self.records.get(oid)
        if rec is None:
            stream = self._streams.get(P.task_of(oid))
            if stream is None:
                return  # no ref to it is left here: drop the value
            rec = self.records[oid] = LocalObject()  # held by the stream until taken
            stream.top = max(stream.top, _stream_index(oid))
        elif rec.state is AWAITING_PUSH:  # (every branch below moves it on)
            self._awaiting -= 1
        if state is REMOTE:
            if rec.state in _HERE:
                return  # already here: a copy elsewhere changes nothing
            rec.node_id = node_id
            self._remote_seen += 1  # a get() waiting for it must fetch it
            if rec.callbacks:  # a future waits for the value: have it brought here
                rec.state = FETCHING
                fetch.append(oid)
            else:
                rec.state = REMOTE
            return
        elif rec.state is LOCAL and state is LOCAL and value[0] == P.ERROR:
            # An error after the value: a report that the call failed, sent by a broker
            # that had not heard of its result yet (the executor died as it sent it). The
            # value we hold stands: a get() must not see it turn into an error later.
            return
        rec.value = value  # before the state: lock-free readers check the state first
        rec.state = state
        if rec.callbacks:
            arrived.extend(rec.callbacks)
            rec.callbacks = None

    @staticmethod
    def _print_log(prefix: str, text: str):
        out = sys.stderr if prefix.endswith("!") else sys.stdout
        if "__zray_tqdm__:" in text or "zray.experimental.tqdm_ray" in sys.modules:
            from zray.experimental import tqdm_ray  # progress bars: drawn, not printed

            if "__zray_tqdm__:" in text or tqdm_ray.active():
                try:
                    tqdm_ray.driver_print(prefix.rstrip("!"), text, out)
                except Exception:
                    pass
                return
        prefix = prefix.rstrip("!")
        lines = text.splitlines()
        try:
            out.write("".join(f"{prefix} {line}\n" for line in lines))
            out.flush()
        except Exception:
            pass

    # ---------------------------------------------------------- ids and refs
    def next_task_id(self) -> bytes:
        return self.cid + next(self._ids).to_bytes(4, "little")  # see P.TASK_ID_LEN

    def incref(self, oid: bytes, borrowed: bool = False):
        """One more ObjectRef to ``oid`` in this process. ``borrowed``: it was
        unpickled here (not made by this process's submit/put), so the broker
        must learn that we hold it before the ref's giver may let it go."""
        with self._ref_lock:
            rec = self.records.get(oid)
            if rec is None:
                rec = self.records[oid] = LocalObject()
            n = rec.refcount
            rec.refcount = n + 1
            if borrowed and n == 0 and not self.closed:
                if not self._pending_refs:
                    self._release_since = time.monotonic()
                self._pending_refs.append((oid, 1))
                self._pending_addref = True

    def incref_many(self, oids: list) -> None:
        """``incref(oid, borrowed=True)`` for each of ``oids``, under one lock: the refs
        one unpickled value holds (a list of 10,000 refs costs one lock, not 10,000)."""
        records = self.records
        with self._ref_lock:
            pending, closed = self._pending_refs, self.closed  # the I/O thread swaps it
            before = len(pending)
            add = pending.append
            for oid in oids:
                rec = records.get(oid)
                if rec is None:
                    records[oid] = LocalObject(1)
                    add((oid, 1))
                else:
                    n = rec.refcount
                    rec.refcount = n + 1
                    if n == 0:
                        add((oid, 1))
            if closed:
                del pending[before:]
            elif len(pending) > before:
                if not before:
                    self._release_since = time.monotonic()
                self._pending_addref = True

    def escape(self, oid: bytes) -> None:
        """A ref to ``oid`` was pickled out of band: ask the broker to keep the object."""
        with self._ref_lock:
            if not self.closed:
                if not self._pending_refs:
                    self._release_since = time.monotonic()
                self._pending_refs.append((oid, 0))
                self._pending_addref = True  # before anything else we send

    def hand_off(self, oids: list, recipient: bytes) -> None:
        """Refs to ``oids`` go to client ``recipient`` inside an inline reply (REFS 2,
        before the reply): the broker keeps each object until the recipient says it holds
        it (REFS 3, take_handed) or leaves."""
        with self._ref_lock:
            if not self.closed:
                if not self._pending_refs:
                    self._release_since = time.monotonic()
                self._pending_refs.extend((oid, 2, recipient) for oid in oids)
                self._pending_addref = True

    def take_handed(self, values: list, handed: list) -> list:
        """(the I/O thread, holding ``_ref_lock``) The refs handed to us with an inline
        reply (DDONE ``handed``, one list per return; ``values``: the [(oid, value)] filed,
        [] when the reply was not ours to file): one more local ref to each, and REFS 3
        (we hold it: the broker's hand-off ends). A filed value's record keeps its refs
        (``nested``) until it goes; the oids returned are to be let go (decref) now."""
        records = self.records
        if self.closed:
            return []
        pending = self._pending_refs
        if not pending:
            self._release_since = time.monotonic()
        for oids in handed:
            for oid in oids:
                rec = records.get(oid)
                if rec is None:
                    records[oid] = LocalObject(1)
                else:
                    rec.refcount += 1
                pending.append((oid, 3))
        self._pending_addref = True
        release = []
        for i, oids in enumerate(handed):
            if not oids:
                continue
            rec = records.get(values[i][0]) if i < len(values) else None
            if rec is not None and rec.nested is None and rec.value is values[i][1]:
                rec.nested = oids
            else:
                release.extend(oids)
        return release

    def decref(self, oid: bytes):
        """One ObjectRef to ``oid`` fewer; the last one deletes its record (and value)."""
        with self._ref_lock:
            records = self.records
            rec = records.get(oid)
            if rec is not None:
                n = rec.refcount
                if n > 1:
                    rec.refcount = n - 1
                    return
                del records[oid]
                if rec.state is AWAITING_PUSH:
                    self._awaiting -= 1
                if rec.nested is not None:  # the refs its inline value held (take_handed)
                    for inner in rec.nested:
                        self.decref(inner)
                tid = oid[:P.TASK_ID_LEN]
                if tid in self.replay.unfinished:
                    self.replay.dropped(tid)
                direct = self.direct
                if direct is not None and oid in direct.unregistered and direct.forget(oid):
                    return  # a direct call's result the broker never heard of
                value = rec.value
                if value is not None and value[1] is IN_STORE:
                    # Store memory: release it with the next message we send, not after
                    # the batch timer, so the node recycles its warm file for our next put.
                    self._release_store = True
            if not self.closed:
                if not self._pending_refs:
                    self._release_since = time.monotonic()
                self._pending_refs.append((oid, -1))

    def task_returns(self, task_id: bytes, n: int, ref_cls) -> list:
        """Refs to the ``n`` returns of a task we are about to submit, counted and marked
        AWAITING_PUSH (the broker pushes them to us) under one lock: what ``ref_cls(oid,
        self.cid, self)`` and ``expect_push`` do, without a lock and a call each."""
        refs = []
        new, cid = ref_cls.__new__, self.cid
        with self._ref_lock:
            records = self.records
            for i in range(1, n + 1):
                oid = task_id + i.to_bytes(4, "little")  # P.object_id(task_id, i)
                rec = records.get(oid)
                if rec is None:
                    records[oid] = LocalObject(1, AWAITING_PUSH)
                    self._awaiting += 1
                else:
                    rec.refcount += 1
                    if rec.state is PENDING:
                        rec.state = AWAITING_PUSH
                        self._awaiting += 1
                ref = new(ref_cls)
                ref.id, ref.owner, ref._client = oid, cid, self
                refs.append(ref)
        return refs

    def expect_push(self, oids) -> None:
        """``oids`` are returns of a task we are about to submit: the broker pushes
        them to us unasked (PENDING -> AWAITING_PUSH)."""
        with self._ref_lock:
            records = self.records
            for oid in oids:
                rec = records.get(oid)
                if rec is not None and rec.state is PENDING:
                    rec.state = AWAITING_PUSH
                    self._awaiting += 1

    # ------------------------------------------------------------ objects
    def put(self, value, owner_ref_cls, kind: int = P.VALUE) -> object:
        """Store ``value`` (kind ERROR: an error that get() raises) and return its ref."""
        oid = P.object_id(self.next_task_id(), 0)
        frames, nested = serialize(value)
        ref = owner_ref_cls(oid, self.cid, self)
        stored = self.store_frames(oid, kind, frames)
        if stored is not None:
            self._set_value(oid, STORED, (kind, IN_STORE))
            self.send(P.encode(P.Put(oid, kind, nested, *stored)))
            return ref
        # Small: copy buffers once so later changes to the caller's arrays don't leak in.
        frames = [frames[0]] + [bytes(f) for f in frames[1:]]
        self._set_value(oid, LOCAL, (kind, frames))
        self.send(P.encode(P.Put(oid, kind, nested, None, 0)), frames)
        return ref

    def _set_value(self, oid: bytes, state: ObjectState, value: tuple) -> None:
        with self._ref_lock:
            rec = self.records.get(oid)
            if rec is not None:
                rec.value = value
                rec.state = state

    def store_frames(self, oid: bytes, kind: int, frames: list):
        """Write a large value into this node's store: (node_id, size), or None if it
        is small and travels inline."""
        if self.store is None:
            return None
        size = sum(memoryview(f).nbytes for f in frames)
        if size < INLINE_MAX:
            return None
        limit = self.info.get("store_limit") or 0
        if limit and size > limit:
            raise exceptions.ObjectStoreFullError(
                f"Object of {size / 1e6:.1f} MB does not fit in the node's object store "
                f"({limit / 1e6:.1f} MB, set with --object-store-memory / object_store_memory).")
        self._send_store_releases()
        try:
            self.store.limit = limit  # the broker's WELCOME says it; puts wait above it
            size = self.store.write(oid, kind, frames, self._need_space)
        except OSError as e:
            raise exceptions.ObjectStoreFullError(
                f"Could not write a {size / 1e6:.1f} MB object to the object store: {e}") from e
        return self.node_id, size

    def _send_store_releases(self) -> None:
        """A store object was released since our last message: send the releases now,
        before this put writes, so the node recycles its warm file while we write and
        the next put finds it in the pool (sent after the write, the release reached
        the node as that next put looked: an 800 MiB put loop got a fresh file every
        other put)."""
        if not self._release_store or self.forked or not self._gate.is_set():
            return
        if self.mask_signals:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _CANCEL_SIGNALS)
        try:
            with self._send_lock:
                if self._release_store:
                    self._flush_refs_locked()
        finally:
            if self.mask_signals:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _need_space(self, nbytes: int) -> None:
        """A put waits for room in this node's store: ask the broker to spill."""
        self.send(P.encode(P.NeedSpace(nbytes)))

    def read_local(self, oid: bytes):
        """(kind, frames) of an object that is here (LOCAL or STORED)."""
        kind, frames = self.records[oid].value
        if frames is IN_STORE:
            try:
                kind, frames = self.store.read(oid)
            except FileNotFoundError:
                return P.ERROR, serialize(exceptions.ObjectLostError(
                    oid.hex(), f"Object {oid.hex()} is gone from this node's store"))[0]
        return kind, frames

    def _subscribe(self, refs) -> None:
        # Owned results are pushed to us unasked; subscribe for others' objects and
        # for ours that are ready in another node's store (the broker fetches them).
        want = []
        with self._ref_lock:
            records = self.records
            for r in refs:
                rec = records.get(r.id)
                if rec is None:  # a ref this client does not count: ask anyway
                    want.append(r.id)
                elif rec.state is PENDING:
                    rec.state = SUBSCRIBED
                    want.append(r.id)
                elif rec.state is REMOTE:
                    rec.state = FETCHING
                    want.append(r.id)
        if want:
            with self._ref_lock:
                # Releases still waiting for their batch go first: a ref rebuilt (from its
                # hex) after our last one died must find the object freed, not resolve.
                if any(op[1] < 0 for op in self._pending_refs):
                    self._pending_addref = True
            self.send(P.encode(P.Sub(want)))

    def wait_objects(self, refs, num_ready: int, timeout: Optional[float],
                     fetch: bool = True) -> None:
        """Block until ``num_ready`` of ``refs`` are local (GetTimeoutError on timeout).

        With ``fetch=False`` (wait()), an object ready in another node's store counts.
        """
        records = self.records
        done_states = _HERE if fetch else _READY

        def done(oid):
            rec = records.get(oid)
            return rec is not None and rec.state in done_states

        missing = [r for r in refs if (rec := records.get(r.id)) is None
                   or rec.state not in done_states]  # (done(), inline: a call less a ref)
        if len(refs) - len(missing) >= num_ready:
            return
        remote_seen = self._remote_seen  # (read before _subscribe: it fetches REMOTE ones)
        self.flush_queued()
        if len(missing) <= _resultlane.WAIT_MAX:
            # A sync loop's get: this thread sent what it queued, so the I/O thread need
            # not poll every BURST_POLL_MS for more (that woke it about every other task,
            # on the cores the round trip needs). A get of a burst's many results keeps
            # the burst's polling, as before.
            self._last_submit = 0.0
        self._subscribe(missing)
        blocked = self._block()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            direct = self.direct
            if direct is not None and direct.lanes:
                # direct calls' results: read them off their lane here (zray/_direct.py),
                # else have the I/O thread read them
                oids = [r.id for r in missing]
                direct.wait_lane(oids, done, deadline)
                direct.need_io(direct.lanes_for([o for o in oids if not done(o)]))
            results = self.results
            if results is not None and results.lanes:
                if num_ready >= len(refs) and len(missing) <= _resultlane.WAIT_MAX:
                    self._wait_result_lanes(results, missing, done, deadline)
                else:
                    results.need_io()
            need_all = num_ready >= len(refs)
            j = len(missing) - 1  # need_all: the last of `missing` that is not here yet
            watch, watched = self._watch, None  # the oid this waiter named in `_watch`
            with self.cond:
                if not need_all:
                    self._watch_any += 1
                    seen = self._arrival_seq  # then look: arrivals after it are in the log
                    left = {r.id for r in missing if not done(r.id)}
                try:
                    while True:
                        if need_all:
                            # Watch the last one missing: results mostly come in the order
                            # of their submission, so one wake-up usually finds all here.
                            # Each ref is found done once: O(n) over the whole wait.
                            while j >= 0 and done(missing[j].id):
                                j -= 1
                            if j < 0:
                                return
                            if fetch and self._remote_seen != remote_seen:
                                remote_seen = self._remote_seen  # ready elsewhere: fetch
                                self._subscribe(missing[:j + 1])
                            oid = missing[j].id
                            if oid != watched:
                                if watched is not None:
                                    self._unwatch(watched)
                                watch[oid] = watch.get(oid, 0) + 1
                                watched = oid
                                if done(oid):  # it came before we named it: look again
                                    continue
                        else:
                            # Only what arrived since the last look can have become ready
                            # (a wait(num_returns=1) loop over 1,000 refs would otherwise
                            # look at all of them after every result).
                            new = self._arrival_seq - seen
                            seen += new
                            arrivals = self._arrivals
                            if fetch or new > len(arrivals):
                                left = {oid for oid in left if not done(oid)}
                            else:
                                for k in range(new, 0, -1):
                                    left.discard(arrivals[-k])
                            if len(refs) - len(left) >= num_ready:
                                return
                        if self.broker_gone:
                            raise exceptions.RaySystemError(
                                f"lost contact with the zray broker at {self.address}")
                        if deadline is None:
                            self.cond.wait(1.0)
                        else:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                late = len(left) if not need_all else sum(
                                    1 for r in missing if not done(r.id))
                                raise exceptions.GetTimeoutError(
                                    f"Get timed out: {late} of {len(refs)} objects "
                                    f"not ready after {timeout}s")
                            self.cond.wait(remaining)
                finally:
                    if watched is not None:
                        self._unwatch(watched)
                    if not need_all:
                        self._watch_any -= 1
        finally:
            if blocked:
                self._unblock()

    def _wait_result_lanes(self, results, missing, done, deadline) -> None:
        """(get) Our tasks' results pushed by executors here: read their lanes in this
        thread (zray/_resultlane.py); the I/O thread reads them for whatever is left."""
        records = self.records
        pushed = all((rec := records.get(r.id)) is not None
                     and (rec.state is AWAITING_PUSH or rec.state in _HERE) for r in missing)
        if pushed:  # (else not all come to us unasked: wait as usual)
            i, count = 0, len(missing)

            def all_done():
                nonlocal i
                while i < count and done(missing[i].id):
                    i += 1
                return i == count

            results.wait(all_done, deadline)
            if all_done():
                return
        results.need_io()

    def _unwatch(self, oid: bytes) -> None:
        """A waiter no longer waits for ``oid`` in particular (under ``cond``)."""
        n = self._watch.pop(oid, 1)
        if n > 1:
            self._watch[oid] = n - 1

    def _block(self) -> bool:
        """An executor's task is about to wait: lend its CPU (BLOCK). True if it did."""
        if self.kind != "executor" or not self.current_task_id:
            return False
        returned = self.on_block() if self.on_block is not None else []
        self.send(P.encode(P.Block(self.current_task_id, returned)))
        return True

    def _unblock(self) -> None:
        if self.on_unblock is not None:
            self.on_unblock()
        self.send(P.encode(P.Unblock(self.current_task_id)))

    def wait_for(self, ready: Callable[[], bool], timeout: Optional[float],
                 subscribe=()) -> bool:
        """Block until ``ready()`` (checked after each batch of messages) or ``timeout``;
        False on timeout. ``subscribe``: refs whose values we must ask the broker for."""
        if ready():
            return True
        self.flush_queued()
        self._subscribe(subscribe)
        if self.direct is not None and self.direct.lanes and subscribe:
            self.direct.need_io(self.direct.lanes_for([r.id for r in subscribe]))
        if self.results is not None:
            self.results.need_io()
        blocked = self._block()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self.cond:
                self._watch_any += 1
                try:
                    while not ready():
                        if self.broker_gone:
                            raise exceptions.RaySystemError(
                                f"lost contact with the zray broker at {self.address}")
                        if deadline is None:
                            self.cond.wait(1.0)
                            continue
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        self.cond.wait(remaining)
                    return True
                finally:
                    self._watch_any -= 1
        finally:
            if blocked:
                self._unblock()

    def get_values(self, refs, timeout: Optional[float]) -> list:
        self.wait_objects(refs, len(refs), timeout)
        out = []
        records = self.records
        for r in refs:
            kind, frames = records[r.id].value
            if frames is IN_STORE:
                kind, frames = self.read_local(r.id)
            if kind == P.ERROR:
                raise load_error(frames)
            out.append(deserialize(frames))
        return out

    def is_ready(self, oid: bytes) -> bool:
        """Ready here or in another node's store (what wait() reports)."""
        rec = self.records.get(oid)
        return rec is not None and rec.state in _READY

    def add_done_callback(self, ref, fut) -> None:
        def done():
            try:
                fut.set_result(self.get_values([ref], 0)[0])
            except BaseException as e:  # noqa: B036 - the future carries it
                fut.set_exception(e)

        with self._ref_lock:  # the I/O thread takes the callbacks under this lock
            rec = self.records.get(ref.id)
            waiting = rec is not None and rec.state not in _HERE
            if waiting:
                if rec.callbacks is None:
                    rec.callbacks = []
                rec.callbacks.append(done)
        if waiting:
            self._subscribe([ref])
            if self.direct is not None and self.direct.lanes:
                self.direct.need_io(self.direct.lanes_for([ref.id]))
            if self.results is not None:
                self.results.need_io()
        else:
            done()

    # ----------------------------------------------------------- streams
    def open_stream(self, task_id: bytes):
        with self._ref_lock:
            self._streams.setdefault(task_id, _Stream())

    def close_stream(self, task_id: bytes):
        """The generator is gone: drop the items that arrived and were never taken."""
        self.replay.finished(task_id, end=True)  # nobody reads it any more
        with self._ref_lock:
            stream = self._streams.pop(task_id, None)
            if stream is None:
                return
            records = self.records
            for i in range(1, stream.top + 1):
                oid = P.object_id(task_id, i)
                rec = records.get(oid)
                if rec is not None and rec.refcount == 0:
                    del records[oid]

    def stream_item_ready(self, task_id: bytes, index: int) -> bool:
        """Would taking item ``index`` of the stream return at once (the item is ready,
        or the stream ended before it)?"""
        rec = self.records.get(P.object_id(task_id, index))
        if rec is not None and rec.state in _READY:
            return True
        stream = self._streams.get(task_id)
        return stream is not None and stream.end is not None and index > stream.end

    def stream_end(self, task_id: bytes) -> Optional[int]:
        """The number of items of an open stream, once it ended; else None."""
        stream = self._streams.get(task_id)
        return None if stream is None else stream.end

    def next_stream_item(self, task_id: bytes, index: int, timeout) -> Optional[bytes]:
        oid = P.object_id(task_id, index)
        deadline = None if timeout is None else time.monotonic() + timeout
        records = self.records
        self.flush_queued()
        with self.cond:
            self._watch_any += 1  # (the item's record may not exist yet: any arrival)
            try:
                while True:
                    rec = records.get(oid)
                    if rec is not None and rec.state in _READY:
                        return oid
                    stream = self._streams.get(task_id)
                    end = stream.end if stream is not None else None
                    if end is not None and index > end:
                        return None
                    if self.broker_gone:
                        raise exceptions.RaySystemError(
                            f"lost contact with the zray broker at {self.address}")
                    if deadline is not None and time.monotonic() >= deadline:
                        raise exceptions.GetTimeoutError("stream item not ready")
                    self.cond.wait(1.0)
            finally:
                self._watch_any -= 1

    # ------------------------------------------------------------ requests
    def request_nowait(self, op: str, args=None) -> None:
        """Send a request whose answer nobody waits for (a refusal is logged)."""
        req_id = next(self._ids)
        self._unawaited.add(req_id)
        self.send(P.encode(P.Req(req_id, op, args)))

    def request(self, op: str, args=None, timeout: float = 30.0):
        req_id = next(self._ids)
        if op == "register_job":  # said again to a restarted broker
            self.replay.job = (op, args)
        header = P.encode(P.Req(req_id, op, args))
        self.replay.requests[req_id] = header  # asked again if the broker restarts meanwhile
        try:
            self.send(header)
            deadline = time.monotonic() + timeout
            with self.cond:
                while req_id not in self._replies:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise exceptions.GetTimeoutError(f"broker did not answer {op!r}")
                    self.cond.wait(remaining)
                ok, result = self._replies.pop(req_id)
        finally:
            self.replay.requests.pop(req_id, None)
        if not ok:
            raise ValueError(result)
        return result

    # ------------------------------------------------------------ shutdown
    def forked_away(self):
        """In a child that user code forked from this process: the sockets, the I/O
        thread and the locks are the parent's. Never touch them again."""
        self.forked = True
        self.closed = True
        self.results = self._result_out = None  # (the parent's lanes: a stream cut in two)
        self._send_lock = threading.Lock()
        self._ref_lock = threading.RLock()
        self.cond = threading.Condition(threading.Lock())

    def close(self):
        if self.closed:
            return
        for fn in self.on_close:  # e.g. an actor's direct-call sockets (workerd/direct.py)
            try:
                fn()
            except Exception:
                log.debug("close hook failed", exc_info=True)
        with self._send_lock:
            try:
                self._flush_refs_locked()
            except zmq.ZMQError:
                pass
        self.closed = True
        self.wake_io()  # (it may be in a poll of up to 500 ms)
        self._io.join(timeout=2)
        self._out.close(linger=500)
        self._inbox.close(linger=0)
        with self._send_lock:
            for sock in self._push.values():
                if sock is not None:
                    sock.close(0)
            self._push.clear()
        if self.direct is not None:
            self.direct.close()
        if self._result_out is not None:
            self._result_out.close()
        if self.results is not None:
            self.results.unlink()
            if not self._io.is_alive():
                self.results.close()  # (else the I/O thread may still poll it: left open)
        if self._direct is not None:
            self._direct.close(0)
            try:
                os.unlink(self._direct_path)
            except OSError:
                pass
        self._ctx.term()
        if not self._io.is_alive():  # (else it may still poll the pipe: left open)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
