"""The zray broker: one ROUTER socket, one thread, all cluster state.

::

    drivers / executors (out)  --SUBMIT/PUT/SUB/RELEASE/DONE-->  +-------------+
    drivers / executors (inbox)<--OBJ/REPLY/LOG/EXEC/CANCEL----  |   ROUTER    |
    node agents                <--SPAWN/KILL_EXEC------------->  +-------------+
                                                                        |
          drain every queued message (handlers update the tables) ------+
          then schedule(): ready queues by resource shape -> idle executors

Tables it owns:
  * ``nodes``      node table: capacity, free resources, GPU slots, executor pool.
  * ``tasks``      every unfinished task by id; ready ones sit in ``queues``
                   keyed by (resources, strategy) so placement never scans
                   tasks that cannot fit.
  * ``objects``    object directory: state, value frames (kept as received,
                   forwarded zero-copy), owner, pins, waiters, subscribers.
  * ``actors``     actor directory: executor it is pinned to, its call queue,
                   restarts, names.

Flow of a task: SUBMIT creates the task and its PENDING return objects; when
its top-level argument objects are READY it joins a ready queue; schedule()
takes an idle executor on a node that fits, subtracts the resources and sends
EXEC (with the function blob the first time that executor sees it, and the
argument values appended as frames). DONE stores the returns, pushes them to
their owner's inbox, wakes dependent tasks and returns the executor to the pool.
See ``zray._protocol`` for the frames.

The class is split by job: this module holds the loop, membership and the
task lifecycle; ``placement.py`` (Placement: where tasks run, resource
accounting), ``objects.py`` (ObjectDirectory: values, stores, transfers,
spilling), ``actors.py`` (ActorDirectory) and ``queries.py`` (REQ handlers)
are mixins over the same state, whose records and named states are in
``records.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque

import zmq

from brokerd.actors import ActorDirectory, _err_text
from brokerd.objects import ObjectDirectory
from brokerd.placement import Placement
from brokerd.queries import Queries
from brokerd.records import (
    Actor,
    ActorState,
    ClientInfo,
    ExecState,
    Executor,
    Node,
    Obj,
    ObjState,
    Task,
    TaskState,
)
from zray import _protocol as P
from zray import exceptions
from zray._protocol import Msg
from zray._security import ServerAuth, create_key_file, needs_curve
from zray._serialization import serialize_error

log = logging.getLogger("zray.broker")

IDLE_REAP_S = float(os.environ.get("ZRAY_IDLE_EXECUTOR_S", "30"))
_EMPTY = b""


class Broker(Placement, ObjectDirectory, ActorDirectory, Queries):
    def __init__(self, address: str, session_dir: str = ""):
        self.address = address
        self.session_dir = session_dir
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Leave room for a 200 MB blob plus headroom; anything bigger is dropped by
        # libzmq before it costs us memory (malformed or hostile peers).
        self.sock.setsockopt(zmq.MAXMSGSIZE, int(os.environ.get("ZRAY_MAX_MSG_BYTES", 1 << 40)))
        self.auth = None
        if needs_curve(address):
            self.auth = ServerAuth(self.ctx, self.sock, create_key_file())
        if address.startswith("tcp://") and address.rsplit(":", 1)[1] in ("0", "*"):
            port = self.sock.bind_to_random_port(address.rsplit(":", 1)[0])
            self.address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            self.sock.bind(address)
        self.nodes: dict[bytes, Node] = {}
        self.executors: dict[bytes, Executor] = {}
        self.clients: dict[bytes, ClientInfo] = {}
        self.tasks: dict[bytes, Task] = {}
        self.children: dict[bytes, list] = {}
        self.queues: dict[tuple, deque] = {}
        self.objects: dict[bytes, Obj] = {}
        self.actors: dict[bytes, Actor] = {}
        self.named: dict[tuple, bytes] = {}
        self.fns: dict[bytes, object] = {}
        self.running = True
        self.dirty = False
        self.started = time.time()
        self.infeasible_warned: set = set()
        self.reaped: set = set()  # executors told to exit for being idle
        self.dropped = 0  # messages dropped as malformed or sent by the wrong role
        self.drop_reasons: set = set()  # each kind of bad message is logged once
        # (role of the sending socket, message type) -> handler(peer id, message, frames).
        # A message that arrives on any other socket role is dropped.
        node, out, inbox = P.ROLE_NODE, P.ROLE_OUT, P.ROLE_INBOX
        self.handlers = {
            (inbox, Msg.HELLO): self.on_hello,
            (inbox, Msg.HEARTBEAT): self.on_client_heartbeat,
            (out, Msg.READY): self.on_ready,
            (out, Msg.FN): self.on_fn,
            (out, Msg.SUBMIT): self.on_submit,
            (out, Msg.PUT): self.on_put,
            (out, Msg.SUB): self.on_sub,
            (out, Msg.RELEASE): self.on_release,
            (out, Msg.REFS): self.on_refs,
            (out, Msg.CANCEL): self.on_cancel,
            (out, Msg.BLOCK): self.on_block,
            (out, Msg.UNBLOCK): self.on_unblock,
            (out, Msg.REJECT): self.on_reject,
            (out, Msg.DONE): self.on_done,
            (out, Msg.YIELD): self.on_yield,
            (out, Msg.LOG): self.on_log,
            (out, Msg.REQ): self.on_req,
            (out, Msg.EXIT): self.on_client_exit,
            (node, Msg.NODE_HELLO): self.on_node_hello,
            (node, Msg.HEARTBEAT): self.on_node_heartbeat,
            (node, Msg.EXEC_DIED): self.on_exec_died,
            (node, Msg.BLOB): self.on_blob,
            (node, Msg.STORED): self.on_stored,
        }

    # ------------------------------------------------------------------ loop
    def serve(self):
        sock = self.sock
        handlers = self.handlers
        decode, role_of = P.decode, P.role_of
        last_check = time.monotonic()
        log.info("broker listening on %s (pid %d)", self.address, os.getpid())
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poll = poller.poll
        events = sock.getsockopt
        EVENTS, POLLIN, NOBLOCK = zmq.EVENTS, zmq.POLLIN, zmq.NOBLOCK
        recv = sock.recv_multipart
        while self.running:
            if poll(50 if self.dirty else 1000):
                for _ in range(20000):
                    # Drain without raising zmq.Again (an exception per wake-up costs).
                    if not events(EVENTS) & POLLIN:
                        break
                    msg = recv(NOBLOCK, copy=False)
                    ident = msg[0].bytes
                    role, peer = role_of(ident)
                    try:
                        m = decode(msg[1].buffer)
                    except P.VersionMismatch as e:  # say so: the peer cannot guess
                        self.send(ident, P.encode(P.Welcome({"error": (
                            f"it speaks zray protocol version {e.peer_version!r}, the broker "
                            f"speaks {P.VERSION}: install the same zray version everywhere")})))
                        self.drop(ident, str(e))
                        continue
                    except P.ProtocolError as e:
                        self.drop(ident, str(e))
                        continue
                    handler = handlers.get((role, m.TYPE))
                    if handler is None:
                        self.drop(ident, f"{m.TYPE.name} is not allowed from a {role} socket")
                        continue
                    try:
                        handler(peer, m, msg[2:])
                    except P.ProtocolError as e:
                        self.drop(ident, str(e))
                    except Exception:
                        log.exception("error handling %s", m.TYPE.name)
            if self.dirty:
                self.dirty = False
                try:
                    self.schedule()
                except Exception:  # a bug here must not take the cluster down
                    log.exception("scheduling pass failed")
            now = time.monotonic()
            if now - last_check >= P.HEARTBEAT_S:
                last_check = now
                self.check_liveness(now)
        self.shutdown()

    def stop(self, *_):
        self.running = False

    def drop(self, ident: bytes, why: str):
        """A bad message: count it; log each kind once (a flood must not fill the disk)."""
        self.dropped += 1
        kind = why.split(":")[0][:60]
        if kind not in self.drop_reasons and len(self.drop_reasons) < 1000:
            self.drop_reasons.add(kind)
            log.warning("dropping a bad message from %r: %s (dropped so far: %d)",
                        ident[:16], why, self.dropped)

    def shutdown(self):
        for node in list(self.nodes.values()):
            self.send(node.ident, P.encode(P.Shutdown()))
        for cid in list(self.clients):
            self.send(P.inbox_ident(cid), P.encode(P.Shutdown()))
        self.sock.close(linger=200)  # linger: the SHUTDOWN frames still leave
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

    def send(self, ident: bytes, header: bytes, frames=()) -> bool:
        try:
            if frames:
                self.sock.send_multipart([ident, header, *frames], copy=False)
            else:
                self.sock.send_multipart([ident, header])
            return True
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                log.debug("peer %r is gone", ident[:16])
                return False
            raise

    # ------------------------------------------------------------- membership
    def on_hello(self, cid, m: P.Hello, frames):
        kind, node_id, pid, job_id = m.kind, m.node_id, m.pid, m.job_id
        ident = P.inbox_ident(cid)
        self.clients[cid] = ClientInfo(cid, kind, node_id, pid, job_id, time.monotonic())
        if kind == "executor":
            node = self.nodes.get(node_id)
            if node is not None:
                ex = Executor(cid, node, pid)
                node.executors[cid] = ex
                self.executors[cid] = ex
        node = self.nodes.get(node_id)
        self.send(ident, P.encode(P.Welcome({"session_dir": self.session_dir,
                                              "address": self.address,
                                              "store_limit": node.store_limit if node else 0})))

    def on_ready(self, cid, m, frames):
        ex = self.executors.get(cid)
        if ex is None or ex.state != ExecState.STARTING:
            return
        node = ex.node
        node.spawning = max(0, node.spawning - 1)
        node.spawn_failures = 0
        while node.actor_spawns:  # a fresh process: an actor waiting for one gets it
            task = node.actor_spawns.popleft()
            actor = self.actors.get(task.spec.actor_id)
            if (actor is not None and actor.state != ActorState.DEAD
                    and task.state == TaskState.RUNNING and task.node is node):
                self.run_task(task, node, ex, acquired=True)
                return
        ex.state = ExecState.IDLE
        ex.idle_since = time.monotonic()
        node.idle.append(ex)
        self.dirty = True

    def on_node_hello(self, node_id, m: P.NodeHello, frames):
        ident = P.node_ident(node_id)
        info = m.info
        total = dict(info["resources"])
        gpus = [[g, P.UNIT] for g in info.get("gpu_ids", [])]
        node = Node(node_id, ident, total, dict(total), gpus, info.get("hostname", ""),
                    info.get("pid", 0), info.get("labels", {}), info.get("address", ""),
                    last_seen=time.monotonic())
        node.spawning = info.get("prestart", 0)
        node.store_limit = info.get("store_limit", 0)
        self.nodes[node_id] = node
        log.info("node %s joined: %s", node_id.hex(), P.from_units(total))
        self.send(ident, P.encode(P.Welcome({"address": self.address})))
        self.dirty = True

    def on_node_heartbeat(self, node_id, m, frames):
        node = self.nodes.get(node_id)
        if node is not None:
            node.last_seen = time.monotonic()
            self.send(node.ident, P.encode(P.Heartbeat()))

    def on_client_heartbeat(self, cid, m, frames):
        c = self.clients.get(cid)
        if c is not None:
            c.last_seen = time.monotonic()
            self.send(P.inbox_ident(cid), P.encode(P.Heartbeat()))

    def check_liveness(self, now):
        for node in list(self.nodes.values()):
            if node.idle:
                self.reap_idle(node, now)
            if node.alive and now - node.last_seen > P.NODE_TIMEOUT_S:
                log.warning("node %s missed heartbeats for %.0fs: declared dead",
                            node.node_id.hex(), now - node.last_seen)
                self.node_dead(node)
        for c in list(self.clients.values()):
            if c.kind == "driver" and now - c.last_seen > 6 * P.NODE_TIMEOUT_S:
                log.warning("driver %s silent: releasing its job", c.cid.hex())
                self.driver_gone(c)

    def node_dead(self, node: Node):
        node.alive = False
        self.nodes.pop(node.node_id, None)
        nid = node.node_id
        for obj in self.objects.values():
            if nid in obj.locations:
                del obj.locations[nid]
                if not obj.locations:
                    obj.lost = True
            # Transfers to or from the dead node will never finish: start them again
            # from another copy, or fail them with ObjectLostError.
            for dest in [d for d, src in obj.inflight_src.items() if src == nid or d == P.node_ident(nid)]:
                obj.inflight_src.pop(dest, None)
                for cid in obj.inflight.pop(dest, []):
                    self.deliver(cid, obj, True)
        for ex in list(node.executors.values()):
            self.executor_dead(ex, -9, reason=f"node {node.node_id.hex()} died")
        while node.actor_spawns:  # actors that never got their process: place them again
            task = node.actor_spawns.popleft()
            task.node = None
            if task.state == TaskState.RUNNING:
                self.task_ready(task)
        self.dirty = True

    def on_client_exit(self, cid, m, frames):
        c = self.clients.get(cid)
        if c is not None and c.kind in ("driver", "cli"):
            self.driver_gone(c)

    def driver_gone(self, c: ClientInfo):
        self.clients.pop(c.cid, None)
        if c.kind != "driver":
            return
        for actor in list(self.actors.values()):
            if actor.job_id == c.job_id and not actor.detached and actor.state != ActorState.DEAD:
                self.kill_actor(actor, no_restart=True, reason="its driver exited")
        for task in list(self.tasks.values()):
            if task.spec.job == c.job_id and task.state in (TaskState.QUEUED, TaskState.WAITING_ARGS):
                self.finish_cancelled(task)
        self.drop_client_refs(c.cid, c.holds)

    # ------------------------------------------------------------------ tasks
    def on_submit(self, cid, m: P.Submit, frames):
        spec = m.spec
        task_id = spec.task_id
        kind = spec.kind
        opts = spec.options
        owner = spec.owner
        resources = spec.resources
        hold = opts.get("hold", resources) if kind == P.ACTOR_CREATE else resources
        returns = spec.return_ids()
        task = Task(task_id, kind, spec, frames, resources, hold,
                    (tuple(sorted(resources.items())), _strategy_key(opts)), returns,
                    retries_left=opts.get("max_retries", 0))
        self.tasks[task_id] = task
        for oid in returns:
            self.objects[oid] = Obj(oid, owner)
        parent = spec.parent
        if parent:
            self.children.setdefault(parent, []).append(task_id)
        for oid in spec.nested:  # refs inside the arguments live until the task ends
            if self.pin(oid):
                task.holds.append(oid)
        if kind == P.ACTOR_CREATE:
            self.register_actor(task, opts)
        elif kind == P.ACTOR_CALL:
            actor = self.actors.get(spec.actor_id)
            if actor is None or actor.state == ActorState.DEAD:
                msg = actor.death if actor is not None else "The actor is not known to the cluster."
                self.fail_task(task, serialize_error(exceptions.ActorDiedError(msg, spec.actor_id.hex())))
                return
            task.actor = actor
            task.retries_left = actor.max_task_retries
        for _, oid in spec.deps:
            obj = self.objects.get(oid)
            if obj is None:
                self.fail_task(task, serialize_error(exceptions.ObjectLostError(
                    oid.hex(), f"Argument object {oid.hex()} was freed or never existed.")))
                return
            obj.pins += 1
            task.deps.append(oid)
            if obj.state == ObjState.READY:
                if obj.kind == P.ERROR:
                    self.fail_task(task, obj.frames)
                    return
            else:
                obj.waiting.append(task)
                task.pending += 1
        if kind == P.ACTOR_CALL:
            task.state = TaskState.QUEUED if task.pending == 0 else TaskState.WAITING_ARGS
            task.actor.queue.append(task)
            self.pump_actor(task.actor)
        elif task.pending == 0:
            self.task_ready(task)

    def task_ready(self, task: Task):
        task.state = TaskState.QUEUED
        if task.kind == P.ACTOR_CALL:
            self.pump_actor(task.actor)
            return
        q = self.queues.get(task.shape)
        if q is None:
            q = self.queues[task.shape] = deque()
        q.append(task)
        self.dirty = True

    def exec_header(self, task: Task, ex: Executor) -> tuple:
        fid = task.spec.fid
        frames = []
        has_fn = False
        if task.kind != P.ACTOR_CALL and fid not in ex.fns:
            blob = self.fns.get(fid)
            if blob is None:
                raise KeyError(f"function {fid.hex()} was never registered")
            frames.append(blob)
            ex.fns.add(fid)
            has_fn = True
        frames.extend(task.frames)
        layout = []
        node_id = ex.node.node_id
        for oid in task.deps:
            obj = self.objects[oid]
            if obj.locations:
                if node_id in obj.locations:
                    self.touch(obj, node_id)
                    layout.append((0, node_id))
                else:
                    layout.append((0, next(iter(obj.locations))))
            else:
                frames.extend(obj.frames)
                layout.append((len(obj.frames), None))
        gpu_ids = [task.node.gpus[i][0] for i, _ in task.gpu_alloc] if task.node else []
        header = P.encode(P.Exec(task.spec, has_fn, len(task.frames), layout, gpu_ids))
        return header, frames

    def run_task(self, task: Task, node: Node, ex: Executor, acquired: bool = False):
        if not acquired:
            self.acquire(task, node)
        task.state = TaskState.RUNNING
        task.executor = ex
        if task.kind == P.ACTOR_CREATE:
            ex.state = ExecState.ACTOR
            actor = self.actors[task.spec.actor_id]
            ex.actor = actor
            actor.executor = ex
        else:
            ex.state = ExecState.BUSY
        ex.task = task
        try:
            header, frames = self.exec_header(task, ex)
        except KeyError as e:
            self.release(task)
            ex.state = ExecState.IDLE
            ex.task = None
            node.idle.append(ex)
            self.fail_task(task, serialize_error(exceptions.RaySystemError(str(e))))
            return
        if not self.send(P.inbox_ident(ex.cid), header, frames):
            self.executor_dead(ex, -1, reason="executor unreachable")

    def on_done(self, cid, m: P.Done, frames):
        task_id, layout, nested, retryable, pushed = m
        task = self.tasks.get(task_id)
        ex = self.executors.get(cid)
        if task is None or task.state != TaskState.RUNNING:
            if ex is not None and ex.task is not None and ex.task.task_id == task_id:
                self.executor_next(ex)
            return
        if task.kind == P.ACTOR_CALL:
            task.actor.inflight.pop(task_id, None)
        elif task.kind == P.TASK:
            self.release(task)
            if ex is not None:
                self.executor_next(ex)
            if retryable and task.retries_left != 0 and not task.cancel_requested:
                task.retries_left -= 1
                log.info("retrying %s after an application error", task.spec.name)
                self.requeue(task)
                return
        if task.kind == P.ACTOR_CREATE:
            self.actor_created(task, layout[0][0] if layout else P.VALUE, frames)
            return
        if task.spec.num_returns == P.STREAMING:
            self.finish_stream(task, frames if layout and layout[0][0] == P.ERROR else None)
            return
        pos = 0
        for i, (oid, item) in enumerate(zip(task.returns, layout, strict=False)):
            kind, n = item[0], item[1]  # (errors: 1 layout item even for 0 returns)
            obj = self.objects.get(oid)
            part = frames[pos:pos + n]
            pos += n
            if obj is not None:
                if item[2] is not None:
                    self.add_location(obj, item[2], item[3])
                if nested and kind == P.VALUE:
                    self.contain(obj, nested)  # refs inside the results
                self.object_ready(obj, kind, part,
                                  push_owner=not (i < len(pushed) and pushed[i]))
        self.task_finished(task, TaskState.FINISHED)

    def executor_next(self, ex: Executor):
        """The executor finished its task: start its prefetched one, or make it idle."""
        nxt = ex.prefetch
        if nxt is None or ex.state != ExecState.BUSY:
            self.executor_free(ex)
            return
        ex.prefetch = None
        if nxt.state != TaskState.ASSIGNED:  # cancelled meanwhile: its DONE will be ignored
            self.executor_free(ex)
            return
        self.acquire(nxt, ex.node)
        nxt.state = TaskState.RUNNING
        ex.task = nxt

    def unassign(self, ex: Executor, task_id=None):
        """Take back the prefetched task of ``ex`` and queue it again at the front."""
        task = ex.prefetch
        if task is None or (task_id is not None and task.task_id != task_id):
            return
        ex.prefetch = None
        if task.state == TaskState.ASSIGNED:
            self.requeue(task)

    def executor_free(self, ex: Executor):
        ex.task = None
        if ex.state == ExecState.BUSY:
            ex.state = ExecState.IDLE
            ex.idle_since = time.monotonic()
            ex.node.idle.append(ex)
            self.dirty = True

    def reap_idle(self, node: Node, now: float):
        """Let pool executors beyond one per CPU go after IDLE_REAP_S idle (a burst of
        blocked nested tasks grows the pool; it should not stay grown)."""
        keep = max(1, int(node.total.get("CPU", 0) // P.UNIT))
        while len(node.idle) > keep and now - node.idle[0].idle_since > IDLE_REAP_S:
            ex = node.idle.pop(0)  # the longest idle (the stack's bottom)
            ex.state = ExecState.DEAD
            self.executors.pop(ex.cid, None)
            self.clients.pop(ex.cid, None)
            node.executors.pop(ex.cid, None)
            self.reaped.add(ex.cid)
            self.send(P.inbox_ident(ex.cid), P.encode(P.Exit()))

    def requeue(self, task: Task):
        task.executor = None
        task.state = TaskState.QUEUED
        q = self.queues.get(task.shape)
        if q is None:
            q = self.queues[task.shape] = deque()
        q.appendleft(task)
        self.dirty = True

    def task_finished(self, task: Task, state: TaskState):
        task.state = state
        self.tasks.pop(task.task_id, None)
        self.children.pop(task.task_id, None)
        pinned = task.deps + task.holds
        task.deps, task.holds = [], []
        for oid in pinned:
            self.unpin(oid)
        task.frames = []

    def fail_task(self, task: Task, err_frames, state=TaskState.FAILED):
        if task.node is not None:
            self.release(task)
        if task.actor is not None:
            task.actor.inflight.pop(task.task_id, None)
        if task.spec.num_returns == P.STREAMING:
            self.finish_stream(task, err_frames, state)
            return
        for oid in task.returns:
            obj = self.objects.get(oid)
            if obj is not None and obj.state == ObjState.PENDING:
                self.object_ready(obj, P.ERROR, err_frames)
        if task.kind == P.ACTOR_CREATE:
            actor = self.actors.get(task.spec.actor_id)
            if actor is not None and actor.state != ActorState.DEAD:
                self.actor_dead(actor, "the actor could not be created: " + _err_text(err_frames))
        self.task_finished(task, state)

    def finish_cancelled(self, task: Task):
        # Wrapped like an error raised by the task, so that `get` raises an error that is
        # both a TaskCancelledError and a RayTaskError wherever the cancel caught the task
        # (Ray raises the second for running actor calls, the seed's 3.2.4 relies on it).
        name = task.spec.name
        cause = exceptions.TaskCancelledError(
            task.task_id.hex(), f"Task {name} ({task.task_id.hex()}) was cancelled")
        self.fail_task(task, serialize_error(exceptions.RayTaskError(
            name, f"{name} was cancelled before it started", cause, 0, "")), TaskState.CANCELLED)

    # --------------------------------------------------------------- streams
    def on_yield(self, cid, m: P.Yield, frames):
        task = self.tasks.get(m.task_id)
        if task is None:
            return
        oid = P.object_id(m.task_id, m.index)
        obj = self.objects[oid] = Obj(oid, task.spec.owner)
        task.streamed = max(task.streamed, m.index)
        self.contain(obj, m.nested)
        self.object_ready(obj, m.kind, frames)

    def finish_stream(self, task: Task, err_frames=None, state=TaskState.FINISHED):
        if err_frames is not None:
            task.streamed += 1
            oid = P.object_id(task.task_id, task.streamed)
            obj = self.objects[oid] = Obj(oid, task.spec.owner)
            self.object_ready(obj, P.ERROR, err_frames)
        self.send(P.inbox_ident(task.spec.owner), P.encode(P.StreamEnd(task.task_id, task.streamed)))
        self.task_finished(task, state)

    # ---------------------------------------------------------------- cancel
    def on_cancel(self, cid, m: P.Cancel, frames):
        self.cancel_task(P.task_of(m.oid), m.force, m.recursive)

    def cancel_task(self, task_id: bytes, force: bool, recursive: bool):
        task = self.tasks.get(task_id)
        if task is None:
            return
        if recursive:
            for child in list(self.children.get(task_id, ())):
                self.cancel_task(child, force, recursive)
        if task.state in (TaskState.WAITING_ARGS, TaskState.QUEUED):
            if task.actor is not None:
                try:
                    task.actor.queue.remove(task)
                except ValueError:
                    pass
            self.finish_cancelled(task)
        elif task.state == TaskState.ASSIGNED and task.executor is not None:
            ex = task.executor
            if ex.prefetch is task:
                ex.prefetch = None
            task.executor = None
            self.finish_cancelled(task)
            # Its EXEC may already sit in the executor's queue: tell it to skip it.
            self.send(P.inbox_ident(ex.cid), P.encode(P.Interrupt(task_id, False)))
        elif task.state == TaskState.RUNNING and task.executor is not None:
            task.cancel_requested = True
            ex = task.executor
            if force and task.kind == P.TASK:
                task.force_cancel = True
                self.send(ex.node.ident, P.encode(P.KillExec(ex.cid)))
            else:
                self.send(P.inbox_ident(ex.cid), P.encode(P.Interrupt(task_id, bool(force))))

    def on_block(self, cid, m: P.Block, frames):
        ex = self.executors.get(cid)
        if ex is not None:
            ex.blocked = True
            for tid in m.returned:
                self.unassign(ex, tid)
        task = self.tasks.get(m.task_id)
        if task is not None and task.node is not None and not task.blocked:
            cpu = task.hold.get("CPU", 0)
            if cpu:
                task.node.avail["CPU"] = task.node.avail.get("CPU", 0) + cpu
                self.dirty = True
            task.blocked = True

    def on_reject(self, cid, m: P.Reject, frames):
        ex = self.executors.get(cid)
        if ex is not None:
            self.unassign(ex, m.task_id)

    def on_unblock(self, cid, m: P.Unblock, frames):
        ex = self.executors.get(cid)
        if ex is not None:
            ex.blocked = False
        task = self.tasks.get(m.task_id)
        if task is not None and task.node is not None and task.blocked:
            cpu = task.hold.get("CPU", 0)
            if cpu:
                task.node.avail["CPU"] = task.node.avail.get("CPU", 0) - cpu
            task.blocked = False

    # ------------------------------------------------------------ executors
    def on_exec_died(self, node_id, m: P.ExecDied, frames):
        cid, code = m
        node = self.nodes.get(node_id)
        ex = self.executors.get(cid)
        if cid in self.reaped:
            self.reaped.discard(cid)
            return
        if ex is None:
            if node is not None:
                node.spawning = max(0, node.spawning - 1)
                if node.actor_spawns:  # a process started for an actor died before READY
                    node.spawn_failures += 1
                    if node.spawn_failures <= 5:
                        node.spawning += 1
                        self.send(node.ident, P.encode(P.Spawn(1)))
                    else:
                        err = serialize_error(exceptions.RaySystemError(
                            f"node {node.node_id.hex()} cannot start executor processes "
                            f"(last exit code {code}); see its executor logs"))
                        while node.actor_spawns:
                            self.fail_task(node.actor_spawns.popleft(), err)
            self.dirty = True
            return
        self.executor_dead(ex, code)

    def executor_dead(self, ex: Executor, code: int, reason: str = ""):
        if ex.state == ExecState.DEAD:
            return
        prev = ex.state
        ex.state = ExecState.DEAD
        self.executors.pop(ex.cid, None)
        info = self.clients.pop(ex.cid, None)
        self.drop_client_refs(ex.cid, info.holds if info is not None else set())
        node = ex.node
        node.executors.pop(ex.cid, None)
        if ex in node.idle:
            node.idle.remove(ex)
        if prev == ExecState.STARTING:
            node.spawning = max(0, node.spawning - 1)
        why = reason or f"the executor process (pid {ex.pid}) died with exit code {code}"
        task = ex.task
        ex.task = None
        pre = ex.prefetch
        if pre is not None:
            ex.prefetch = None
            if pre.state == TaskState.ASSIGNED:
                if pre.cancel_requested:
                    self.finish_cancelled(pre)
                else:
                    self.requeue(pre)
        if ex.actor is not None:
            actor = ex.actor
            ex.actor = None
            if task is not None and task.kind == P.ACTOR_CREATE and task.state == TaskState.RUNNING:
                self.release(task)
            self.actor_process_died(actor, code, why)
        elif task is not None and task.state == TaskState.RUNNING:
            self.release(task)
            if task.cancel_requested:
                self.finish_cancelled(task)
            elif task.retries_left != 0:
                task.retries_left -= 1
                log.warning("%s: %s; retrying the task", task.spec.name, why)
                self.requeue(task)
            else:
                self.fail_task(task, serialize_error(exceptions.WorkerCrashedError(
                    f"Task {task.spec.name} failed: {why}. No retries left "
                    f"(max_retries={task.spec.options.get('max_retries', 0)}).")))
        self.dirty = True

    # ------------------------------------------------------------------- logs
    def on_log(self, cid, m: P.Log, frames):
        driver, prefix, text = m
        if driver in self.clients:
            self.send(P.inbox_ident(driver), P.encode(P.Print(prefix, text)))

def _strategy_key(opts: dict):
    s = opts.get("strategy")
    if s is None or isinstance(s, str):
        return s
    return tuple(sorted(s.items()))


def run(address: str, session_dir: str = "") -> None:
    broker = Broker(address, session_dir)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.serve()
