"""Placement groups: bundles of resources reserved on nodes, and the tasks that run in them.

::

    REQ pg_create --create()--> PlacementGroup PENDING --schedule(): every bundle fits--> CREATED
                                      ^                                                     |
                                      +---- RESCHEDULING <-- a node holding bundles died ---+
    REQ pg_remove --remove()--> REMOVED (members killed, reservation given back)
    REQ pg_ready  --> an object the broker resolves (the PlacementGroup) once CREATED

Reservation is all or nothing. A pass plans every missing bundle of a group
against a scratch copy of the nodes' free resources (phase one: nothing is
taken), and only when the whole plan fits does it commit every bundle (phase
two). The broker is the only owner of the nodes' resource accounting (node
agents keep none), so the commit is one step: no other decision can see half
a group.

A committed bundle ``i`` of group ``G`` on node ``n`` takes its resources out
of ``n``'s free resources and gives ``n`` new ones, Ray's names:
``<R>_group_<i>_<G>`` and ``<R>_group_<G>`` for each resource R of the bundle,
and ``bundle_group_<i>_<G>``, ``bundle_group_<G>`` (1000 each). A task or actor
with a PlacementGroupSchedulingStrategy asks for the group's resources
instead of its own (``task_resources``: ``<R>_group_<G>``, and with a bundle
index also ``<R>_group_<i>_<G>``) plus 0.001 of the bundle resource, so that
members with and without an index share one count per node and never
overdraw what the group holds there; the ordinary placement
pass (brokerd/placement.py) runs it where its bundle is, and it waits while the
group is pending.

Strategies: PACK (as few nodes as possible, best effort), SPREAD (distinct
nodes, best effort), STRICT_PACK (one node), STRICT_SPREAD (each bundle on
its own node). A group no set of live nodes could ever hold (judged on their
total resources) is infeasible: it waits, is logged once and is listed by
``zray status``, like an infeasible task.

Owns: ``groups`` (PlacementGroup records: plain data, ids, bundles, strategy,
name, lifetime, state, bundle -> node id, stored as rows of the durable
"pgroups" table through ``durable`` (brokerd/restart.py) when the broker has a
state dir: on create, placement, reschedule and remove, never per task),
``named`` and ``pending``. Writes node resources (total and free) for the
bundles it commits and gives back. The engine glue at the end (``remove_group``,
``resolve_ready``, ``owner_gone``) kills members on removal, resolves the
objects of ``pg.ready()``, and removes groups that are not detached when their
creator (a driver, or the task or actor that made them) is gone. The REQ
handlers (``PlacementGroupQueries``: pg_create, pg_remove, pg_ready, pg_table,
pg_get, demand) are mixed into brokerd/queries.py.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from brokerd.nodes import NodeTable
from brokerd.records import ActorState, ExecState, ObjState, TaskState
from zray import _protocol as P
from zray import exceptions
from zray._serialization import serialize, serialize_error

log = logging.getLogger("zray.broker")

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PG_ID_LEN = 18  # Ray's PlacementGroupID size
MAX_BUNDLES = 10000
BUNDLE = "bundle"  # the resource every bundle offers, and every member asks 0.001 of
BUNDLE_UNITS = 1000 * P.UNIT
MEMBER_UNITS = P.UNIT // 1000  # 0.001 of the bundle resource
MAX_REMOVED_KEPT = 1000  # removed groups placement_group_table() still shows


class PGState(enum.Enum):
    PENDING = "PENDING"
    CREATED = "CREATED"
    RESCHEDULING = "RESCHEDULING"
    REMOVED = "REMOVED"


@dataclass(eq=False)
class PlacementGroup:
    pg_id: bytes
    bundles: list  # [{resource: units}, ...]
    strategy: str
    name: str = ""
    namespace: str = ""
    lifetime: Optional[str] = None  # "detached" or None (fate-shares with its creator)
    owner: bytes = b""  # cid of the creator
    job: bytes = b""
    state: PGState = PGState.PENDING
    nodes: list = field(default_factory=list)  # bundle index -> node id (None: not placed)
    created_at: float = 0.0
    waiters: list = field(default_factory=list)  # oids of pg.ready() refs not resolved yet
    infeasible: bool = False


def group_resource(r: str, pg_hex: str, index: int = -1) -> str:
    return f"{r}_group_{pg_hex}" if index < 0 else f"{r}_group_{index}_{pg_hex}"


class PlacementGroupTable:
    def __init__(self, nodes: NodeTable):
        self.nodes = nodes
        self.groups: dict[bytes, PlacementGroup] = {}
        self.named: dict[tuple, bytes] = {}  # (namespace, name) -> pg id
        self.pending: dict[bytes, PlacementGroup] = {}  # waiting for nodes, oldest first
        self.removed: deque = deque()  # ids of removed groups, still listed (a bounded number)
        self.newly_infeasible: list = []  # groups to tell their driver about (once each)
        # brokerd.restart.Recovery when the broker has a state dir: a group's record is
        # written when it is created, placed, loses bundles with a node, or is removed.
        self.durable = None

    def _saved(self, pg: PlacementGroup) -> None:
        if self.durable is not None:
            self.durable.pg_saved(pg)

    # ------------------------------------------------------------- requests
    def create(self, pg_id, bundles, strategy, name, namespace, lifetime, owner: bytes,
               job: bytes) -> PlacementGroup:
        """A new group, checked field by field (a bad one raises ValueError)."""
        if type(pg_id) is not bytes or len(pg_id) != PG_ID_LEN:
            raise ValueError("pg_create: pg_id must be bytes of length %d" % PG_ID_LEN)
        if pg_id in self.groups:
            raise ValueError(f"placement group {pg_id.hex()} exists already")
        if type(bundles) is not list or not 0 < len(bundles) <= MAX_BUNDLES:
            raise ValueError("pg_create: bundles must be a non-empty list")
        for b in bundles:
            if (type(b) is not dict or not b or not all(
                    type(k) is str and 0 < len(k) <= 256 and type(v) is int and v >= 0
                    for k, v in b.items()) or not any(b.values())):
                raise ValueError("pg_create: a bundle must map resource names to units, "
                                 "not all 0")
        if strategy not in STRATEGIES:
            raise ValueError(f"pg_create: strategy must be one of {STRATEGIES}")
        if type(name) is not str or len(name) > 1024 or type(namespace) is not str \
                or len(namespace) > 1024:
            raise ValueError("pg_create: name and namespace must be short strings")
        if lifetime not in (None, "detached"):
            raise ValueError("pg_create: lifetime must be None or 'detached'")
        if name and (namespace, name) in self.named:
            raise ValueError(f"Placement group with name {name!r} already exists in "
                             f"namespace {namespace!r}")
        pg = PlacementGroup(pg_id, [dict(b) for b in bundles], strategy, name, namespace,
                            lifetime, owner, job, nodes=[None] * len(bundles),
                            created_at=time.time())
        self.groups[pg_id] = pg
        if name:
            self.named[(namespace, name)] = pg_id
        self.pending[pg_id] = pg
        self._saved(pg)
        return pg

    def lookup(self, name: str, namespace: str) -> Optional[PlacementGroup]:
        pg_id = self.named.get((namespace, name))
        return self.groups.get(pg_id) if pg_id is not None else None

    def remove(self, pg: PlacementGroup) -> None:
        """Give every committed bundle back (the engine has killed the members first)."""
        if pg.state == PGState.REMOVED:
            return
        pg.state = PGState.REMOVED
        self.pending.pop(pg.pg_id, None)
        if pg.name and self.named.get((pg.namespace, pg.name)) == pg.pg_id:
            del self.named[(pg.namespace, pg.name)]
        for i, node_id in enumerate(pg.nodes):
            node = self.nodes.nodes.get(node_id) if node_id is not None else None
            if node is not None and not node.reconnecting:  # (reconnecting: not re-taken yet)
                self._give_back(node, pg, i)
            pg.nodes[i] = None
        self.nodes.freed = True
        if self.durable is not None:
            self.durable.pg_gone(pg)
        self.removed.append(pg.pg_id)
        while len(self.removed) > MAX_REMOVED_KEPT:
            self.groups.pop(self.removed.popleft(), None)

    def owned_by(self, cid: bytes) -> list:
        """The groups that fate-share with client ``cid`` (not detached, not removed)."""
        return [pg for pg in self.groups.values()
                if pg.owner == cid and pg.lifetime != "detached" and pg.state != PGState.REMOVED]

    # ------------------------------------------------------------ membership
    def node_lost(self, node_id: bytes) -> list:
        """A node died: the bundles it held are placed again (RESCHEDULING)."""
        hit = []
        for pg in self.groups.values():
            if pg.state == PGState.REMOVED or node_id not in pg.nodes:
                continue
            pg.nodes = [None if n == node_id else n for n in pg.nodes]
            pg.state = PGState.RESCHEDULING
            self.pending[pg.pg_id] = pg
            hit.append(pg)
            self._saved(pg)
            log.warning("placement group %s lost bundles with node %s: rescheduling them",
                        pg.pg_id.hex(), node_id.hex())
        return hit

    # ------------------------------------------------------------ scheduling
    def schedule(self) -> list:
        """Try every waiting group, oldest first; returns the groups now CREATED."""
        done = []
        for pg in list(self.pending.values()):
            plan = self._plan(pg, use_total=False)
            if plan is None:
                if not pg.infeasible and self._plan(pg, use_total=True) is None:
                    pg.infeasible = True
                    self.newly_infeasible.append(pg)
                    log.warning("placement group %s (%s, bundles %s) cannot be placed on "
                                "the nodes in the cluster: it waits for nodes to join",
                                pg.pg_id.hex(), pg.strategy,
                                [P.from_units(b) for b in pg.bundles])
                continue
            for i, node in plan.items():  # phase two: commit every bundle at once
                self._take(node, pg, i)
                pg.nodes[i] = node.node_id
            pg.state = PGState.CREATED
            pg.infeasible = False
            del self.pending[pg.pg_id]
            self.nodes.freed = True
            self._saved(pg)
            done.append(pg)
        return done

    def _plan(self, pg: PlacementGroup, use_total: bool) -> Optional[dict]:
        """Phase one: {bundle index: node} for every bundle not placed yet, or None.
        Checked against a scratch copy of free (or, ``use_total``, total) resources."""
        alive = [n for n in self.nodes.nodes.values() if n.alive]
        missing = [i for i, nid in enumerate(pg.nodes) if nid is None]
        if use_total:
            missing = list(range(len(pg.bundles)))
        placed = {} if use_total else {nid for nid in pg.nodes if nid is not None}
        scratch: dict = {}

        def free(n):
            a = scratch.get(n.node_id)
            return a if a is not None else (n.total if use_total else n.avail)

        def fits(n, need):
            a = free(n)
            return all(a.get(r, 0) >= u for r, u in need.items())

        def take(n, need):
            a = scratch.get(n.node_id)
            if a is None:
                a = scratch[n.node_id] = dict(n.total if use_total else n.avail)
            for r, u in need.items():
                a[r] = a.get(r, 0) - u

        bundles = pg.bundles
        plan: dict = {}
        s = pg.strategy
        if s in ("STRICT_PACK", "PACK"):
            whole: dict = {}
            for i in missing:
                for r, u in bundles[i].items():
                    whole[r] = whole.get(r, 0) + u
            pool = [n for n in alive if n.node_id in placed] if placed else alive
            if s == "STRICT_PACK" and placed and not pool:
                return None
            # One node for all of them: the one left least free (best fit), used ones first.
            best = None
            for n in pool:
                if fits(n, whole):
                    slack = sum(free(n).get(r, 0) - u for r, u in whole.items())
                    if best is None or slack < best[0]:
                        best = (slack, n)
            if best is not None:
                return {i: best[1] for i in missing}
            if s == "STRICT_PACK":
                return None
            # PACK, best effort: fill the nodes already used, then the freest ones.
            order = sorted(alive, key=lambda n: (n.node_id not in placed,
                                                 -sum(free(n).values())))
            for i in missing:
                for n in order:
                    if fits(n, bundles[i]):
                        take(n, bundles[i])
                        plan[i] = n
                        break
                else:
                    return None
            return plan
        # SPREAD / STRICT_SPREAD: each bundle on the node holding fewest of the group.
        count: dict = {}
        for nid in pg.nodes if not use_total else ():
            if nid is not None:
                count[nid] = count.get(nid, 0) + 1
        for i in missing:
            best = None
            for n in alive:
                c = count.get(n.node_id, 0)
                if s == "STRICT_SPREAD" and c:
                    continue
                if fits(n, bundles[i]):
                    key = (c, -sum(free(n).values()))
                    if best is None or key < best[0]:
                        best = (key, n)
            if best is None:
                return None
            n = best[1]
            take(n, bundles[i])
            count[n.node_id] = count.get(n.node_id, 0) + 1
            plan[i] = n
        return plan

    def reserve_again(self, node, pg: PlacementGroup, i: int) -> None:
        """After a broker restart: bundle ``i``, placed on ``node`` before it, is taken
        there again now that the node is back (its members run on)."""
        if pg.state != PGState.REMOVED and pg.nodes[i] == node.node_id:
            self._take(node, pg, i)
            self.nodes.freed = True

    def _take(self, node, pg: PlacementGroup, i: int) -> None:
        self.nodes.changed.add(node)
        h = pg.pg_id.hex()
        total, avail = node.total, node.avail
        for r, u in pg.bundles[i].items():
            avail[r] = avail.get(r, 0) - u
        for r, u in list(pg.bundles[i].items()) + [(BUNDLE, BUNDLE_UNITS)]:
            for key in (group_resource(r, h, i), group_resource(r, h)):
                total[key] = total.get(key, 0) + u
                avail[key] = avail.get(key, 0) + u

    def _give_back(self, node, pg: PlacementGroup, i: int) -> None:
        self.nodes.changed.add(node)
        h = pg.pg_id.hex()
        total, avail = node.total, node.avail
        for r, u in pg.bundles[i].items():
            avail[r] = avail.get(r, 0) + u
        for r, u in list(pg.bundles[i].items()) + [(BUNDLE, BUNDLE_UNITS)]:
            for key in (group_resource(r, h, i), group_resource(r, h)):
                left = total.get(key, 0) - u
                if left > 0:
                    total[key] = left
                    avail[key] = avail.get(key, 0) - u
                else:
                    total.pop(key, None)
                    avail.pop(key, None)

    # ------------------------------------------------------------- members
    def task_resources(self, strategy: dict, resources: dict) -> dict:
        """What a member of a group asks for: its resources renamed to the group's (of
        its bundle, or of any bundle) plus 0.001 of the bundle resource. Raises
        ValueError naming the problem (unknown or removed group, bad index, a shape no
        bundle can hold)."""
        pg_id, index = strategy.get("pg_id"), strategy.get("bundle_index", -1)
        if type(pg_id) is not bytes or type(index) is not int or type(
                strategy.get("capture", False)) is not bool:
            raise P.ProtocolError("SUBMIT: a placement_group strategy needs pg_id (bytes), "
                                  "bundle_index (int) and capture (bool)")
        pg = self.groups.get(pg_id)
        if pg is None or pg.state == PGState.REMOVED:
            raise LookupError(f"placement group {pg_id.hex()} does not exist or was removed")
        if not -1 <= index < len(pg.bundles):
            raise ValueError(f"placement group bundle index {index} is invalid: valid "
                             f"indexes are -1 and 0-{len(pg.bundles) - 1}")
        candidates = pg.bundles if index < 0 else [pg.bundles[index]]
        if not any(all(b.get(r, 0) >= u for r, u in resources.items()) for b in candidates):
            raise ValueError(f"the resource request {P.from_units(resources)} cannot fit "
                             f"into {'any bundle' if index < 0 else f'bundle {index}'} of "
                             f"placement group {pg_id.hex()}")
        h = pg_id.hex()
        out = {}
        for r, u in list(resources.items()) + [(BUNDLE, MEMBER_UNITS)]:
            if u > 0:
                out[group_resource(r, h)] = u  # the node's share of the whole group
                if index >= 0:  # and of its bundle: both count, so neither is overdrawn
                    out[group_resource(r, h, index)] = u
        return out

    # ---------------------------------------------------------------- views
    def row(self, pg: PlacementGroup) -> dict:
        """A group as Ray's placement_group_table() shows it."""
        return {
            "placement_group_id": pg.pg_id.hex(), "name": pg.name, "namespace": pg.namespace,
            "bundles": {i: P.from_units(b) for i, b in enumerate(pg.bundles)},
            "bundles_to_node_id": {i: n.hex() for i, n in enumerate(pg.nodes) if n is not None},
            "strategy": pg.strategy, "state": pg.state.value,
            "is_detached": pg.lifetime == "detached", "infeasible": pg.infeasible,
            "stats": {"scheduling_state": "INFEASIBLE" if pg.infeasible else (
                "FINISHED" if pg.state == PGState.CREATED else pg.state.value)},
        }


def pg_strategy(opts: dict) -> Optional[dict]:
    """A task's placement-group strategy from its options, or None."""
    s = opts.get("strategy")
    if type(s) is dict and s.get("type") == "placement_group":
        return s
    return None


# ---------------------------------------------------------------- engine glue
# What the engine does for placement groups: called from TaskEngine's hooks
# (schedule, node_dead, driver_gone, _owner_gone) and from the REQ handlers.

def resolve_ready(engine, pg: PlacementGroup, error: Optional[str] = None) -> None:
    """pg.ready() refs become ready: the PlacementGroup (or, removed first, an error)."""
    from zray.util.placement_group import PlacementGroup as ClientPG  # (its pickle only)

    if not pg.waiters:
        return
    if error is None:
        kind, frames = P.VALUE, serialize(ClientPG(pg.pg_id.hex(), [
            P.from_units(b) for b in pg.bundles]))[0]
    else:
        kind, frames = P.ERROR, serialize_error(exceptions.RaySystemError(error))
    waiters, pg.waiters = pg.waiters, []
    for oid in waiters:
        obj = engine.objects.get(oid)
        if obj is not None and obj.state == ObjState.PENDING:
            engine._wake(engine.objects.ready(obj, kind, frames))


def schedule_groups(engine) -> None:
    table = engine.pgroups
    for pg in table.schedule():
        resolve_ready(engine, pg)
    for pg in table.newly_infeasible:  # reported like infeasible tasks: to its driver, once
        driver = (engine.jobs.get(pg.job) or {}).get("driver")
        c = engine.clients.get(driver) if driver is not None else None
        if c is not None and c.logs:
            engine.out.send(P.inbox_ident(driver), P.encode(P.Print("(scheduler)!", (
                f"Warning: placement group {pg.name or pg.pg_id.hex()} ({pg.strategy}, "
                f"bundles {[P.from_units(b) for b in pg.bundles]}) cannot be placed on the "
                "nodes in the cluster. It is infeasible for now and waits until nodes that "
                "fit join (`zray status` lists it)."))))
    table.newly_infeasible = []


def remove_group(engine, pg: PlacementGroup, why: str = "removed") -> None:
    """Remove a group as Ray does: its tasks fail with TaskPlacementGroupRemoved (running
    ones are killed), its actors die, then its reservation is given back."""

    if pg.state == PGState.REMOVED:
        return
    log.info("placement group %s %s", pg.pg_id.hex(), why)
    err = serialize_error(exceptions.TaskPlacementGroupRemoved(
        "The placement group corresponding to this task has been removed."))
    for task in list(engine.tasks.values()):
        s = pg_strategy(task.spec.options)
        if s is None or s.get("pg_id") != pg.pg_id or task.kind == P.ACTOR_CALL:
            continue
        if task.kind == P.ACTOR_CREATE:
            continue  # below, with the live actors
        ex = task.executor
        running = task.state == TaskState.RUNNING and ex is not None
        engine.fail_task(task, err, reason="placement group removed")
        if running:
            engine.out.send(ex.node.ident, P.encode(P.KillExec(ex.cid)))
    for actor in list(engine.actors.actors.values()):
        s = pg_strategy(actor.create.spec.options)
        if s is None or s.get("pg_id") != pg.pg_id or actor.state == ActorState.DEAD:
            continue
        ex = actor.executor
        engine._settle(actor, engine.actors.kill(
            actor, no_restart=True,
            reason="The placement group corresponding to this Actor has been removed."))
        if ex is not None and ex.state != ExecState.DEAD:
            engine.out.send(ex.node.ident, P.encode(P.KillExec(ex.cid)))
    resolve_ready(engine, pg, f"placement group {pg.pg_id.hex()} was removed before it "
                              "was ready")
    engine.pgroups.remove(pg)


def owner_gone(engine, cid: bytes) -> None:
    """Groups that are not detached die with the driver or actor that created them."""
    for pg in engine.pgroups.owned_by(cid):
        remove_group(engine, pg, "removed: its creator exited")


class PlacementGroupQueries:
    """REQ handlers for placement groups (mixed into brokerd.queries.Queries)."""

    def _pg_client(self, cid, write: bool):
        c = self.engine.clients.get(cid)
        if c is None or (write and c.kind not in ("driver", "executor")):
            raise PermissionError("only drivers, tasks and actors create or remove "
                                  "placement groups")
        return c

    def req_pg_create(self, cid, args):
        c = self._pg_client(cid, True)
        e = self.engine
        owner, job = cid, c.job_id
        ex = e.executors.get(cid)
        if ex is not None and ex.actor is None and ex.task is not None:
            # Made by a task: it belongs to the task's job, and dies with its driver.
            job = ex.task.spec.job
            owner = (e.jobs.get(job) or {}).get("driver", cid)
        pg = e.pgroups.create(
            args.get("pg_id"), args.get("bundles"), args.get("strategy"),
            args.get("name", ""), args.get("namespace", ""), args.get("lifetime"),
            owner, job)
        e.placement.dirty = True  # a pass soon places it
        return pg.pg_id

    def _pg(self, args) -> PlacementGroup:
        pg_id = args.get("pg_id")
        if type(pg_id) is not bytes or len(pg_id) != PG_ID_LEN:
            raise ValueError("pg_id must be bytes of length %d" % PG_ID_LEN)
        pg = self.engine.pgroups.groups.get(pg_id)
        if pg is None:
            raise ValueError(f"placement group {pg_id.hex()} does not exist")
        return pg

    def req_pg_remove(self, cid, args):
        self._pg_client(cid, True)
        remove_group(self.engine, self._pg(args))
        return True

    def req_pg_ready(self, cid, args):
        """Make object ``oid`` (an id of the caller's own) the ready ref of a group."""
        self._pg_client(cid, True)
        oid = args.get("oid")
        e = self.engine
        if (type(oid) is not bytes or len(oid) != P.OBJECT_ID_LEN or oid[:P.ID_LEN] != cid
                or oid in e.objects.objects):
            raise ValueError("pg_ready: oid must be a new object id of the caller's")
        obj = e.objects.create(oid, cid)
        try:
            pg = self._pg(args)
        except ValueError as err:  # the caller does not wait for this reply: fail the ref
            e._wake(e.objects.ready(obj, P.ERROR, serialize_error(
                exceptions.RaySystemError(str(err)))))
            raise
        pg.waiters.append(oid)
        if pg.state in (PGState.CREATED, PGState.RESCHEDULING):
            resolve_ready(e, pg)
        elif pg.state == PGState.REMOVED:
            resolve_ready(e, pg, f"placement group {pg.pg_id.hex()} was removed")
        return True

    def req_pg_table(self, cid, args):
        self._pg_client(cid, False)
        t = self.engine.pgroups
        if args.get("pg_id") is not None:
            return t.row(self._pg(args))
        return {pg.pg_id.hex(): t.row(pg) for pg in t.groups.values()}

    def req_pg_get(self, cid, args):
        self._pg_client(cid, False)
        name, ns = args.get("name"), args.get("namespace", "")
        if type(name) is not str or type(ns) is not str:
            raise ValueError("pg_get: name and namespace must be strings")
        pg = self.engine.pgroups.lookup(name, ns)
        if pg is None:
            return None
        return {"pg_id": pg.pg_id, "bundles": [P.from_units(b) for b in pg.bundles]}

    def req_demand(self, cid, args):
        """What waits to be placed, for `zray status`: queued tasks by resource shape
        (infeasible: no live node has that much in total) and the groups not placed."""
        e = self.engine
        alive = [n for n in e.nodes.nodes.values() if n.alive]
        shapes = []
        for (res, strategy), q in e.placement.queues.items():
            n = sum(1 for t in q if t.state == TaskState.QUEUED)
            if not n:
                continue
            need = dict(res)  # (n counts TaskState.QUEUED)
            feasible = any(e.nodes.feasible(node, need) for node in alive)
            shapes.append({"shape": P.from_units(need), "strategy": repr(strategy)
                           if strategy is not None else "", "count": n,
                           "infeasible": not feasible})
        groups = [e.pgroups.row(pg) for pg in e.pgroups.pending.values()]
        return {"tasks": shapes, "placement_groups": groups}
