"""Surviving a broker restart: what is written down, what is rebuilt, who says hello again.

::

    running broker                                   restarted broker (same --state-dir)
    --------------                                   -----------------------------------
    actor registered/alive/restarted/dead --+        restore(): nodes   -> Node records, "reconnecting"
    node joined / left ---------------------+-> SQLite      jobs    -> engine.jobs
    job registered / gone ------------------+   (durable)   pgroups -> groups, bundles on their old
    group created/placed/rescheduled/removed+                          nodes (taken again on rejoin)
                                                            actors  -> creation tasks: awaiting their
                                                                       process, or queued again
    node agents, drivers, executors: their HEARTBEAT finds a broker that does not know them;
    it answers WELCOME{rehello} and they introduce themselves again (NODE_HELLO + EXEC_SPAWNED
    for their live processes; HELLO, then zray._reconnect replays the client's state)

What survives a restart (``zray broker --state-dir``; README "What survives a
broker restart"):

* **Nodes.** Loaded as *reconnecting* (no free resources, heartbeats not
  answered) until their agent says NODE_HELLO again, which a live agent does
  within about a heartbeat of the new broker's start. The same agent (same
  pid) keeps its store: objects in it stay where they are. A node not back
  within ``RESTART_GRACE_S`` is dead, as a silent node is: its objects are
  rebuilt from their lineage, which their owners handed back with their PUTs
  (LINEAGE, brokerd/relineage.py), or lost with an error saying why.
* **Actors** (named or not, detached or not), with their creation (class
  blob, spec, inline arguments: opaque bytes the broker never unpickles), the
  node and executor process hosting them, and their restart count. The
  process of an actor that is still running re-attaches when its node vouches
  for it again: the actor keeps its state, ``get_actor(name)`` finds it, calls
  go to it. An actor whose process is not back within ``RESTART_GRACE_S`` is
  restarted if its ``max_restarts`` allows (constructor run again), else it
  is dead with a clear ActorDiedError. A non-detached actor lives on only if
  its driver reconnects within the grace period, as Ray ends it with its job.
* **Jobs** (namespace, driver): a job whose driver is not back within the
  grace period is over, as if its driver had exited.
* **Placement groups** (id, bundles, strategy, name, namespace, lifetime,
  creator, job, state, bundle -> node). Restored before the actors that run
  in them, with their name (``get_placement_group`` finds them at once). A
  bundle's resources are taken on its node again when the node says
  NODE_HELLO (``node_saved``), before the processes of its members
  re-attach. A bundle whose node is not restored, or not back within the
  grace period, is placed again (RESCHEDULING, as for a node death); a group
  that is not detached is removed after the grace period if its creator has
  not reconnected. pg.ready() refs: their clients ask again (zray/_reconnect.py).

What does not survive (rebuilt by the clients themselves, zray/_reconnect.py):
the object directory (owners re-put what they hold: inline values with their
frames, stored ones by location; borrowers re-announce their refs), function
registrations, the task tables (each client resubmits its unfinished tasks
and actor calls, in order: at-least-once, a task or call that was running
when the broker died may run twice), pool executors (they exit; the node
starts fresh ones), the event log and the metrics.

Owns: the durable store's "nodes", "actors", "jobs" and "pgroups" tables, the
``awaiting`` map (executor cid -> creation task of the actor it hosted) and
``unreserved`` (node id -> restored bundles to take on it when it is back). The
engine calls its hooks; it moves tasks and actors only through the engine.
"""

from __future__ import annotations

import logging
import os
import time

from brokerd.durable import DurableStore
from brokerd.pgroups import PGState, remove_group
from brokerd.records import Actor, ActorState, ExecState, Executor, Node, TaskState
from zray import _protocol as P
from zray import exceptions
from zray._serialization import serialize_error

log = logging.getLogger("zray.broker")

# How long after a restart nodes, actor processes and drivers have to come back.
RESTART_GRACE_S = float(os.environ.get("ZRAY_RESTART_GRACE_S") or 15.0)


def _bytes(frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


class Recovery:
    """Writes the durable tables on their changes and rebuilds the broker from them."""

    def __init__(self, engine, store: DurableStore):
        self.engine = engine
        self.store = store
        self.loading = False  # restore() replays through the engine: no writes meanwhile
        self.awaiting: dict[bytes, object] = {}  # executor cid -> actor creation Task
        self.actor_cids: set = set()  # processes that hosted an actor before the restart
        self.deps_of: dict[bytes, bool] = {}  # actor id -> its creation had object args
        self.restored_jobs: set = set()  # job ids loaded, not yet re-registered
        self.deadline = 0.0  # monotonic time the grace period ends (0: none running)
        self.restored = {"nodes": 0, "actors": 0, "jobs": 0, "placement_groups": 0}
        self.unreserved: dict[bytes, list] = {}  # node id -> [(group, bundle index)] to take again
        self.restored_groups: list = []  # groups loaded that die with their creator
        engine.pgroups.durable = self

    # ---------------------------------------------------------------- writes
    def actor_saved(self, actor: Actor) -> None:
        if self.loading:
            return
        task = actor.create
        ex = actor.executor
        blob = self.engine.objects.fns.get(task.spec.fid)
        self.store.put("actors", actor.actor_id, {
            "header": P.encode(P.Submit(task.spec)),
            "frames": [_bytes(f) for f in task.frames],
            "cls": _bytes(blob) if blob is not None else b"",
            "node": ex.node.node_id if ex is not None else b"",
            "cid": ex.cid if ex is not None and actor.state == ActorState.ALIVE else b"",
            "restarts": actor.restarts,
        })

    def actor_gone(self, actor: Actor) -> None:
        self.store.delete("actors", actor.actor_id)

    def node_saved(self, node: Node) -> None:
        """A node joined (or, after a restart, came back: the placement group bundles
        it held are taken on it again, before its actors' processes re-attach)."""
        self.store.put("nodes", node.node_id, {
            "total": node.total, "gpus": [g for g, _ in node.gpus], "hostname": node.hostname,
            "pid": node.pid, "labels": node.labels, "address": node.address,
            "store_limit": node.store_limit})
        for pg, i in self.unreserved.pop(node.node_id, ()):
            self.engine.pgroups.reserve_again(node, pg, i)

    def node_gone(self, node: Node) -> None:
        self.store.delete("nodes", node.node_id)

    def job_saved(self, job_id: bytes, job: dict) -> None:
        self.restored_jobs.discard(job_id)
        if not self.loading:
            self.store.put("jobs", job_id, {"namespace": job["namespace"],
                                            "driver": job["driver"]})

    def job_gone(self, job_id: bytes) -> None:
        self.store.delete("jobs", job_id)

    def pg_saved(self, pg) -> None:
        if self.loading:
            return
        self.store.put("pgroups", pg.pg_id, {
            "bundles": pg.bundles, "strategy": pg.strategy, "name": pg.name,
            "namespace": pg.namespace, "lifetime": pg.lifetime or "", "owner": pg.owner,
            "job": pg.job, "state": pg.state.value,
            "nodes": [n if n is not None else b"" for n in pg.nodes],
            "created_at": pg.created_at})

    def pg_gone(self, pg) -> None:
        self.store.delete("pgroups", pg.pg_id)

    # --------------------------------------------------------------- restore
    def restore(self) -> dict:
        """Rebuild nodes, jobs, placement groups and actors from the durable tables.
        Returns the counts."""
        engine = self.engine
        self.loading = True
        now = time.monotonic()
        try:
            for node_id, rec in self.store.load("nodes").items():
                try:
                    node = self._node(node_id, rec, now)
                except (TypeError, ValueError, AttributeError):
                    log.warning("skipping an unreadable node record %s", node_id.hex())
                    self.store.delete("nodes", node_id)
                    continue
                engine.nodes.nodes[node_id] = node
                self.restored["nodes"] += 1
            for job_id, rec in self.store.load("jobs").items():
                engine.jobs[job_id] = {"namespace": str(rec.get("namespace", "")),
                                       "driver": bytes(rec.get("driver", b""))}
                self.restored_jobs.add(job_id)
                self.restored["jobs"] += 1
            for pg_id, rec in self.store.load("pgroups").items():  # (before their actors)
                try:
                    self._group(pg_id, rec)
                except (TypeError, ValueError, KeyError, AttributeError):
                    log.exception("skipping an unreadable placement group record %s",
                                  pg_id.hex())
                    self.store.delete("pgroups", pg_id)
                    continue
                self.restored["placement_groups"] += 1
            for actor_id, rec in self.store.load("actors").items():
                try:
                    ok = self._actor(actor_id, rec)
                except (P.ProtocolError, TypeError, ValueError, KeyError, AttributeError):
                    log.exception("skipping an unreadable actor record %s", actor_id.hex())
                    ok = False
                if ok:
                    self.restored["actors"] += 1
                else:
                    self.store.delete("actors", actor_id)
        finally:
            self.loading = False
        if any(self.restored.values()):
            self.deadline = now + RESTART_GRACE_S
            # The containment that proved borrowed refs is gone: clients' word for it.
            engine.access.trust_until = self.deadline
            log.warning("restored from %s: %d nodes, %d actors, %d jobs, %d placement groups; "
                        "waiting up to %.0fs for them to reconnect", self.store.path,
                        self.restored["nodes"], self.restored["actors"],
                        self.restored["jobs"], self.restored["placement_groups"],
                        RESTART_GRACE_S)
        return dict(self.restored)

    def _node(self, node_id: bytes, rec: dict, now: float) -> Node:
        total = {str(k): int(v) for k, v in dict(rec["total"]).items()}
        node = Node(node_id, P.node_ident(node_id), total, {},
                    [[g, P.UNIT] for g in rec.get("gpus", [])], str(rec.get("hostname", "")),
                    int(rec.get("pid", 0)), dict(rec.get("labels") or {}),
                    str(rec.get("address", "")))
        node.store_limit = int(rec.get("store_limit", 0))
        node.reconnecting = True
        # Declared dead by the usual liveness check if not back within the grace period.
        node.last_seen = now + max(0.0, RESTART_GRACE_S - P.NODE_TIMEOUT_S)
        return node

    def _group(self, pg_id: bytes, rec: dict) -> None:
        """A placement group as it was: its name taken, its bundles placed on the nodes
        they were on (taken there again when the node is back: ``node_saved``)."""
        engine = self.engine
        table = engine.pgroups
        state = PGState(rec["state"])
        nodes, owner, job = rec["nodes"], rec["owner"], rec["job"]
        if (type(nodes) is not list or not all(type(n) is bytes for n in nodes)
                or type(owner) is not bytes or type(job) is not bytes):
            raise TypeError("nodes, owner and job must be bytes")
        nodes = [n or None for n in nodes]
        bundles = rec["bundles"]
        if state == PGState.REMOVED or type(bundles) is not list or len(nodes) != len(bundles):
            raise ValueError("a removed group, or one whose bundles and nodes differ")
        created_at = float(rec.get("created_at", 0.0))
        lifetime = rec.get("lifetime") or None
        # (every other field is checked by create(), as for a pg_create request)
        pg = table.create(pg_id, bundles, rec["strategy"], rec.get("name", ""),
                          rec.get("namespace", ""), lifetime, owner, job)
        pg.created_at = created_at
        for i, node_id in enumerate(nodes):
            if node_id is not None and node_id in engine.nodes.nodes:
                pg.nodes[i] = node_id
                self.unreserved.setdefault(node_id, []).append((pg, i))
        if all(n is not None for n in pg.nodes):
            pg.state = PGState.CREATED
            del table.pending[pg_id]
        elif any(n is not None for n in pg.nodes) or state != PGState.PENDING:
            pg.state = PGState.RESCHEDULING  # a node it was on is gone: placed again
        if pg.lifetime != "detached":
            self.restored_groups.append(pg)

    def _actor(self, actor_id: bytes, rec: dict) -> bool:
        engine = self.engine
        m = P.decode(bytes(rec["header"]))
        if m.TYPE != P.Msg.SUBMIT or m.spec.kind != P.ACTOR_CREATE:
            return False
        spec = m.spec
        if spec.task_id in engine.tasks or spec.actor_id != actor_id:
            return False
        cls = bytes(rec.get("cls") or b"")
        if cls:
            engine.objects.fns.setdefault(spec.fid, cls)
        had_deps = bool(spec.deps or spec.nested)
        cid = bytes(rec.get("cid") or b"")
        if had_deps:
            if not cid:  # not built yet, and its object arguments are gone with the old broker
                return False
            # Alive: its arguments were used already; a restart could not rebuild them.
            spec = spec._replace(deps=[], nested=[])
            m = P.Submit(spec)
        self.deps_of[actor_id] = had_deps
        frames = [bytes(f) for f in rec.get("frames", [])]
        engine.submit(spec.owner, m, frames, None)
        task = engine.tasks.get(spec.task_id)
        actor = engine.actors.get(actor_id)
        if task is None or actor is None:
            return False
        actor.restarts = int(rec.get("restarts", 0))
        if cid and task.state == TaskState.QUEUED:
            # Its process may still be running: hold the creation until it says HELLO.
            q = engine.placement.queues.get(task.shape)
            if q is not None and task in q:
                q.remove(task)
            self.awaiting[cid] = task
            self.actor_cids.add(cid)
        return True

    # ------------------------------------------------------------ reconnects
    def node_back(self, old: Node, info: dict) -> bool:
        """A reconnecting node said NODE_HELLO again. True: it is the same agent (its
        store and processes live on); the engine then joins it afresh, keeping the
        store accounting."""
        return info.get("pid") == old.pid

    def reattach(self, ex: Executor) -> None:
        """An executor said HELLO (vouched for by its node): if it hosted an actor before
        the restart, it hosts it again, state and all."""
        task = self.awaiting.pop(ex.cid, None)
        if task is None:
            if ex.cid in self.actor_cids:  # back too late: its actor was restarted or died
                self.actor_cids.discard(ex.cid)
                self.engine.out.send(ex.node.ident, P.encode(P.KillExec(ex.cid)))
            return
        self.actor_cids.discard(ex.cid)
        engine = self.engine
        actor = task.actor
        if actor is None or actor.state == ActorState.DEAD or task.state != TaskState.QUEUED:
            return
        engine.nodes.acquire(task, ex.node)
        engine.moves.move(task, TaskState.RUNNING, "its process re-attached",
                          ex.node.node_id)
        engine.moves.move(ex, ExecState.ACTOR, "hosts an actor (re-attached)")
        ex.actor = actor
        actor.executor = ex
        task.executor = ex
        ex.task = task
        engine._actor_created(task, P.VALUE, [], "")
        log.info("actor %s (%s) re-attached to its process %s", actor.class_name,
                 actor.actor_id.hex(), ex.cid.hex())

    def tick(self, now: float) -> None:
        """After the grace period: actors whose process did not come back restart or
        die; jobs whose driver did not come back end."""
        if not self.deadline or now < self.deadline:
            return
        self.deadline = 0.0
        engine = self.engine
        awaiting, self.awaiting = self.awaiting, {}
        for task in awaiting.values():
            actor = task.actor
            if actor is None or actor.state == ActorState.DEAD or task.state != TaskState.QUEUED:
                continue
            can = (not actor.no_restart and not self.deps_of.get(actor.actor_id)
                   and (actor.max_restarts == -1 or actor.restarts < actor.max_restarts))
            if can:
                actor.restarts += 1
                engine.moves.move(actor, ActorState.RESTARTING,
                                  "its process did not come back after a broker restart")
                self.actor_saved(actor)
                engine.placement.enqueue(task)
                log.warning("actor %s: its process did not come back after the broker "
                            "restart; restarting it", actor.class_name)
            else:
                why = ("its process did not come back after the broker restarted"
                       + (" and it cannot be restarted (max_restarts)" if not
                          self.deps_of.get(actor.actor_id) else
                          " and its constructor's object arguments did not survive"))
                engine.fail_task(task, serialize_error(exceptions.ActorDiedError(
                    f"The actor died: {why}.", actor.actor_id.hex())), reason=why)
        self.unreserved.clear()  # (those nodes are dead: their bundles are placed again)
        groups, self.restored_groups = self.restored_groups, []
        for pg in groups:
            if pg.state != PGState.REMOVED and pg.owner not in engine.clients:
                remove_group(engine, pg, "removed: its creator did not come back after the "
                                         "broker restart")
        for job_id in list(self.restored_jobs):
            job = engine.jobs.get(job_id)
            if job is None:
                continue
            driver = engine.clients.get(job["driver"])
            if driver is None:
                log.warning("job %s: its driver did not reconnect after the broker restart",
                            job_id.hex())
                engine.job_over(job_id)
        self.restored_jobs.clear()
