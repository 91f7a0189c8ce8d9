"""The zray broker: one ROUTER socket, one thread, all cluster state.

::

    drivers / executors (out)   --SUBMIT/PUT/SUB/REFS/DONE-->  +--------+   decode + role check
    drivers / executors (inbox) <--OBJ/REPLY/PRINT/EXEC------  | ROUTER | --------------------> handler
    node agents                 <--SPAWN/KILL_EXEC/FETCH---->  +--------+                         |
                                                                   ^                              v
                                                                Outbox <--- sends --- TaskEngine (tasks, executors,
                                                                                        clients; transitions)
                                                                                        NodeTable, Placement,
                                                                                        ObjectDirectory,
                                                                                        ActorDirectory

A turn of the loop drains every queued message (up to 20,000), each decoded
and checked by ``zray._protocol.decode`` and dispatched by (role of the
sending socket, message type): a message that does not decode or comes from a
socket whose role may not send it is dropped, counted and logged once per
kind. Then, if anything was queued or freed, one scheduling pass places ready
tasks. Once a second, liveness: silent nodes are dead, idle executors beyond
one per CPU are let go.

Module map (each module's docstring says what it owns):
  * ``engine.py``      TaskEngine: tasks, executors, clients; every state change.
  * ``transitions.py`` the legal moves and the bounded event log.
  * ``nodes.py``       NodeTable: nodes, free resources, GPU slots, executor pools.
  * ``placement.py``   Placement: ready queues by shape; scheduling decisions.
  * ``objects.py``     ObjectDirectory: values, locations, transfers, ref counts.
  * ``actors.py``      ActorDirectory: actors, names, call queues, restarts.
  * ``queries.py``     REQ answers for the API and CLI.
  * ``outbox.py``      the one way out.
  * ``state.py``       rows for the state API (zray list/get/summary).
  * ``fdwatch.py``     the descriptor limit, raised at start; running out is loud.
  * ``durable.py``     the durable tables (SQLite under ``--state-dir``).
  * ``restart.py``     Recovery: what survives a broker restart, and the reconnects.
  * ``gctime.py``      the garbage collector's settings and the time it takes.

This module owns the socket, the loop, the dispatch table and the bad-message
counters. See ``zray._protocol`` for the frames.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import zmq

from brokerd import relineage
from brokerd.durable import DurableStore
from brokerd.engine import TaskEngine
from brokerd.fdwatch import FdWatch, raise_nofile_limit
from brokerd.gctime import GcClock, tune
from brokerd.outbox import Outbox
from brokerd.queries import Queries
from brokerd.restart import Recovery
from zray import _protocol as P
from zray._procutil import signal_wakeup_fd
from zray._protocol import Msg
from zray._security import ServerAuth, create_key_file, needs_curve
from zray._transport import poll_in, recv_parts

log = logging.getLogger("zray.broker")
# How often silent nodes and drivers are looked for: a dead node is noticed at most
# this long after NODE_TIMEOUT_S of silence.
LIVENESS_CHECK_S = min(0.25, P.HEARTBEAT_S)
# A driver whose connection closed has this long to show it lives (Broker._disconnects)
DRIVER_GONE_S = 3.0

# A heartbeat is answered at most this often per peer (coalesced): a node re-registers
# after 3 * NODE_TIMEOUT_S without word from the broker and a client gives it up after
# BROKER_TIMEOUT_S, so this leaves each at least three answers in that time, and an
# idle cluster of 250 nodes costs the broker 50 sends a second instead of 250.
HEARTBEAT_REPLY_S = min(5.0, P.NODE_TIMEOUT_S, P.BROKER_TIMEOUT_S / 3)
_HEARTBEAT = P.encode(P.Heartbeat())

DRAIN_MAX = 20000  # messages handled per turn before scheduling runs


class Broker:
    def __init__(self, address: str, session_dir: str = "", state_dir: str = ""):
        self.address = address
        self.session_dir = session_dir
        raise_nofile_limit()  # thousands of clients, two connections each
        # This incarnation: clients and nodes that see it change replay their state.
        self.epoch = os.urandom(8).hex()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Anything bigger is dropped by libzmq before it costs us memory (see the limits
        # in zray._protocol).
        self.sock.setsockopt(zmq.MAXMSGSIZE, int(os.environ.get("ZRAY_MAX_MSG_BYTES",
                                                                 P.MAX_MESSAGE_BYTES)))
        self.auth = None
        if needs_curve(address):
            self.auth = ServerAuth(self.ctx, self.sock, create_key_file())
        if address.startswith("tcp://") and address.rsplit(":", 1)[1] in ("0", "*"):
            port = self.sock.bind_to_random_port(address.rsplit(":", 1)[0])
            self.address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            self.sock.bind(address)
        self.out = Outbox(self.sock)
        self.engine = TaskEngine(self.out)
        self.queries = Queries(self.engine, self.address, time.time(), self.stats)
        self.queries.session_dir = session_dir
        self.fdwatch = FdWatch(self.sock)  # running out of descriptors is loud (fdwatch.py)
        self.recovery = None
        if state_dir:  # durable tables: the cluster survives a restart (brokerd/restart.py)
            self.recovery = Recovery(self.engine, DurableStore(state_dir))
            self.engine.recovery = self.engine.actors.recovery = self.recovery
            self.recovery.restore()
        self.running = True
        self.wake_fd = None  # signal_wakeup_fd() once serve() runs
        self.fd_driver: dict = {}  # fd of a driver's inbox connection -> its cid
        self.header = None  # the header frame of the message being handled
        self.dropped = 0  # messages dropped as malformed or sent by the wrong role
        self.drop_reasons: set = set()  # each kind of bad message is logged once
        self.hb_replied: dict = {}  # identity -> when we last answered its heartbeat
        self.gc_clock = GcClock().start()  # time in the cyclic collector (brokerd/gctime.py)
        e = self.engine
        node, out, inbox = P.ROLE_NODE, P.ROLE_OUT, P.ROLE_INBOX
        # (role of the sending socket, message type) -> handler(peer id, message, frames).
        # A message that arrives on any other socket role is dropped.
        self.handlers = {
            (inbox, Msg.HELLO): self.on_hello,
            (inbox, Msg.HEARTBEAT): self.on_client_heartbeat,
            (out, Msg.READY): lambda cid, m, f: e.executor_ready(cid),
            (out, Msg.FN): self.on_fn,
            (out, Msg.SUBMIT): self.on_submit,
            (out, Msg.PUT): e.put,
            (out, Msg.SUB): lambda cid, m, f: e.access.subscribe(cid, m.oids),
            (out, Msg.RELEASE): lambda cid, m, f: e.objects.refs(cid, [(o, -1) for o in m.oids]),
            (out, Msg.REFS): lambda cid, m, f: e.access.refs(cid, m.ops),
            (out, Msg.CANCEL): lambda cid, m, f: e.cancel(P.task_of(m.oid), m.force, m.recursive),
            (out, Msg.BLOCK): lambda cid, m, f: e.block(cid, m),
            (out, Msg.UNBLOCK): lambda cid, m, f: e.unblock(cid, m),
            (out, Msg.REJECT): lambda cid, m, f: e.reject(cid, m),
            (out, Msg.DONE): e.done,
            (out, Msg.YIELD): e.stream_item,
            (out, Msg.LOG): lambda cid, m, f: e.forward_log(m),
            (out, Msg.REQ): self.on_req,
            (out, Msg.EXIT): lambda cid, m, f: e.client_left(cid),
            (node, Msg.NODE_HELLO): self.on_node_hello,
            (node, Msg.HEARTBEAT): self.on_node_heartbeat,
            (node, Msg.EXEC_SPAWNED): lambda nid, m, f: e.executor_spawned(nid, m.cid, m.token),
            (node, Msg.LOG_DATA): lambda nid, m, f: self.queries.log_data(nid, m),
            (node, Msg.EXEC_DIED): lambda nid, m, f: e.exec_died(nid, m.cid, m.code),
            (node, Msg.BLOB): e.objects.blob,
            (node, Msg.STORED): lambda nid, m, f: e.objects.stored(nid, m),
            (out, Msg.NEED_SPACE): lambda cid, m, f: e.objects.need_space(cid, m.nbytes),
            (node, Msg.PULL_FAILED): lambda nid, m, f: e.objects.pull_failed(nid, m),
            (out, Msg.BATCH): self.on_batch,
            (out, Msg.LINEAGE): lambda cid, m, f: relineage.adopt(e, cid, m, f),
        }

    # ------------------------------------------------------------------ loop
    def serve(self):
        sock = self.sock
        handlers = self.handlers
        engine = self.engine
        placement, nodes, moves = engine.placement, engine.nodes, engine.moves
        clients = engine.clients
        decode, role_of = P.decode, P.role_of
        last_check = time.monotonic()
        log.info("broker listening on %s (pid %d)", self.address, os.getpid())
        self.wake_fd = signal_wakeup_fd()  # (a SIGTERM ends the poll: see stop)
        poll = poll_in(sock, self.wake_fd)  # (zmq_poll, without zmq.Poller's per-call work)
        Again = zmq.Again  # one zmq.Again ends each drain
        roles: dict = {}  # identity -> (role, peer id): role_of once per peer
        idle_wait = int(LIVENESS_CHECK_S * 1000)
        # A long-lived server whose tables hold few cycles: start-up objects out of the
        # collector's way, the young generation collected less often (brokerd/gctime.py).
        # Here, not in run(): `zray broker` (zray/cli.py) calls serve() itself.
        tune()
        while self.running:
            ready = poll(50 if placement.queues else idle_wait)
            # The event log's clock: one reading per turn, taken after the wait, so that
            # what this turn handles is not stamped up to a second early.
            moves.now = time.time()
            if ready:
                for _ in range(DRAIN_MAX):
                    try:
                        msg = recv_parts(sock)
                    except Again:
                        break
                    if len(msg) < 2:
                        self.drop(msg[0].bytes, "a message without a header frame")
                        continue
                    ident = msg[0].bytes
                    rp = roles.get(ident)
                    if rp is None:
                        if len(roles) > 100_000:  # peers come and go: start over
                            roles.clear()
                        rp = roles[ident] = role_of(ident)
                    role, peer = rp
                    try:
                        m = decode(msg[1].buffer)
                    except P.VersionMismatch as e:  # say so: the peer cannot guess
                        self.refuse(ident, e)
                        continue
                    except P.ProtocolError as e:
                        self.drop(ident, str(e))
                        continue
                    handler = handlers.get((role, m.TYPE))
                    if handler is None:
                        self.drop(ident, f"{m.TYPE.name} is not allowed from a {role} socket")
                        continue
                    if role == P.ROLE_OUT and peer not in clients:
                        # Nothing from a peer that has not said HELLO is kept.
                        self.drop(ident, f"{m.TYPE.name} before HELLO")
                        continue
                    self.header = msg[1]
                    try:
                        handler(peer, m, msg[2:])
                    except P.ProtocolError as e:
                        self.drop(ident, str(e))
                    except Exception:
                        log.exception("error handling %s", m.TYPE.name)
            if engine.objects.released_actors:
                engine.release_actors()
            if placement.dirty or (nodes.freed and (placement.queues or engine.pgroups.pending)) or (
                    placement.queues and time.monotonic() >= placement.retry_at):  # (safety net)
                try:
                    engine.schedule()
                except Exception:  # a bug here must not take the cluster down
                    log.exception("scheduling pass failed")
            self.out.flush()  # a turn's messages for a client go out as one
            for ident in self.out.take_unreachable():
                role, peer = role_of(ident)
                if role == P.ROLE_INBOX:
                    engine.executor_unreachable(peer)
            now = time.monotonic()
            if now - last_check >= LIVENESS_CHECK_S:
                last_check = now
                if self.fdwatch.closed_fds:
                    self._disconnects(now)
                engine.check_liveness(now)
                self.out.flush()
        self.shutdown()

    # ------------------------------------------------- drivers that vanish
    def _note_fd(self, cid: bytes) -> None:
        """(a driver's HELLO or heartbeat, on its inbox connection) Which connection is
        its: when that one closes, the broker hears of it (``_disconnects``)."""
        c = self.engine.clients.get(cid)
        if c is None or c.kind != "driver":
            return
        try:
            fd = self.header.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, TypeError):
            return
        if type(fd) is int and fd >= 0:
            if len(self.fd_driver) > 100_000:
                self.fd_driver.clear()
            self.fd_driver[fd] = cid

    def _disconnects(self, now: float) -> None:
        """Connections closed (libzmq's monitor, read by FdWatch's thread): if one was a
        driver's, that driver is given DRIVER_GONE_S to show it lives (a live one
        reconnects and its heartbeat, every second, says so); a killed driver's job ends
        then, not DRIVER_TIMEOUT_S (60 s) later: its actors, its tasks and the CPUs they
        hold. An fd is reused, so this only ever shortens the wait for a heartbeat, never
        ends a job itself."""
        closed = self.fdwatch.closed_fds
        clients, fd_driver = self.engine.clients, self.fd_driver
        while closed:
            cid = fd_driver.pop(closed.popleft(), None)
            c = clients.get(cid) if cid is not None else None
            if c is not None and c.kind == "driver":
                c.last_seen = min(c.last_seen, now - P.DRIVER_TIMEOUT_S + DRIVER_GONE_S)

    def stop(self, *_):
        self.running = False  # (the byte in wake_fd stays: the poll retried returns at once)

    def shutdown(self):
        # With durable state a stop is a restart to come: nodes and drivers wait for it.
        for node in list(self.engine.nodes.nodes.values()) if self.recovery is None else ():
            self.out.send(node.ident, P.encode(P.Shutdown()))
        for cid in list(self.engine.clients) if self.recovery is None else ():
            self.out.send(P.inbox_ident(cid), P.encode(P.Shutdown()))
        self.out.flush()
        self.sock.close(linger=200)  # linger: the SHUTDOWN frames still leave
        if self.recovery is not None:
            self.recovery.store.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.gc_clock.stop()
        log.info("broker stopped: %s", self.gc_clock.report())

    def drop(self, ident: bytes, why: str):
        """A bad message: count it; log each kind once (a flood must not fill the disk)."""
        self.dropped += 1
        kind = why.split(":")[0][:60]
        if kind not in self.drop_reasons and len(self.drop_reasons) < 1000:
            self.drop_reasons.add(kind)
            log.warning("dropping a bad message from %r: %s (dropped so far: %d)",
                        ident[:16], why, self.dropped)

    def refuse(self, ident: bytes, e: P.VersionMismatch):
        self.out.send(ident, P.encode(P.Welcome({"error": (
            f"it speaks zray protocol version {e.peer_version!r}, the broker speaks "
            f"{P.VERSION}: install the same zray version everywhere")})))
        self.drop(ident, str(e))

    def stats(self) -> dict:
        return {"dropped_messages": self.dropped, "sent_messages": self.out.sent,
                "refused_refs": self.engine.access.refused, **self.fdwatch.report(),
                "direct_pulls": self.engine.objects.direct_pulls,
                "pull_fallbacks": self.engine.objects.pull_fallbacks,
                "relayed_blob_bytes": self.engine.objects.relayed_bytes,
                **self.gc_clock.report()}

    # -------------------------------------------------------------- handlers
    def on_hello(self, cid, m: P.Hello, frames):
        info = self.engine.client_joined(cid, m)
        if "error" in info:
            self.drop(P.inbox_ident(cid), f"HELLO refused: {info['error']}")
        else:
            self._note_fd(cid)
            info.update(session_dir=self.session_dir, address=self.address, epoch=self.epoch,
                        nodes=list(self.engine.nodes.nodes))  # (stores a client may name)
        self.out.send(P.inbox_ident(cid), P.encode(P.Welcome(info)))
        self.out.flush()  # the handshake reads one plain WELCOME, never a BATCH

    def on_client_heartbeat(self, cid, m, frames):
        if self.engine.client_seen(cid):
            self.answer_heartbeat(P.inbox_ident(cid))
            self._note_fd(cid)
        else:  # not known here (this broker restarted): it must say HELLO again
            self.out.send(P.inbox_ident(cid), P.encode(P.Welcome({"rehello": self.epoch})))

    def on_node_hello(self, node_id, m: P.NodeHello, frames):
        if m.node_id != node_id:
            raise P.ProtocolError("NODE_HELLO: node id differs from the socket's identity")
        self.engine.node_joined(node_id, m.info)
        self.out.send(P.node_ident(node_id), P.encode(P.Welcome({"address": self.address,
                                                                   "epoch": self.epoch})))

    def on_node_heartbeat(self, node_id, m, frames):
        if self.engine.nodes.seen(node_id):
            self.answer_heartbeat(P.node_ident(node_id))
        else:  # not known (or reconnecting) here: it must say NODE_HELLO again
            self.out.send(P.node_ident(node_id), P.encode(P.Welcome({"rehello": self.epoch})))

    def answer_heartbeat(self, ident: bytes) -> None:
        """Answer a peer's heartbeat if we last did HEARTBEAT_REPLY_S ago or more."""
        now = time.monotonic()
        replied = self.hb_replied
        if now - replied.get(ident, 0.0) >= HEARTBEAT_REPLY_S:
            if len(replied) > 100_000:  # peers come and go: start over
                replied.clear()
            replied[ident] = now
            self.out.send(ident, _HEARTBEAT)

    def on_batch(self, cid, m: P.Batch, frames):
        """C->B BATCH: a client's messages of one burst (its SUBMITs), each handled in
        order as if it had come alone: one that does not decode, may not come from an out
        socket or is itself a BATCH is dropped and counted; the others are still handled."""
        handlers, decode, buffer_of = self.handlers, P.decode, P.buffer_of
        for parts in P.batch_messages(m, frames):
            header = parts[0]
            try:
                inner = decode(buffer_of(header))
                handler = handlers.get((P.ROLE_OUT, inner.TYPE))
                if handler is None or inner.TYPE == Msg.BATCH:
                    raise P.ProtocolError(f"{inner.TYPE.name} is not allowed in a client's BATCH")
                self.header = header
                handler(cid, inner, parts[1:])
            except P.ProtocolError as e:  # (a VersionMismatch too: HELLO is not allowed here)
                self.drop(P.out_ident(cid), f"{e} (in a BATCH)")
            except Exception:
                log.exception("error handling a message in a BATCH")

    def on_submit(self, cid, m: P.Submit, frames):
        self.engine.submit(cid, m, frames, P.submit_spec_bytes(P.buffer_of(self.header)))

    def on_fn(self, cid, m: P.Fn, frames):
        if len(frames) != 1:
            raise P.ProtocolError("FN carries exactly one frame")
        self.engine.objects.register_fn(m.fid, frames[0], m.nested)

    def on_req(self, cid, m: P.Req, frames):
        reply = self.queries.answer(cid, m)
        if reply is not None:  # None: answered later (a node's log files, relayed)
            self.out.send(P.inbox_ident(cid), P.encode(reply))


def run(address: str, session_dir: str = "", state_dir: str = "") -> None:
    broker = Broker(address, session_dir, state_dir)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.serve()
