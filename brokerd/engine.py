"""The task engine: every task, executor and actor state change of the broker happens here.

::

    SUBMIT --submit()--> Task WAITING_ARGS --deps ready--> QUEUED --placed--> RUNNING --DONE--> FINISHED
                                   |                         \\--prefetched--> ASSIGNED --previous DONE--> RUNNING
                                   |                         RUNNING --error/crash, retries left--> QUEUED
                                   |                         FINISHED --result lost with its node--> QUEUED / WAITING_ARGS
                                   +------ cancel, failed dep, dead actor ------> CANCELLED / FAILED

    executors: STARTING --READY--> IDLE <--> BUSY;  STARTING --> ACTOR (one actor for life);  * --> DEAD
    actors:    PENDING --> ALIVE <--> RESTARTING;  * --> DEAD        (ActorDirectory)

Every move goes through ``Transitions.move`` (legal moves only, each one in
the event log). The directories own their tables and report outcomes: the
object directory returns the tasks an object woke or failed (``_wake``), the
placement pass returns its decisions (``_apply``), the actor directory says
which calls to send, retry or fail (``_settle``); the engine moves the tasks.

Lineage: a plain task with retries left whose results went into node stores is
kept after it finishes (spec, argument frames, argument objects pinned) while one
of those results lives (``ObjectDirectory.keep_lineage``/``drop_lineage``, bounded
by ZRAY_MAX_LINEAGE_BYTES). When a node dies, the results whose last copy it held
are rebuilt at once (``_rebuild``): their tasks run again as new attempts of the
same task id, recursively through their own lost arguments, and the results wait
pending meanwhile; results that cannot be rebuilt fail with
ObjectReconstructionFailedError, put objects with ObjectLostError.

Owns: ``tasks`` (unfinished tasks by id), ``children`` (task id -> tasks it
submitted, for recursive cancel), ``executors`` and ``clients`` and every
Task, Executor and ClientInfo record. Sends (through the outbox): EXEC,
INTERRUPT, RECALL, STREAM_END, EXIT, PRINT, KILL_EXEC.

Sent ahead: a busy executor holds the tasks sent to it before it is done in
``Executor.ahead`` (ASSIGNED, in order; how many: brokerd/window.py). Its DONE
starts the first (``_executor_next``); a cancel, its blocking in get (BLOCK,
REJECT), its retiring or death take them back; an executor gone idle RECALLs those
stuck behind a long call elsewhere (``_recall``).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import deque

from brokerd.access import RefAccess, renv_packages
from brokerd.actors import ActorDirectory, Death
from brokerd.jobhistory import EndedJobs, now_ms
from brokerd.leases import TaskLeases
from brokerd.nodes import NodeTable
from brokerd.objects import ObjectDirectory
from brokerd.outbox import Outbox
from brokerd.pgroups import PlacementGroupTable, owner_gone, pg_strategy, schedule_groups
from brokerd.placement import Decisions, Placement, check_strategy_options, strategy_key
from brokerd.pushed import note as pushed_note
from brokerd.pushed import redeliver as pushed_redeliver
from brokerd.records import (
    Actor,
    ActorState,
    ClientInfo,
    ExecState,
    Executor,
    Node,
    ObjState,
    Task,
    TaskState,
)
from brokerd.relineage import rebuild_skip_reason
from brokerd.routes import ActorRoutes
from brokerd.transitions import Transitions
from zray import _protocol as P
from zray import exceptions
from zray._serialization import serialize, serialize_error

log = logging.getLogger("zray.broker")

_WAITING = (TaskState.WAITING_ARGS, TaskState.QUEUED)
_STARTED = (TaskState.ASSIGNED, TaskState.RUNNING)
_NONE_FRAMES = serialize(None)[0]  # the value of a stream's completion object
MAX_SPAWN_FAILURES = 5  # fresh processes for actors that die before READY, per node, in a row


class ArgumentLost(Exception):
    """A task's argument object has no copy left when its EXEC is built."""


class TaskEngine:
    def __init__(self, out: Outbox):
        self.out = out
        self.moves = Transitions()
        self.clients: dict[bytes, ClientInfo] = {}
        self.nodes = NodeTable(out)
        self.objects = ObjectDirectory(out, self.nodes, self.clients)
        self.access = self.objects.access = RefAccess(self.objects, {}, self.clients)
        self.placement = Placement(self.nodes, self.objects)
        self.actors = ActorDirectory(out, self.moves)
        self.routes = self.actors.routes = ActorRoutes(out, self)  # direct calls (brokerd/routes.py)
        self.pgroups = PlacementGroupTable(self.nodes)  # placement groups (brokerd/pgroups.py)
        self.placement.groups = self.pgroups
        self.leases = TaskLeases(out, self)  # leased executors (brokerd/leases.py)
        self.tasks: dict[bytes, Task] = {}
        self.children: dict[bytes, list] = {}
        self.executors: dict[bytes, Executor] = {}
        self.access.executors = self.executors
        self.reaped: set = set()  # executors told to exit for being idle
        self.jobs: dict[bytes, dict] = {}  # job id -> {"namespace", "driver", "start_ms"}
        self.ended_jobs = EndedJobs()  # jobs whose driver is gone (brokerd/jobhistory.py)
        self.recovery = None  # brokerd.restart.Recovery when the broker has a state dir

    # ============================================================ membership
    def client_joined(self, cid: bytes, m: P.Hello) -> dict:
        """A client said HELLO: record it (an executor joins its node's pool). Returns
        the WELCOME info; {"error": ...} refuses it."""
        if m.kind not in ("driver", "executor", "cli"):
            return {"error": f"unknown client kind {m.kind!r:.40}"}
        node = self.nodes.nodes.get(m.node_id)
        if m.kind == "executor":
            # Only a process its node started and vouched for (EXEC_SPAWNED) is an
            # executor: anyone else could otherwise receive other jobs' tasks.
            token = node.vouched.pop(cid, None) if node is not None else None
            if token is None or not hmac.compare_digest(token, m.token):
                return {"error": "not an executor its node started (unknown id or token)"}
        self.clients[cid] = ClientInfo(cid, m.kind, m.node_id, m.pid, m.job_id, time.monotonic())
        if m.kind == "executor":
            ex = Executor(cid, node, m.pid)
            node.executors[cid] = ex
            self.executors[cid] = ex
            if self.recovery is not None:  # it may host an actor from before a restart
                self.recovery.reattach(ex)
        return {"store_limit": node.store_limit if node else 0}

    def executor_spawned(self, node_id: bytes, cid: bytes, token: bytes) -> None:
        """A node vouches for an executor it starts."""
        node = self.nodes.nodes.get(node_id)
        if node is None or len(cid) != P.ID_LEN or len(token) < 16:
            raise P.ProtocolError("EXEC_SPAWNED from an unknown node or with a bad id")
        if len(node.vouched) >= 1024:  # spawns that never said HELLO: forget the oldest
            node.vouched.pop(next(iter(node.vouched)))
        node.vouched[cid] = token

    def register_job(self, cid: bytes, namespace: str, log_to_driver: bool = True) -> None:
        """A driver names its job's namespace (tasks and actors of the job look it up)
        and says whether it wants its job's remote output."""
        c = self.clients.get(cid)
        if c is None or c.kind != "driver":
            raise PermissionError("only a driver registers a job")
        self.jobs[c.job_id] = {"namespace": namespace, "driver": cid,
                               "start_ms": (self.jobs.get(c.job_id) or {}).get("start_ms")
                               or now_ms()}
        c.logs = log_to_driver
        if self.recovery is not None:
            self.recovery.job_saved(c.job_id, self.jobs[c.job_id])

    def client_seen(self, cid: bytes) -> bool:
        c = self.clients.get(cid)
        if c is None:
            return False
        c.last_seen = time.monotonic()
        return True

    def executor_ready(self, cid: bytes) -> None:
        """A freshly started executor is up: an actor waiting for a process gets it,
        otherwise it joins the idle pool."""
        ex = self.executors.get(cid)
        if ex is None or ex.state != ExecState.STARTING:
            return
        node = ex.node
        self.nodes.spawned(node)
        node.spawn_failures = 0
        while node.actor_spawns:
            task = node.actor_spawns.popleft()
            actor = self.actors.get(task.spec.actor_id)
            if (actor is not None and actor.state != ActorState.DEAD
                    and task.state == TaskState.RUNNING and task.node is node):
                self._start(task, ex)
                return
        self.moves.move(ex, ExecState.IDLE, "started")
        self.nodes.push_idle(ex)

    def node_joined(self, node_id: bytes, info: dict) -> Node:
        old = self.nodes.nodes.get(node_id)
        if old is not None and old.reconnecting:  # known before a broker restart
            if self.recovery.node_back(old, info):  # the same agent: its store lives on
                node = self.nodes.join(node_id, info)
                node.store_used, node.spilled, node.lru = old.store_used, old.spilled, old.lru
                self.recovery.node_saved(node)
                # Transfers from or to it started before it was back: their FETCH or PULL
                # may have found no connection (dropped): start them again.
                self.objects.restart_transfers(node_id)
                return node
            self.node_dead(old, "its agent restarted")
            old = None
        if old is not None and old.alive:
            if info.get("pid") == old.pid:  # the same agent introduced itself again
                self.nodes.seen(node_id)
                return old
            # A new agent process with the old id (ZeroMQ refuses a second live peer with
            # an identity in use, so the old connection is gone): its executors are too.
            self.node_dead(old, "its agent restarted")
        node = self.nodes.join(node_id, info)
        if self.recovery is not None:
            self.recovery.node_saved(node)
        return node

    def node_dead(self, node: Node, why: str = "") -> None:
        self.nodes.leave(node)
        self.pgroups.node_lost(node.node_id)
        if self.recovery is not None:
            self.recovery.node_gone(node)
        lost = self.objects.node_lost(node.node_id)
        if lost:
            self._rebuild(lost)
        self.objects.restart_transfers(node.node_id)
        reason = f"node {node.node_id.hex()} died" + (f" ({why})" if why else "")
        for ex in list(node.executors.values()):
            self.executor_dead(ex, -9, reason=reason)
        while node.actor_spawns:  # actors that never got their process: place them again
            task = node.actor_spawns.popleft()
            if task.state == TaskState.RUNNING:
                self.nodes.release(task)
                self._requeue(task, reason)

    def client_left(self, cid: bytes) -> None:
        c = self.clients.get(cid)
        if c is None:
            return
        if c.kind in ("driver", "cli"):
            self.driver_gone(c)
        elif c.kind == "executor":
            self.executor_retired(cid)
            self.out.send(P.inbox_ident(cid), P.encode(P.Exit()))  # now it may exit

    def driver_gone(self, c: ClientInfo, normal: bool = True) -> None:
        self.clients.pop(c.cid, None)
        if c.kind != "driver":
            return
        self.job_over(c.job_id, c, normal)
        self.objects.drop_client(c.cid, c.holds, c.handed)
        owner_gone(self, c.cid)  # its placement groups

    def job_over(self, job_id: bytes, c: ClientInfo | None = None, normal: bool = True) -> None:
        """A job's driver is gone: its non-detached actors end, its waiting tasks are
        cancelled."""
        for actor in list(self.actors.actors.values()):
            if actor.job_id == job_id and not actor.detached and actor.state != ActorState.DEAD:
                self._settle(actor, self.actors.kill(actor, no_restart=True,
                                                     reason="its driver exited"))
        self._end_job_tasks(job_id, c)
        info = self.jobs.pop(job_id, None)
        if info is not None:
            self.ended_jobs.add(job_id, info, c.pid if c else None, c.node_id if c else None,
                                normal)
        if self.recovery is not None:
            self.recovery.job_gone(job_id)

    def _end_job_tasks(self, job_id: bytes, c: ClientInfo | None) -> None:
        """Its tasks end too, as in Ray: those waiting are cancelled, plain tasks running
        are killed (a task of a driver that left used to run on to its end, for ever if
        it looped, holding its CPU), and so is an executor leased to the driver (it may
        be running one of its calls). Not the work of the job's detached actors: the
        tasks such an actor submitted, and theirs in turn, run on."""
        tasks = [t for t in self.tasks.values() if t.spec.job == job_id]
        kept = {a.executor.cid for a in self.actors.actors.values()
                if a.job_id == job_id and a.detached and a.executor is not None}
        grew = bool(kept)
        while grew:  # (the tasks the kept ones submitted, to any depth)
            grew = False
            for t in tasks:
                if (t.spec.owner in kept and t.executor is not None
                        and t.executor.cid not in kept):
                    kept.add(t.executor.cid)
                    grew = True
        for t in tasks:
            if t.spec.owner in kept:
                continue
            if t.state in _WAITING:
                self.finish_cancelled(t)
            elif (t.kind != P.TASK or t.state not in _STARTED or t.executor is None
                    or t.executor.node is None):
                continue
            elif t.state == TaskState.ASSIGNED:  # sent ahead, not started: skipped
                self.cancel(t.task_id, False, False)
            elif not t.force_cancel:
                t.cancel_requested = t.force_cancel = True
                self.out.send(t.executor.node.ident, P.encode(P.KillExec(t.executor.cid)))
        held = self.leases.by_holder.get(c.cid) if c is not None else None
        for lease in (held or {}).values():  # ({lease id: lease}: a holder may hold several)
            if lease.ex.node is not None:
                self.out.send(lease.ex.node.ident, P.encode(P.KillExec(lease.ex.cid)))

    def check_liveness(self, now: float) -> None:
        for node in list(self.nodes.nodes.values()):
            if node.idle:
                for ex in self.nodes.reap_idle(node, now):
                    self.moves.move(ex, ExecState.DEAD, "idle too long")
                    self.executors.pop(ex.cid, None)
                    self.clients.pop(ex.cid, None)
                    node.executors.pop(ex.cid, None)
                    self.reaped.add(ex.cid)
                    self.out.send(P.inbox_ident(ex.cid), P.encode(P.Exit()))
        for node in self.nodes.silent(now):
            log.warning("node %s missed heartbeats for %.0fs: declared dead",
                        node.node_id.hex(), now - node.last_seen)
            self.node_dead(node, "missed heartbeats")
        if self.recovery is not None:
            self.recovery.tick(now)
        if self.access.parked:
            self.access.retry(now)
        if self.placement.running:
            self._recall_idle()
        if self.leases.by_exec and self.placement.wants_resources and self.placement.pending():
            self.leases.revoke()  # queued work may need the leased executors' resources
        for c in list(self.clients.values()):
            if c.kind == "driver" and now - c.last_seen > P.DRIVER_TIMEOUT_S:
                log.warning("driver %s silent: releasing its job", c.cid.hex())
                self.driver_gone(c, normal=False)

    # ================================================================ tasks
    def submit(self, cid: bytes, m: P.Submit, frames, spec_bytes=None) -> None:
        spec = m.spec
        task_id, kind, opts = spec.task_id, spec.kind, spec.options
        if task_id in self.tasks:
            raise P.ProtocolError(f"task {task_id.hex()} submitted twice")
        resources = spec.resources
        hold = resources  # (checked by the codec)
        if kind == P.ACTOR_CREATE:  # an actor may hold less while it lives than it needs to start
            hold = opts.get("hold", resources)
            if not isinstance(hold, dict) or not all(
                    type(k) is str and type(v) is int and v >= 0 for k, v in hold.items()):
                raise P.ProtocolError("SUBMIT: options.hold must map names to units")
        sel = opts.get("label_selector")
        if sel is not None and not (type(sel) is dict and all(
                type(k) is str and type(v) is str for k, v in sel.items())):
            raise P.ProtocolError("SUBMIT: options.label_selector must map str to str")
        renv = opts.get("renv")
        if renv is not None and not (type(renv) is dict and type(renv.get("key")) is str
                                     and len(renv["key"]) == 64):
            raise P.ProtocolError("SUBMIT: options.renv must be a dict with a 64-char key")
        check_strategy_options(opts)
        pg_error = None
        if pg_strategy(opts) is not None:  # a member of a placement group: its resources
            try:
                resources = self.pgroups.task_resources(opts["strategy"], resources)
                hold = self.pgroups.task_resources(opts["strategy"], hold)
            except (LookupError, ValueError) as e:
                if isinstance(e, P.ProtocolError):
                    raise
                pg_error = str(e)
        returns = spec.return_ids()
        task = Task(task_id, kind, spec, frames, resources, hold,
                    (tuple(sorted(resources.items())), strategy_key(opts)), returns,
                    retries_left=_int(opts.get("max_retries")))
        task.spec_bytes = spec_bytes
        self.tasks[task_id] = task
        for oid in returns:
            self.objects.create(oid, spec.owner)
        if spec.parent:
            self.children.setdefault(spec.parent, []).append(task_id)
        access = self.access
        for oid in spec.nested:  # refs inside the arguments live until the task ends
            if access.may_use(cid, oid) and self.objects.pin(oid):
                task.holds.append(oid)
        if kind == P.ACTOR_CREATE:
            task.actor = self.actors.register(task)
            task.retries_left = 0
            if not task.actor.detached:
                self.objects.create_handle(spec.actor_id, spec.owner)
            else:  # its packages outlive the driver that uploaded them
                for oid in renv_packages(spec):
                    if access.may_use(cid, oid) and self.objects.pin(oid):
                        task.actor.packages.append(oid)
        elif kind == P.ACTOR_CALL:
            actor = self.actors.get(spec.actor_id)
            if actor is None or actor.state == ActorState.DEAD:
                msg = actor.death if actor is not None else "The actor is not known to the cluster."
                self.fail_task(task, serialize_error(
                    exceptions.ActorDiedError(msg, spec.actor_id.hex())), reason="actor dead")
                return
            task.actor = actor
            mtr = opts.get("max_task_retries")  # the method's own, else the actor's
            task.retries_left = mtr if type(mtr) is int else actor.max_task_retries
        for _, oid in spec.deps:
            obj = self.objects.get(oid)
            if obj is None or not access.may_use(cid, oid):  # (no ref to it: as unknown)
                self.fail_task(task, serialize_error(exceptions.ObjectLostError(
                    oid.hex(), f"Argument object {oid.hex()} was freed or never existed.")),
                    reason="argument unknown")
                return
            obj.pins += 1
            task.deps.append(oid)
            if obj.state == ObjState.READY:
                if obj.kind == P.ERROR:
                    self.fail_task(task, obj.frames, reason="argument is an error")
                    return
                if obj.lost:
                    self.fail_task(task, self.objects.lost_error(obj), reason="argument lost")
                    return
            else:
                obj.waiting.append(task)
                task.pending += 1
        if pg_error is not None:
            self.fail_task(task, serialize_error(exceptions.TaskUnschedulableError(
                f"{spec.name} cannot run in its placement group: {pg_error}")),
                reason="placement group")
            return
        if kind == P.ACTOR_CALL:
            task.actor.queue.append(task)
            if task.pending == 0:
                self.moves.move(task, TaskState.QUEUED, "submitted")
            self._pump(task.actor)
        elif task.pending == 0:
            self._ready(task, "submitted")

    def _ready(self, task: Task, reason: str) -> None:
        """Its arguments are all there: queue it (an actor call goes to its actor)."""
        self.moves.move(task, TaskState.QUEUED, reason)
        if task.kind == P.ACTOR_CALL:
            self._pump(task.actor)
        else:
            self.placement.enqueue(task)

    def _wake(self, woken: list) -> None:
        """Apply the object directory's outcome: tasks whose arguments are ready or failed."""
        for task, err in woken:
            if err is None:
                self._ready(task, "arguments ready")
            else:
                self.fail_task(task, err, reason="argument is an error")

    def schedule(self) -> None:
        if self.pgroups.pending:
            schedule_groups(self)
        self.placement.dirty = False  # (NodeTable.freed: placement.schedule() takes it)
        self._apply(self.placement.schedule())

    def _apply(self, d: Decisions) -> None:
        for task, text in d.warnings:  # infeasible work: one warning per shape to its driver
            c = self.clients.get(task.spec.driver)
            if c is not None and c.logs:
                self.out.send(P.inbox_ident(task.spec.driver), P.encode(P.Print("(scheduler)!", text)))
        for task, err in d.failed:
            self.fail_task(task, serialize_error(exceptions.TaskUnschedulableError(err)),
                           reason="unschedulable")
        for task, _node, ex in d.run:
            self.placement.forget(task)
            self._start(task, ex)
        for task, node in d.actors:
            # An actor gets a process of its own (never one that ran a task): a prestarted
            # one that never ran anything if the node has one idle (its creation goes now;
            # another is started for the pool), else a new one, whose READY sends the
            # creation (executor_ready). Not for an actor with a runtime_env.
            self.placement.forget(task)
            ex = _take_pristine(node) if not task.spec.options.get("renv") else None
            if ex is not None:
                self.moves.move(task, TaskState.RUNNING, "on a prestarted process",
                                node.node_id)
                self._start(task, ex)
                self.nodes.request_spawn(node)
                continue
            self.moves.move(task, TaskState.RUNNING, "waiting for a fresh process", node.node_id)
            task.executor = None
            node.actor_spawns.append(task)
            self.nodes.request_spawn(node, for_actor=True)
        for task, ex in d.prefetch:
            self.moves.move(task, TaskState.ASSIGNED, "prefetched", ex.node.node_id)
            task.executor = ex
            ex.ahead.append(task)
            self._send_exec(task, ex)

    def _exec_message(self, task: Task, ex: Executor) -> tuple:
        fid = task.spec.fid
        frames = []
        has_fn = False
        if task.kind != P.ACTOR_CALL and fid not in ex.fns:
            blob = self.objects.fns.get(fid)
            if blob is None:
                raise KeyError(f"function {fid.hex()} was never registered")
            frames.append(blob)
            has_fn = True
        frames.extend(task.frames)
        layout = []
        node_id = ex.node.node_id
        objects = self.objects
        for oid in task.deps:
            obj = objects.objects[oid]
            if obj.locations:
                if node_id in obj.locations:
                    objects.touch(obj, node_id)
                    layout.append((0, node_id))
                else:
                    layout.append((0, next(iter(obj.locations))))
            elif obj.frames:
                frames.extend(obj.frames)
                layout.append((len(obj.frames), None))
            else:  # no copy left (lost with its node): never send an empty argument
                raise ArgumentLost(obj)
        if has_fn:  # (only once the EXEC will go: the executor then has the function)
            ex.fns.add(fid)
        gpu_ids = self.nodes.gpu_ids(task) if task.gpu_alloc else []
        if task.spec_bytes is not None:  # forwarded as it came: never packed twice
            if not layout and not gpu_ids:
                header = P.encode_exec_plain(task.spec_bytes, has_fn, len(task.frames))
            else:
                header = P.encode_exec(task.spec_bytes, has_fn, len(task.frames), layout,
                                       gpu_ids)
        else:
            header = P.encode(P.Exec(task.spec, has_fn, len(task.frames), layout, gpu_ids))
        return header, frames

    def _send_exec(self, task: Task, ex: Executor) -> bool:
        try:
            header, frames = self._exec_message(task, ex)
        except ArgumentLost as e:
            self.fail_task(task, self.objects.lost_error(e.args[0]), reason="argument lost")
            return False
        except KeyError as e:
            self.fail_task(task, serialize_error(exceptions.RaySystemError(str(e))),
                           reason="function unknown")
            return False
        self.out.send(P.inbox_ident(ex.cid), header, frames)
        return True

    def _start(self, task: Task, ex: Executor) -> None:
        """Run ``task`` (its resources already taken) on executor ``ex``."""
        if task.kind == P.ACTOR_CREATE:
            self.moves.move(ex, ExecState.ACTOR, "hosts an actor")
            actor = task.actor
            ex.actor = actor
            actor.executor = ex
            if task.state != TaskState.RUNNING:
                self.moves.move(task, TaskState.RUNNING, "started")
        else:
            self.moves.move(ex, ExecState.BUSY, "runs a task")
            self.moves.move(task, TaskState.RUNNING, "started")
            task.started = self.moves.now
        task.executor = ex
        ex.task = task
        if not self._send_exec(task, ex) and ex.state == ExecState.BUSY:
            ex.task = None
            self.moves.move(ex, ExecState.IDLE, "its task failed to start")
            self.nodes.push_idle(ex)

    def done(self, cid: bytes, m: P.Done, frames) -> None:
        task_id, layout, nested, retryable, pushed, error = m
        task = self.tasks.get(task_id)
        ex = self.executors.get(cid)
        # (ex None: a DONE from a process already dead here: late, as its death came
        # first on another socket; its task may be RUNNING with no executor yet, as an
        # actor's creation waiting for the new process)
        if task is None or ex is None or task.state != TaskState.RUNNING or task.executor is not ex:
            if ex is not None and ex.task is not None and ex.task.task_id == task_id:
                self._executor_next(ex)
            return
        need = layout[0][1] if len(layout) == 1 else sum(item[1] for item in layout)
        if need != len(frames):
            raise P.ProtocolError("DONE: frame count does not match its returns")
        if task.kind == P.ACTOR_CALL:
            actor = task.actor
            actor.inflight.pop(task_id, None)
            if retryable and task.retries_left != 0 and not task.cancel_requested:
                # The method's retry_exceptions covers the error: call it again.
                task.retries_left -= 1
                log.info("retrying %s after an application error", task.spec.name)
                task.executor = None
                self.moves.move(task, TaskState.QUEUED, "application error, retrying")
                actor.queue.append(task)
                self._pump(actor)
                return
            if actor.exit_when_idle and not actor.inflight and not actor.queue:
                self._end_unreferenced(actor)
                # The executor is SIGKILLed now: results it pushed straight to their
                # owner may still sit unsent in its socket. The broker sends them too
                # (an owner takes a second copy of a value as a no-op).
                pushed = ()
        elif task.kind == P.TASK:
            self.placement.runtimes.observe(task.spec.fid, self.moves.now - task.started)
            self._executor_next(ex, task)  # (it releases the task's resources)
            if retryable and task.retries_left != 0 and not task.cancel_requested:
                task.retries_left -= 1
                log.info("retrying %s after an application error", task.spec.name)
                self._requeue(task, "application error, retrying")
                return
        if task.kind == P.ACTOR_CREATE:
            self._actor_created(task, layout[0][0] if layout else P.VALUE, frames, error)
            return
        if task.spec.num_returns == P.STREAMING:  # what it raised is its last item
            self._finish_stream(task, frames if layout and layout[0][0] == P.ERROR else None)
            return
        pos = 0
        woken = []
        objects = self.objects
        table = objects.objects
        why = None  # (results in node stores: why they cannot be rebuilt, "" if they can)
        for i, (oid, item) in enumerate(zip(task.returns, layout, strict=False)):
            kind, n, node_id, size = item  # (errors: 1 layout item even for 0 returns)
            obj = table.get(oid)
            part = frames[pos:pos + n]
            pos += n
            if obj is not None:
                if node_id is not None:
                    objects.add_location(obj, node_id, size)
                    if obj.lineage is None and kind == P.VALUE:
                        if why is None:
                            why = self._keep_lineage(task)
                        if why:
                            obj.no_lineage = why
                        else:
                            obj.lineage = task
                            task.lineage += 1
                if nested and kind == P.VALUE:
                    objects.contain(obj, nested, cid)  # refs inside the results
                woken += objects.ready(obj, kind, part,
                                       push_owner=not (i < len(pushed) and pushed[i]))
        if pushed:
            pushed_note(ex, task.returns, pushed)
        if not (layout and layout[0][0] == P.ERROR):
            self._finished(task, TaskState.FINISHED, "returned")
        elif task.cancel_requested:
            self._finished(task, TaskState.CANCELLED, "cancelled while running")
        else:
            # the error text's tail goes in the event log: the dashboard shows it
            self._finished(task, TaskState.FAILED, f"raised: {error[-1000:]}" if error else "raised")
        self._wake(woken)

    def _keep_lineage(self, task: Task) -> str:
        """``task`` returned results into node stores: keep its lineage to rebuild them
        if their node dies (a plain task with retries left, within the lineage budget).
        Returns "" when kept (or already kept), else why they cannot be rebuilt."""
        name = task.spec.name
        if task.kind != P.TASK:
            return f"it was returned by actor method {name}, which is not re-executed"
        if task.lineage:
            return ""
        if task.retries_left == 0:
            mr = task.spec.options.get("max_retries", 0)
            return (f"task {name} is not retryable (max_retries=0)" if not mr else
                    f"task {name} has no retries left (max_retries={mr})")
        if not self.objects.keep_lineage(task):
            return "the lineage kept by the broker was at its limit (ZRAY_MAX_LINEAGE_BYTES)"
        return ""

    def _rebuild(self, lost: list) -> None:
        """Objects whose last copy died with a node: run the tasks that made them again
        (as new attempts of the same task id, their results keeping their ids), those
        tasks' own lost arguments too. Until then the objects are pending: gets and
        tasks that need them wait. An object that cannot be rebuilt stays lost."""
        again: dict = {}
        skipped = []
        for obj in lost:
            task = obj.lineage
            if task is None or obj.state != ObjState.READY or task.state != TaskState.FINISHED:
                if not obj.no_lineage:  # (the error a get sees says why: lost_error)
                    obj.no_lineage = rebuild_skip_reason(obj, task)
                skipped.append(obj)
                continue
            if task.retries_left == 0:
                mr = task.spec.options.get("max_retries", 0)
                obj.no_lineage = f"task {task.spec.name} has no retries left (max_retries={mr})"
                continue
            again[task.task_id] = task
        for task in again.values():  # all of them pending first: a rerun waits for its args
            for oid in task.returns:
                obj = self.objects.get(oid)
                if obj is not None and obj.lost and obj.lineage is task:
                    self.objects.rebuilding(obj)
        if skipped:
            log.warning("%d objects lost with their node are not rebuilt (%s: %s)",
                        len(skipped), skipped[0].oid.hex(),
                        skipped[0].no_lineage or "a put object has no lineage")
        self._args_lost({obj.oid for obj in lost})
        for task in again.values():
            self._reconstruct(task)

    def _args_lost(self, lost: set) -> None:
        """Tasks not started yet that counted an argument among the ``lost`` objects as
        there: they wait for it again while it is rebuilt, or fail if it cannot be."""
        for task in list(self.tasks.values()):
            # (an actor call not sent yet waits in its actor's queue, in order)
            if task.state not in _WAITING or task.kind == P.ACTOR_CREATE:
                continue
            hit = [oid for oid in task.deps if oid in lost]
            if not hit:
                continue
            objs = [self.objects.get(oid) for oid in hit]
            gone = next((o for o in objs if o is None or o.lost), False)
            if gone is not False:
                err = (self.objects.lost_error(gone) if gone is not None else
                       serialize_error(exceptions.ObjectLostError(hit[0].hex())))
                self.fail_task(task, err, reason="argument lost")
                continue
            if task.state == TaskState.QUEUED and task.kind == P.ACTOR_CALL:
                self.moves.move(task, TaskState.WAITING_ARGS, "argument lost, being rebuilt")
            elif task.state == TaskState.QUEUED:  # out of its placement queue, waiting again
                q = self.placement.queues.get(task.shape)
                if q is not None:
                    try:
                        q.remove(task)
                    except ValueError:
                        pass
                self.moves.move(task, TaskState.WAITING_ARGS, "argument lost, being rebuilt")
            for obj in objs:
                obj.waiting.append(task)
                task.pending += 1

    def _reconstruct(self, task: Task) -> None:
        reason = "reconstructing lost object"
        log.warning("%s: a result was lost with its node; running the task again",
                    task.spec.name)
        if task.retries_left > 0:
            task.retries_left -= 1
        task.executor = None
        task.pending = 0
        task.cancel_requested = task.force_cancel = False
        self.tasks[task.task_id] = task
        err = None
        for oid in task.deps:
            obj = self.objects.get(oid)  # (pinned by the lineage: still known)
            if obj is not None and obj.state == ObjState.READY and obj.kind == P.ERROR:
                err = obj.frames
            elif obj is None or obj.lost:
                ret = task.returns[0].hex() if task.returns else ""
                err = serialize_error(exceptions.ObjectReconstructionFailedError(ret, (
                    f"Object {ret} is lost and cannot be rebuilt: task {task.spec.name}'s "
                    f"argument {oid.hex()} is lost too and cannot be rebuilt.")))
            elif obj.state != ObjState.READY:
                obj.waiting.append(task)
                task.pending += 1
                continue
            else:
                continue
            break
        if err is not None:
            self.moves.move(task, TaskState.QUEUED, reason)
            self.fail_task(task, err, reason="argument lost")
        elif task.pending:
            self.moves.move(task, TaskState.WAITING_ARGS, reason)
        else:
            self.moves.move(task, TaskState.QUEUED, reason)
            self.placement.enqueue(task)

    def _executor_next(self, ex: Executor, done=None) -> None:
        """The executor finished its task (``done``, a plain task still holding its
        resources, when given): start the first task sent ahead to it (the executor
        runs them in the order sent), or make it idle."""
        ahead = ex.ahead
        if ex.state == ExecState.BUSY:
            while ahead:
                nxt = ahead.popleft()
                if nxt.state != TaskState.ASSIGNED:  # cancelled: its DONE will be ignored
                    continue
                if (done is not None and done.node is ex.node and not done.blocked
                        and done.hold == nxt.hold):
                    # The same resources on the same node: they pass straight on (no
                    # release and acquire, nothing for the node indexes to re-file).
                    nxt.node, done.node = done.node, None
                    done = None
                else:
                    if done is not None:
                        self.nodes.release(done)
                        done = None
                    self.nodes.acquire(nxt, ex.node)
                self.moves.move(nxt, TaskState.RUNNING, "started (prefetched)")
                nxt.started = self.moves.now
                ex.task = nxt
                self.placement.refill(ex)  # (a slot of its window is free)
                return
        if done is not None:
            self.nodes.release(done)
        self._executor_free(ex)

    def _unassign(self, ex: Executor, task_id: bytes) -> None:
        """Take back the task ``task_id`` sent ahead to ``ex``; queue it again at the front."""
        task = next((t for t in ex.ahead if t.task_id == task_id), None)
        if task is None:
            return
        ex.ahead.remove(task)
        self.placement.refill(ex)
        if task.state == TaskState.ASSIGNED:
            self._requeue(task, "handed back by a blocked executor")

    def _executor_free(self, ex: Executor) -> None:
        done, ex.task = ex.task, None
        if ex.state == ExecState.BUSY:
            self.moves.move(ex, ExecState.IDLE, "task done")
            self.nodes.push_idle(ex)
            if done is not None and done.shape not in self.placement.queues:
                self._recall(done.shape)

    def _recall(self, shape) -> None:
        """An executor of ``shape`` went idle with nothing queued for it: take back the
        tasks waiting behind a long-running task on another executor (brokerd/window.py);
        they come back as REJECTs and run here."""
        placement = self.placement
        execs = placement.running.get(shape)
        if execs:
            for ex, task_ids in placement.runtimes.stalled(execs, self.moves.now):
                self.out.send(P.inbox_ident(ex.cid), P.encode(P.Recall(task_ids)))

    def _recall_idle(self) -> None:
        """(each liveness check) ``_recall`` for the shapes with nothing queued and an
        idle executor: the call that holds tasks behind it may have turned long only
        after that executor went idle."""
        queues = self.placement.queues
        for shape, execs in list(self.placement.running.items()):
            if shape not in queues and any(ex.state == ExecState.IDLE for ex in execs):
                self._recall(shape)

    def _requeue(self, task: Task, reason: str) -> None:
        task.executor = None
        self.moves.move(task, TaskState.QUEUED, reason)
        if task.kind == P.ACTOR_CALL:
            return  # the actor directory put it back at the front of the actor's queue
        self.placement.enqueue(task, front=True)

    def _finished(self, task: Task, state: TaskState, reason: str) -> None:
        self.moves.move(task, state, reason)
        self.tasks.pop(task.task_id, None)
        self.children.pop(task.task_id, None)
        if task.lineage:  # kept to rebuild its results: its arguments stay
            return
        pinned = task.deps + task.holds
        task.deps, task.holds = [], []
        for oid in pinned:
            self.objects.unpin(oid)
        task.frames = []

    def fail_task(self, task: Task, err_frames, state=TaskState.FAILED, reason: str = "") -> None:
        if task.state in (TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELLED):
            return
        if task.node is not None:
            self.nodes.release(task)
        if task.executor is not None and task in task.executor.ahead:
            task.executor.ahead.remove(task)
            self.placement.refill(task.executor)
        if task.actor is not None and task.kind == P.ACTOR_CALL:
            task.actor.inflight.pop(task.task_id, None)
        if task.spec.num_returns == P.STREAMING:
            self._finish_stream(task, err_frames, state, reason, failed=True)
            return
        woken = []
        for oid in task.returns:
            obj = self.objects.get(oid)
            if obj is not None and obj.state == ObjState.PENDING:
                woken += self.objects.ready(obj, P.ERROR, err_frames)
        self._finished(task, state, reason or state.value)
        if task.kind == P.ACTOR_CREATE:
            actor = task.actor
            if actor is not None and actor.state != ActorState.DEAD:
                self._settle(actor, self.actors.dead(
                    actor, "the actor could not be created: " + (reason or "it failed")))
        self._wake(woken)

    def finish_cancelled(self, task: Task) -> None:
        # Wrapped like an error raised by the task, so that `get` raises an error that is
        # both a TaskCancelledError and a RayTaskError wherever the cancel caught the task
        # (Ray raises the second for running actor calls, the seed's 3.2.4 relies on it).
        name = task.spec.name
        cause = exceptions.TaskCancelledError(
            task.task_id.hex(), f"Task {name} ({task.task_id.hex()}) was cancelled")
        self.fail_task(task, serialize_error(exceptions.RayTaskError(
            name, f"{name} was cancelled before it started", cause, 0, "")),
            TaskState.CANCELLED, "cancelled")

    # =============================================================== streams
    def stream_item(self, cid: bytes, m: P.Yield, frames) -> None:
        task = self.tasks.get(m.task_id)
        if (task is None or task.spec.num_returns != P.STREAMING or m.index < 1
                or task.executor is None or task.executor.cid != cid):
            return
        oid = P.object_id(m.task_id, m.index)
        obj = self.objects.create(oid, task.spec.owner)
        task.streamed = max(task.streamed, m.index)
        self.objects.contain(obj, m.nested, cid)
        self._wake(self.objects.ready(obj, m.kind, frames))

    def _finish_stream(self, task: Task, err_frames=None, state=TaskState.FINISHED,
                       reason: str = "stream ended", failed: bool = False) -> None:
        """End a stream: its error (if any) becomes its last item; its completion object
        gets None, or the error too when the task ``failed`` other than by raising (a
        crash, a cancel, a dead actor: Ray's completed() raises only then); then
        STREAM_END tells the owner how many items there are."""
        woken = []
        if err_frames is not None:
            task.streamed += 1
            obj = self.objects.create(P.object_id(task.task_id, task.streamed), task.spec.owner)
            woken += self.objects.ready(obj, P.ERROR, err_frames)
            if state == TaskState.FINISHED:
                state, reason = TaskState.FAILED, "raised"
        kind, frames = (P.ERROR, err_frames) if failed else (P.VALUE, _NONE_FRAMES)
        for oid in task.returns:
            obj = self.objects.get(oid)
            if obj is not None and obj.state == ObjState.PENDING:
                woken += self.objects.ready(obj, kind, frames)
        self.out.send(P.inbox_ident(task.spec.owner),
                      P.encode(P.StreamEnd(task.task_id, task.streamed)))
        self._finished(task, state, reason)
        self._wake(woken)

    # ========================================================= object input
    def put(self, cid: bytes, m: P.Put, frames) -> None:
        # A client puts only new objects of its own: ids it made (its cid starts them).
        if m.oid[:P.ID_LEN] != cid or m.oid in self.objects.objects:
            raise P.ProtocolError("PUT of an object id the sender does not own, or twice")
        if m.node_id is not None and (frames or m.node_id not in self.nodes.nodes):
            raise P.ProtocolError("PUT: a stored value names a live node and has no frames")
        obj = self.objects.create(m.oid, cid)
        self.objects.contain(obj, m.nested, cid)
        if m.node_id is not None:
            self.objects.add_location(obj, m.node_id, m.size)
        self._wake(self.objects.ready(obj, m.kind, frames, push_owner=False))

    # ================================================================ cancel
    def cancel(self, task_id: bytes, force: bool, recursive: bool) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            return
        if recursive:
            for child in list(self.children.get(task_id, ())):
                self.cancel(child, force, recursive)
        if task.state in _WAITING:
            if task.actor is not None and task.kind == P.ACTOR_CALL:
                try:
                    task.actor.queue.remove(task)
                except ValueError:
                    pass
            self.finish_cancelled(task)
        elif task.state == TaskState.ASSIGNED and task.executor is not None:
            ex = task.executor
            self.finish_cancelled(task)
            task.executor = None
            # Its EXEC may already sit in the executor's queue: tell it to skip it.
            self.out.send(P.inbox_ident(ex.cid), P.encode(P.Interrupt(task_id, False)))
        elif task.state == TaskState.RUNNING and task.executor is not None:
            task.cancel_requested = True
            ex = task.executor
            if force and task.kind == P.TASK:
                task.force_cancel = True
                self.out.send(ex.node.ident, P.encode(P.KillExec(ex.cid)))
            else:
                self.out.send(P.inbox_ident(ex.cid), P.encode(P.Interrupt(task_id, bool(force))))

    def block(self, cid: bytes, m: P.Block) -> None:
        """The task waits in get(): lend its CPU; take back its unstarted prefetches."""
        ex = self.executors.get(cid)
        if ex is None:
            return
        ex.blocked = True
        for tid in reversed(m.returned):  # (each goes to the front: the first ends first)
            self._unassign(ex, tid)
        if self.leases.by_exec and self.leases.lend(ex, True):
            return
        task = ex.task
        if task is not None and task.task_id == m.task_id:
            self.nodes.lend_cpu(task, True)

    def unblock(self, cid: bytes, m: P.Unblock) -> None:
        ex = self.executors.get(cid)
        if ex is None:
            return
        ex.blocked = False
        if self.leases.by_exec and self.leases.lend(ex, False):
            return
        task = ex.task
        if task is not None and task.task_id == m.task_id:
            self.nodes.lend_cpu(task, False)

    def reject(self, cid: bytes, m: P.Reject) -> None:
        """The executor handed back a task sent ahead, unstarted (it was blocked in get, or
        we RECALLed it)."""
        ex = self.executors.get(cid)
        if ex is None:
            return
        task = ex.task
        if (task is not None and task.task_id == m.task_id and task.state == TaskState.RUNNING
                and ex.state == ExecState.BUSY):
            # Recalled, but its turn had come here meanwhile (the DONE before it came
            # first): it never started. Queue it again; the executor runs what is next.
            self.nodes.release(task)
            self._requeue(task, "handed back unstarted by its executor")
            self._executor_next(ex)
            return
        self._unassign(ex, m.task_id)

    # ============================================================ executors
    def exec_died(self, node_id: bytes, cid: bytes, code: int) -> None:
        node = self.nodes.nodes.get(node_id)
        if cid in self.reaped:
            self.reaped.discard(cid)
            return
        ex = self.executors.get(cid)
        if ex is not None:
            if ex.node is node:
                self.executor_dead(ex, code)
            return
        if node is None:
            return
        # Dead before its HELLO was handled: a HELLO still on its way (another socket) is
        # refused, or a ghost executor would be given work (an actor's creation: hung).
        node.vouched.pop(cid, None)
        self.nodes.spawned(node)
        if node.actor_spawns:  # a process started for an actor died before READY
            if code >= 0:  # it failed to start; one killed by a signal (OOM killer, an
                node.spawn_failures += 1  # operator, chaos) says nothing of the node
            if node.spawn_failures <= MAX_SPAWN_FAILURES:
                self.nodes.request_spawn(node, for_actor=True)
            else:
                err = serialize_error(exceptions.RaySystemError(
                    f"node {node.node_id.hex()} cannot start executor processes "
                    f"(last exit code {code}); see its executor logs"))
                while node.actor_spawns:
                    self.fail_task(node.actor_spawns.popleft(), err, reason="no process")
        self.nodes.freed = True

    def executor_retired(self, cid: bytes) -> None:
        """A pool executor leaves on purpose (EXIT after its last DONE: ``max_calls``):
        not a crash. A task the broker had already given it (prefetched, or promoted to
        RUNNING when the last DONE came) never started there: it is queued again, its
        retries untouched. The node's EXEC_DIED for it is then ignored."""
        ex = self.executors.get(cid)
        if ex is None or ex.state == ExecState.DEAD or ex.actor is not None:
            return
        # (each goes to the front of its queue: the last sent first, the running one last)
        for task in (*reversed(ex.ahead), ex.task):
            if task is None or task.executor is not ex:
                continue
            if task.state == TaskState.RUNNING:
                self.nodes.release(task)
            elif task.state != TaskState.ASSIGNED:
                continue
            if task.cancel_requested:
                self.finish_cancelled(task)
            else:
                self._requeue(task, "its executor retired before it started")
        ex.task = None
        ex.ahead.clear()
        self.reaped.add(cid)
        self.executor_dead(ex, 0, reason=f"the executor process (pid {ex.pid}) retired "
                                         "after max_calls calls")

    def executor_unreachable(self, cid: bytes) -> None:
        ex = self.executors.get(cid)
        if ex is not None:
            self.executor_dead(ex, -1, reason="executor unreachable")

    def executor_dead(self, ex: Executor, code: int, reason: str = "") -> None:
        if ex.state == ExecState.DEAD:
            return
        prev = ex.state
        why = reason or f"the executor process (pid {ex.pid}) died with exit code {code}"
        self.moves.move(ex, ExecState.DEAD, why)
        self.placement.forget_executor(ex)
        if self.leases.by_exec:
            self.leases.executor_gone(ex)
        if ex.pushed:
            pushed_redeliver(self.objects, self.clients, ex)
        self._owner_gone(ex.cid, why)
        self.executors.pop(ex.cid, None)
        info = self.clients.pop(ex.cid, None)
        self.objects.drop_client(ex.cid, info.holds if info is not None else set(),
                                 info.handed if info is not None else ())
        node = ex.node
        node.executors.pop(ex.cid, None)
        if ex in node.idle:
            node.idle.remove(ex)
        if prev == ExecState.STARTING:
            self.nodes.spawned(node)
        task, ex.task = ex.task, None
        ahead, ex.ahead = ex.ahead, deque()
        for pre in reversed(ahead):  # (each to the front of its queue: the first stays first)
            if pre.state != TaskState.ASSIGNED:
                continue
            if pre.cancel_requested:
                self.finish_cancelled(pre)
            else:
                self._requeue(pre, "its executor died before it started")
        if ex.actor is not None:
            actor, ex.actor = ex.actor, None
            if actor.executor is not ex:
                # A stale process of the actor (a newer one runs it: e.g. an old process
                # re-vouched after a broker restart, or a death reported late): its death
                # must not restart the live incarnation or take its executor away.
                log.info("a stale process (pid %s) of actor %s died; %s", ex.pid,
                         actor.class_name, f"pid {actor.executor.pid} runs it"
                         if actor.executor is not None else "it is restarting or dead")
            else:
                if actor.create.node is not None:  # its resources come back, whatever next
                    self.nodes.release(actor.create)
                self._settle(actor, self.actors.process_died(actor, code, why))
        elif task is not None and task.state == TaskState.RUNNING:
            self.nodes.release(task)
            if task.cancel_requested:
                self.finish_cancelled(task)
            elif task.retries_left != 0:
                task.retries_left -= 1
                log.warning("%s: %s; retrying the task", task.spec.name, why)
                self._requeue(task, why)
            else:
                self.fail_task(task, serialize_error(exceptions.WorkerCrashedError(
                    f"Task {task.spec.name} failed: {why}. No retries left "
                    f"(max_retries={task.spec.options.get('max_retries', 0)}).")),
                    reason=why)
        self.nodes.freed = True

    # =============================================================== actors
    def _pump(self, actor: Actor) -> None:
        ex = actor.executor
        if ex is None:  # (no process hosts it now: its calls wait for the next creation)
            return
        for task in self.actors.next_calls(actor):
            self.moves.move(task, TaskState.RUNNING, "sent to its actor")
            task.executor = ex
            self._send_exec(task, ex)

    def _actor_created(self, task: Task, kind: int, frames, error: str) -> None:
        actor = task.actor
        self.tasks.pop(task.task_id, None)
        if kind == P.ERROR:
            self.moves.move(task, TaskState.FAILED, "constructor raised")
            actor.no_restart = True
            ex = actor.executor
            self._settle(actor, self.actors.dead(
                actor, "The actor's constructor raised:\n" + error))
            if ex is not None:
                self.out.send(ex.node.ident, P.encode(P.KillExec(ex.cid)))
            # Calls fail with the constructor's own error, as Ray's do.
            for oid in task.returns:
                obj = self.objects.get(oid)
                if obj is not None:
                    self._wake(self.objects.ready(obj, P.ERROR, frames))
            return
        self.moves.move(task, TaskState.FINISHED, "constructor returned")
        if (actor.executor is None and task.executor is not None
                and actor.state != ActorState.DEAD):
            # (its process's death was settled while the constructor ran there, yet the
            # process is alive and built it (seen in chaos_long: the calls hung on a
            # crash in _pump): it hosts the actor)
            actor.executor = task.executor
            task.executor.actor = actor
        self.actors.created(actor)
        woken = []
        for oid in task.returns:
            obj = self.objects.get(oid)
            if obj is not None:
                woken += self.objects.ready(obj, P.VALUE, frames)
        self._pump(actor)
        self._wake(woken)

    def _settle(self, actor: Actor, d: Death) -> None:
        """Apply what the actor directory decided about an actor's death or restart."""
        if d.restart:
            for task in d.fail:  # Ray: unavailable, not dead, while it restarts
                self.fail_task(task, serialize_error(exceptions.ActorUnavailableError(
                    f"The actor died while running {task.spec.name} and is restarting: "
                    f"{d.reason}. The call may or may not have run.",
                    actor.actor_id.hex())), reason="actor died")
            for task in d.retry:
                self._requeue(task, "actor restarting")
            create = actor.create
            create.executor = None
            self.tasks[create.task_id] = create
            for oid in create.returns:
                self.objects.ensure(oid, create.spec.owner)
            self._ready(create, "actor restarting")
            return
        if d.fail:
            err = serialize_error(exceptions.ActorDiedError(d.reason, actor.actor_id.hex()))
            for task in d.fail:
                self.fail_task(task, err, reason="actor died")
        if d.dead:
            packages, actor.packages = actor.packages, []
            for oid in packages:
                self.objects.unpin(oid)
            create = actor.create
            if create.state in _WAITING:
                self.moves.move(create, TaskState.FAILED, "actor died before it started")
                self.tasks.pop(create.task_id, None)
            if create.node is not None:
                self.nodes.release(create)

    def kill_actor(self, actor: Actor, no_restart: bool) -> None:
        self._settle(actor, self.actors.kill(actor, no_restart))

    def release_actors(self) -> None:
        """Actors whose every handle is gone end once their queued calls are done (as in
        Ray); the broker's loop calls this after each turn."""
        for actor_id in self.objects.take_released_actors():
            actor = self.actors.get(actor_id)
            if actor is None or actor.state == ActorState.DEAD or actor.detached:
                continue
            if actor.inflight or actor.queue:
                actor.exit_when_idle = True
            else:
                self._end_unreferenced(actor)

    def _end_unreferenced(self, actor: Actor) -> None:
        self._settle(actor, self.actors.kill(
            actor, no_restart=True, reason="The actor ended: every handle to it is gone."))

    def _owner_gone(self, cid: bytes, why: str) -> None:
        """Non-detached actors die with the process that created them (Ray's fate sharing)."""
        owner_gone(self, cid)  # and placement groups
        for actor in list(self.actors.actors.values()):
            if actor.owner == cid and not actor.detached and actor.state != ActorState.DEAD:
                self._settle(actor, self.actors.kill(
                    actor, no_restart=True, reason=f"The actor's owner died ({why})."))

    # ================================================================= logs
    def forward_log(self, m: P.Log) -> None:
        c = self.clients.get(m.driver)
        if c is not None and c.logs:  # (init(log_to_driver=False): not wanted)
            self.out.send(P.inbox_ident(m.driver), P.encode(P.Print(m.prefix, m.text)))

    def pending_calls(self, cid: bytes, actor_id: bytes) -> int:
        """How many calls client ``cid`` submitted to the actor are not finished yet
        (``max_pending_calls``; asked only when the caller's own count hits the limit)."""
        actor = self.actors.get(actor_id)
        if actor is None:
            return 0
        n = sum(1 for t in actor.queue if t.spec.owner == cid)
        return n + sum(1 for t in actor.inflight.values() if t.spec.owner == cid)


def _take_pristine(node: Node) -> Executor | None:
    """An idle pool executor of ``node`` that never ran anything (no function loaded, no
    runtime_env bound), taken off the pool; None if there is none. It is as fresh as a
    new process, only started already (an actor's creation then costs no start-up)."""
    idle = node.idle
    for i in range(len(idle) - 1, -1, -1):
        ex = idle[i]
        if ex.env is None and not ex.fns and ex.state == ExecState.IDLE and not ex.ahead:
            del idle[i]
            return ex
    return None


def _int(v) -> int:
    return v if type(v) is int else 0
