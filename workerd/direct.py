"""Direct actor calls, the actor's side: callers send calls straight to this executor.

::

    caller --DCALL (PUSH)--> PULL ipc://<node store>/a-<cid> --zray-direct thread:
        decode (every field checked) --> ExecutorProcess queue --> ActorHost.handle, as an
        EXEC from the broker would be (same modes, groups, cancels, prepare)
    ResultSender.finish_values / finish_error --reply()--> DDONE + frames --PUSH--> the
        caller's PULL (reply_to); large values travel inline too (the caller owns them)
    caller --DCALL on a lane (zray/_lane.py)--> listener <node store>/f-<cid>: read by the
        same thread as the PULL (lanes first), the DDONE sent back on that lane by the
        thread that ran the call, never blocking (what the socket does not take waits
        for POLLOUT in that thread's poll: ``_watch_lanes``, ``_kick``); an async
        actor's lanes are read by its event loop, and the DDONEs of one turn of the
        loop go out in one send at the start of the next (``_loop_reply``)
    caller --DCANCEL--> ExecutorProcess._on_cancel, as the broker's INTERRUPT
    every DIRECT_STATS_S: REQ direct_stats {calls, failed} --> the broker's books

The address is announced to the broker (REQ actor_listen, sent before the
creation's DONE on the same socket), which tells callers (brokerd/routes.py).
Only this user's processes can connect: the store dir is private (0700); on a
tcp cluster the same PULL listens on tcp too, for callers on other hosts, CURVE
with the cluster key (zray/_xhost.py), and replies to such callers go to their
tcp reply_to the same way. A
message that does not decode, or is not a DCALL/DCANCEL, is dropped and
counted (``dropped``), never fatal; a lane whose framing is broken is closed
(its caller sees EOF), the others go on. Arguments are unpickled by the actor's
code path as for broker-sent calls (executors run user code anyway).

A result holding refs: those refs are escaped (REFS 0, "keep for good") before
the reply goes, since the broker never sees this call's DONE to learn of them.
``ZRAY_DIRECT_ACTOR_CALLS=0`` (read by zray/_direct.py) turns all this off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING

import zmq

from zray import _direct, _lane, _xhost
from zray import _protocol as P
from zray._protocol import Msg
from zray._serialization import serialize
from zray._transport import NOBLOCK, recv_parts, send_parts
from zray.actor import ActorExit

MAX_EVENTS = 5000  # task events per report (about a second of calls)
_running_loop = asyncio._get_running_loop  # (C: the loop running in this thread, or None)

if TYPE_CHECKING:
    from workerd.actors import ActorHost
    from workerd.executor import ExecutorProcess

log = logging.getLogger("zray.executor")
DIRECT_STATS_S = 1.0


def start(proc: ExecutorProcess, host: ActorHost):
    """Listen for direct calls to the actor ``host`` (after its constructor returned) and
    tell the broker where; None when direct calls are off or cannot be had here."""
    client = proc.client
    if not _direct.ENABLED or client.store is None:
        return None
    try:
        server = DirectServer(proc, host, ordered=host.mode.value == "sync" and not host.groups)
    except (OSError, zmq.ZMQError):
        log.warning("no direct calls for this actor: calls go through the broker", exc_info=True)
        return None
    where = {"address": server.address, "host": server.host, "ordered": server.ordered}
    if server.tcp_address:
        where["tcp_address"] = server.tcp_address
    client.request_nowait("actor_listen", where)
    return server



def inline_values(client, values: list, recipient: bytes) -> tuple:
    """(layout, frames, handed) of a reply that carries a call's ``values`` inline (a
    direct actor call's, a leased task's) to the client ``recipient``. The refs inside
    them are handed to it (REFS 2, sent now, before the reply): the broker keeps each
    object until the recipient says it holds it (REFS 3) or leaves."""
    layout, frames, handed = [], [], []
    for v in values:
        f, n = serialize(v)
        if n:
            n = list(dict.fromkeys(n))
        handed.append(n)
        layout.append([P.VALUE, len(f)])
        frames.extend(f)
    if any(handed):
        client.hand_off([oid for n in handed for oid in n], recipient)
        with client._send_lock:  # now, not with our next message to the broker
            client._flush_refs_locked()
    else:
        handed = []
    return layout, frames, handed


class DirectServer:
    def __init__(self, proc: ExecutorProcess, host: ActorHost, ordered: bool):
        self.proc = proc
        self.host_actor = host
        self.client = client = proc.client
        self.ordered = ordered
        self.host = _xhost.host_id()
        self.path = os.path.join(client.store.dir, f"a-{client.cid.hex()}")
        ctx = client._ctx
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 0)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind("ipc://" + self.path)
        self.pull = pull
        self.address = "ipc://" + self.path
        self.tcp_address = ""  # callers on other hosts (a tcp cluster): zray/_xhost.py
        if client.address.startswith("tcp://"):
            try:
                self.tcp_address = _xhost.listen_tcp(ctx, pull, client.address)
            except (OSError, zmq.ZMQError):
                log.warning("no direct calls from other hosts: their calls go through the "
                            "broker", exc_info=True)
        self.calls: dict = {}  # task id -> the caller's reply_to, until answered
        self.lock = threading.Lock()  # the PUSH sockets: any thread replies
        self.push: dict = {}  # reply_to -> PUSH socket
        self.ran = self.failed = 0  # since the last report to the broker
        # [task id, name, start, end, failed] of the calls answered since the last report
        # (the state API's task rows), at most MAX_EVENTS; beyond that only counted
        self.started: dict = {}  # task id -> (name, wall-clock start)
        self.events: list = []
        self.events_dropped = 0
        self.last_report = time.monotonic()
        self.dropped = 0
        self._drop_logged: set = set()
        self.closed = False
        # Lanes (zray/_lane.py): callers on this host connect to a Unix socket next to
        # the PULL and get their replies on the same connection, sent by the thread that
        # ran the call. fd -> Lane.
        self.lanes: dict = {}
        self.listener = None
        try:
            self.listener = _lane.listen(_lane.lane_path(self.address))
        except OSError:
            log.warning("no lane for direct calls: they come through ZeroMQ", exc_info=True)
        self._poller = None
        self._polled: dict = {}  # fd -> the events the poller has it for
        # An async actor's lanes are read by its event loop (add_reader): a call starts
        # on the thread it runs on, with no hop through this thread. fd -> Lane.
        self.loop = host.loop if host.mode.value == "async" and not host.groups else None
        self.loop_lanes: dict = {}
        self._loop_flushing: set = set()  # loop lanes whose queued replies go next turn
        if ordered:
            # A plain actor runs every call on the main thread: it reads this socket
            # itself (one thread hop less per call), woken for the broker's EXECs too.
            self.wake_in = ctx.socket(zmq.PULL)
            self.wake_in.bind(f"inproc://zray-direct-wake-{id(self)}")
            self.wake_out = ctx.socket(zmq.PUSH)
            self.wake_out.setsockopt(zmq.SNDHWM, 0)
            self.wake_out.connect(f"inproc://zray-direct-wake-{id(self)}")
            self.wake_lock = threading.Lock()
            self.queue = proc.queue
            self.ready: list = []  # calls read from the socket, not yet run
            proc.queue = _WakingQueue(self.queue, self)
            proc.next_item = self.next_item
            client.on_close.append(self.close)
        else:
            # Threaded and async actors: calls start from the receiving thread (the
            # pool / event loop takes them from there: no hop through the main thread).
            self._kick_r, self._kick_w = os.pipe()  # a reply left bytes for POLLOUT
            os.set_blocking(self._kick_r, False)
            os.set_blocking(self._kick_w, False)
            threading.Thread(target=self._loop, name="zray-direct", daemon=True).start()

    # -------------------------------------------------- a plain actor: main thread
    def next_item(self):
        """The main thread's next (msg, frames): a broker EXEC or a direct call."""
        q, ready = self.queue, self.ready
        if self._poller is None:
            self._poller = zmq.Poller()
            self._poller.register(self.pull, zmq.POLLIN)
            self._poller.register(self.wake_in, zmq.POLLIN)
            if self.listener is not None:
                self._poller.register(self.listener.fileno(), zmq.POLLIN)
        poller = self._poller
        while True:
            if ready:
                return ready.pop(0)
            try:
                return q.get_nowait()
            except queue.Empty:
                pass
            if self.closed:
                return q.get()
            now = time.monotonic()
            if now - self.last_report >= DIRECT_STATS_S:
                self._report(now)
            self._watch_lanes(poller)
            try:
                events = dict(poller.poll(int(DIRECT_STATS_S * 1000)))
            except zmq.ZMQError:
                log.exception("direct calls: poll failed")
                return q.get()
            if self.wake_in in events:
                while True:
                    try:
                        self.wake_in.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            # Lanes before the PULL, every lane when the PULL has calls: a caller's call
            # on its lane was in our socket before its next call took the PULL.
            if self.pull in events:
                for fd in self.lanes:
                    events.setdefault(fd, zmq.POLLIN)
            if len(events) > (self.wake_in in events) + (self.pull in events):
                self._lane_events(events, self._ready_call, self.proc._on_cancel)
            if self.pull in events:
                while True:
                    try:
                        parts = recv_parts(self.pull)
                    except zmq.Again:
                        break
                    self._handle(parts, self._ready_call, self.proc._on_cancel)

    # ------------------------------------------------------------- lanes
    def _watch_lanes(self, poller) -> None:
        """Poll each lane for its calls, and for POLLOUT while a reply waits to go."""
        polled = self._polled
        for fd, lane in self.lanes.items():
            want = zmq.POLLIN | (zmq.POLLOUT if lane.outq else 0)
            if polled.get(fd) != want:
                poller.register(fd, want)  # (registers, or modifies)
                polled[fd] = want

    def _lane_events(self, events: dict, start, on_cancel) -> None:
        listener = self.listener
        if listener is not None and listener.fileno() in events:
            while True:
                try:
                    sock, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    log.warning("direct calls: accept failed", exc_info=True)
                    break
                sock.setblocking(False)
                lane = _lane.Lane(sock)
                if self.loop is not None:
                    self.loop.call_soon_threadsafe(self._loop_attach, lane)
                    continue
                self.lanes[lane.fd] = lane
                events[lane.fd] = zmq.POLLIN  # read now: its first call may be in already
        for fd, ev in events.items():
            lane = self.lanes.get(fd) if type(fd) is int else None
            if lane is None:
                continue
            try:
                if ev & zmq.POLLOUT:
                    lane.flush()
                if ev & (zmq.POLLIN | zmq.POLLERR):
                    for parts in lane.read():
                        self._handle(parts, start, on_cancel, lane)
            except _lane.LaneClosed as e:
                self._drop_lane(lane, str(e))

    def _drop_lane(self, lane, why: str) -> None:
        """A caller went away (or sent garbage): its calls still running answer nobody."""
        if "closed the lane" not in why:
            self._drop(f"lane: {why}")
        self.lanes.pop(lane.fd, None)
        if self._polled.pop(lane.fd, None) is not None and self._poller is not None:
            self._poller.unregister(lane.fd)
        lane.close()

    # ------------------------------------------- an async actor's lanes: its loop
    def _loop_attach(self, lane) -> None:
        self.loop_lanes[lane.fd] = lane
        self.loop.add_reader(lane.fd, self._loop_read, lane)

    def _loop_read(self, lane) -> None:
        try:
            for parts in lane.read():
                self._handle(parts, self._start_call, self.proc._on_cancel, lane)
        except _lane.LaneClosed as e:
            self._loop_detach(lane, str(e))

    def _loop_want_write(self, lane) -> None:
        if lane.outq and self.loop_lanes.get(lane.fd) is lane:
            self.loop.add_writer(lane.fd, self._loop_write, lane)

    def _loop_write(self, lane) -> None:
        try:
            if lane.flush():
                self.loop.remove_writer(lane.fd)
        except _lane.LaneClosed as e:
            self._loop_detach(lane, str(e))

    def _loop_reply(self, lane, header: bytes, frames) -> None:
        """(the loop's thread) Queue a reply on ``lane``; the replies of one turn of the loop
        go out together at the start of the next (one send, one wake-up of the caller,
        for a burst of calls finishing together)."""
        lane.send(header, frames, later=True)
        if lane not in self._loop_flushing:
            self._loop_flushing.add(lane)
            self.loop.call_soon(self._loop_flush, lane)

    def _loop_flush(self, lane) -> None:
        self._loop_flushing.discard(lane)
        try:
            if not lane.flush():
                self._loop_want_write(lane)
        except _lane.LaneClosed as e:
            self._loop_detach(lane, str(e))

    def _loop_detach(self, lane, why: str) -> None:
        if "closed the lane" not in why:
            self._drop(f"lane: {why}")
        if self.loop_lanes.pop(lane.fd, None) is lane:
            self.loop.remove_reader(lane.fd)
            self.loop.remove_writer(lane.fd)
        lane.close()

    def _kick(self) -> None:
        """A reply left bytes behind (the caller reads slowly): have them flushed."""
        if self.ordered:
            self.wake()
        else:
            try:
                os.write(self._kick_w, b"k")
            except OSError:
                pass

    def _ready_call(self, msg, frames) -> None:
        self.ready.append((msg, frames))

    def wake(self) -> None:
        with self.wake_lock:
            if not self.closed:
                self.wake_out.send(b"", zmq.NOBLOCK)

    def close(self) -> None:
        """Client.close(): its context waits for these sockets."""
        if self.closed:
            return
        self.closed = True
        with self.wake_lock:
            self.wake_out.close(0)
        self.wake_in.close(0)
        self.pull.close(0)
        self._close_lanes()
        with self.lock:
            for sock in self.push.values():
                sock.close(0)
            self.push.clear()

    def _close_lanes(self) -> None:
        for lane in list(self.lanes.values()) + list(self.loop_lanes.values()):
            lane.close()
        self.lanes.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(_lane.lane_path(self.address))
            except OSError:
                pass

    # ------------------------------------------ threaded / async: a thread of its own
    def _loop(self) -> None:
        pull = self.pull
        poller = self._poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(self._kick_r, zmq.POLLIN)
        if self.listener is not None:
            poller.register(self.listener.fileno(), zmq.POLLIN)
        proc = self.proc
        while not self.client.closed:
            try:
                self._watch_lanes(poller)
                events = dict(poller.poll(int(DIRECT_STATS_S * 1000)))
                if events:
                    if self._kick_r in events:
                        try:
                            os.read(self._kick_r, 4096)
                        except OSError:
                            pass
                    self._lane_events(events, self._start_call, proc._on_cancel)
                    if pull in events:
                        while True:
                            try:
                                parts = recv_parts(pull)
                            except zmq.Again:
                                break
                            self._handle(parts, self._start_call, proc._on_cancel)
                now = time.monotonic()
                if now - self.last_report >= DIRECT_STATS_S:
                    self._report(now)
            except zmq.ContextTerminated:  # Client.close(): its context waits for our sockets
                break
            except Exception:
                if self.client.closed:
                    break
                log.exception("direct call thread error")
        pull.close(0)
        self._close_lanes()  # (the kick pipe stays open: a reply may still kick it)
        with self.lock:
            for sock in self.push.values():
                sock.close(0)
            self.push.clear()

    def _start_call(self, msg, frames) -> None:
        """Start a call of a threaded or async actor (what the main thread would do)."""
        proc = self.proc
        try:
            self.host_actor.handle(msg, frames)
        except ActorExit:
            proc.exit_actor()
        except SystemExit as e:
            proc.system_exit(e)

    def _handle(self, parts: list, start, on_cancel, lane=None) -> None:
        try:
            m = P.decode(P.buffer_of(parts[0]))
        except P.ProtocolError as e:
            self._drop(str(e))
            return
        if m.TYPE == Msg.DCALL:
            if m.n_args != len(parts) - 1 or m.spec.actor_id != self.client.current_actor_id:
                self._drop("DCALL: frames or actor id do not match")
                return
            if m.spec.task_id in self.calls:
                self._drop("DCALL: a call already running here")
                return
            # the reply goes back on the lane the call came on, else to reply_to
            self.calls[m.spec.task_id] = lane if lane is not None else m.reply_to
            self.started[m.spec.task_id] = (m.spec.name, time.time())
            start(P.Exec(m.spec, False, m.n_args, [], []), parts[1:])
        elif m.TYPE == Msg.DCANCEL:
            if m.task_id in self.calls:
                on_cancel(m.task_id, m.force)
        else:
            self._drop(f"{m.TYPE.name} is not a direct call")

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if why not in self._drop_logged and len(self._drop_logged) < 100:
            self._drop_logged.add(why)
            log.warning("dropping a bad direct call: %s (dropped so far: %d)", why, self.dropped)

    def _report(self, now: float) -> None:
        self.last_report = now
        ran, failed = self.ran, self.failed
        if ran:
            self.ran -= ran
            self.failed -= failed
            events, self.events = self.events, []
            dropped, self.events_dropped = self.events_dropped, 0
            self.client.request_nowait("direct_stats", {"calls": ran, "failed": failed,
                                                        "events": events,
                                                        "dropped": dropped})


    # --------------------------------------------------------- replying
    def owns(self, task_id: bytes) -> bool:
        return task_id in self.calls

    def _lane_send(self, lane, header: bytes, frames) -> bool:
        """Send on a caller's lane from any thread, never blocking (what the socket does
        not take now is sent by the loop or the direct thread); False if it closed."""
        try:
            if self.loop is not None and _running_loop() is self.loop and \
                    self.loop_lanes.get(lane.fd) is lane:
                self._loop_reply(lane, header, frames)
            elif not lane.send(header, frames):
                if self.loop_lanes.get(lane.fd) is lane:
                    self.loop.call_soon_threadsafe(self._loop_want_write, lane)
                else:
                    self._kick()
        except _lane.LaneClosed:
            return False  # the caller is gone
        return True

    def log_on_lane(self, task_id: bytes, header: bytes) -> bool:
        """(LogForwarder) A LOG for the caller of direct call ``task_id`` on the lane the
        call came on, ahead of its DDONE: a line printed before the call returned reaches
        the caller before its result (on another socket it could come after, or not at
        all once a driver exited on that result). False: not a call on a lane."""
        lane = self.calls.get(task_id)
        if lane is None or type(lane) is str:
            return False
        return self._lane_send(lane, header, ())

    def finish_values(self, spec: P.TaskSpec, values: list) -> None:
        """Reply with the call's values (ResultSender.finish_values for a direct call)."""
        if spec.task_id not in self.calls:
            return  # (answered already: nothing to hand over)
        layout, frames, handed = inline_values(self.client, values, spec.owner)
        self.reply(spec.task_id, layout, frames, False, handed=handed)

    def reply(self, task_id: bytes, layout: list, frames: list, retryable: bool,
              text: str = "", handed: list = ()) -> None:
        """The call's DDONE to its caller. (``text``, an error's text, is what a leased
        task's books report, workerd/lease.py; a direct call's event says "the method
        raised", brokerd/routes.py.)"""
        reply_to = self.calls.pop(task_id, None)
        if reply_to is None:
            return
        self.ran += 1
        failed = bool(layout) and layout[0][0] == P.ERROR
        if failed:
            self.failed += 1
        started = self.started.pop(task_id, None)
        if started is not None:
            if len(self.events) < MAX_EVENTS:
                self.events.append([task_id, started[0], started[1], time.time(), failed])
            else:
                self.events_dropped += 1
        header = P.encode(P.DDone(task_id, layout, retryable, list(handed)))
        if type(reply_to) is not str:  # a lane: sent from this thread, never blocking
            self._lane_send(reply_to, header, frames)
            return
        with self.lock:
            sock = self.push.get(reply_to)
            if sock is None:
                if len(self.push) >= 256:  # forget the oldest callers
                    for old in list(self.push)[:64]:
                        self.push.pop(old).close(0)
                sock = self.client._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.SNDHWM, 0)
                sock.setsockopt(zmq.LINGER, 1000)
                _xhost.connect(sock, reply_to)
                self.push[reply_to] = sock
            send_parts(sock, header, None, frames, NOBLOCK)


class _WakingQueue:
    """The executor's queue for a plain actor whose main thread waits on sockets: a put
    wakes it (the client's I/O thread puts the broker's EXECs here)."""

    def __init__(self, q, server: DirectServer):
        self.q = q
        self.server = server
        self.get = q.get
        self.get_nowait = q.get_nowait

    def put(self, item) -> None:
        self.q.put(item)
        self.server.wake()
