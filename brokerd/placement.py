"""Placement: where ready tasks run. Owns the ready queues; decides, never sends.

::

    engine --enqueue(task)--> queues[(resource shape, strategy)] --schedule()--> Decisions
                                                                                  .run:      (task, node, idle executor)
                                                                                  .actors:   (creation task, node): start a fresh process
                                                                                  .prefetch: (task, busy executor): send ahead
                                                                                             (how many: brokerd/window.py)
                                                                                  .failed:   (task, error text)
                                                                                  .warnings: (task, text): infeasible, tell its driver

Where a task goes (``place``), by strategy:

* DEFAULT: the node holding most of its arguments' bytes if it fits; else the
  seed's 3.5.2 policy read from an index (brokerd/nodeindex.py, O(log nodes)):
  nodes under half used first in a stable order (packing), then the least used
  (spreading), at random among the top k = max(20% of nodes, 1). An actor
  that needs no resources goes to a random node.
* SPREAD: the node running fewest tasks (an index too).
* placement group member: the nodes holding its group's bundles (brokerd/pgroups.py
  renamed its resources to the group's).
* label_selector (then each ``fallback_strategy`` selector in order),
  NodeLabelSchedulingStrategy, NodeAffinitySchedulingStrategy: the nodes they
  allow, looked at one by one (``_place_scan``).

A chosen node with no idle executor gets one started and the task waits for it.
Work that no live node could hold (by total resources) is infeasible: logged
once per task, told to its driver once per shape, and it waits for a node to join.

A pass of ``schedule`` walks each queue head-first and stops at the first
task that does not fit, so tasks that cannot run are never rescanned one by
one. The resources of every decision are taken (``NodeTable.acquire``) as it
is made, so the next decision in the same pass sees them gone; the engine
then moves the tasks to their new states and sends them.

A task with a ``label_selector`` only considers nodes whose labels match it
(``labels_match``); when none does it waits, like any task no node can fit,
until a node that matches joins. The selector is part of the queue key, so
such a task never holds up tasks that may run elsewhere, and is never
prefetched.

Runtime environments: a task's runtime_env key (``options["renv"]``, see
zray/_renv.py) is part of its queue key too, and an idle executor is taken for a
task only if it is bound to that environment or to none yet (``take_idle``: the
task binds it); so executors of different environments never share a process,
and a prefetched task goes only to an executor running the same queue's task.

A queue's head that fit nowhere is not tried again until something changed that
could make it fit (``epoch``): a pass bumps the epoch at its start when resources
came back or an executor went idle since the last (it takes ``NodeTable.freed``:
release, lent CPU, join, idle or spawned executor, placement group placed or
removed) or a node's resources or liveness changed (``NodeTable.changed``: a node
left). Until then no plain task of that queue is tried either (the same
resources, strategy and runtime_env: it would fit nowhere too), while an actor's
creation is only skipped if it is that same head, and a head that is no longer
QUEUED (cancelled, failed, moved back to wait for an argument) is taken off as
before. A head that fits a node without an idle executor (one is being started)
is tried every pass, as before. A safety net bounds what a missed bump could
cost: every ``RETRY_S`` a pass tries every head again (the broker runs one then
if anything is queued), so a missed bump costs latency, never a hang.

Sending ahead costs a pass nothing for executors whose window is full: ``_prefetch``
looks only at the candidates in ``room`` (started this pass, or told by the engine
that a slot freed: a task sent ahead started, went back or failed) and drops those
it finds full or behind a long call; a function turning short (``RunTimes.flips``)
puts them all back. So a pass costs what changed, not one look per busy executor.

Owns: ``queues``, the node indexes, the executors started per shape (prefetch
candidates), which of them may have room, and the tasks and shapes already warned
about as infeasible.
Reads: node table, object locations (to prefer nodes holding a task's
arguments), executors' current tasks (to pipeline). Writes node resources
only through ``NodeTable``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from brokerd.nodeindex import NodeIndex
from brokerd.nodes import NodeTable
from brokerd.records import ExecState, Task, TaskState
from brokerd.window import RunTimes
from zray import _protocol as P
from zray._procutil import env_number

log = logging.getLogger("zray.broker")


def read_env() -> float:
    """RETRY_S from the environment as it is now (ZRAY_SCHED_RETRY_S): a bad value is a
    ValueError naming the variable (zray.init checks it before it starts a cluster)."""
    return env_number("ZRAY_SCHED_RETRY_S", 0.1, 0.001, 1e9, what="a time in seconds")


# Every queue's head is tried again at least this often while tasks queue: the safety
# net for a change that did not bump the epoch. (ZRAY_SCHED_RETRY_S: for tests that turn
# the net off, so that a missed bump hangs instead of costing latency.)
RETRY_S = read_env()


@dataclass
class Decisions:
    run: list = field(default_factory=list)
    actors: list = field(default_factory=list)
    prefetch: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # (task, text): tell its driver


class Placement:
    def __init__(self, nodes: NodeTable, objects):
        self.nodes = nodes
        self.objects = objects  # ObjectDirectory, read only: where arguments are
        self.queues: dict[tuple, deque] = {}
        # the last pass left a task queued for want of resources (not an executor that
        # is starting): leased executors' CPUs may be what it needs (brokerd/leases.py)
        self.wants_resources = False
        self.infeasible_warned: set = set()
        self.warned_shapes: set = set()  # (driver, shape, selector) told once
        self.warnings: list = []  # (task, text) for its driver, taken by schedule()
        self._feasible: dict = {}  # (shape, membership) -> whether any node could hold it
        self._names: dict = {}  # sorted resource items -> names of those it needs (> 0)
        self.index = NodeIndex(nodes)
        self.running: dict = {}  # shape -> pool executors started on it (prefetch candidates)
        # Of those, the ones that may have room in their window: ``_prefetch`` looks at
        # these only and drops the ones it finds full; the engine adds an executor back
        # when its window empties by a slot (``refill``), a change it cannot see coming
        # (a function turning short) adds them all (``refill_all``).
        self.room: set = set()
        self._flips = 0  # RunTimes.flips seen
        self.groups = None  # PlacementGroupTable, set by the engine
        self.runtimes = RunTimes()  # functions' run times: the send-ahead window
        self.dirty = False  # something was queued since the last pass
        # Bumped at a pass's start by every change that can make a queued task placeable
        # (NodeTable.freed / .changed, which schedule() takes) and every RETRY_S: a queue
        # whose head fit nowhere at this epoch is not tried again (``stuck``).
        self.epoch = 0
        self.stuck: dict = {}  # shape -> (head task that fit nowhere, the epoch it failed at)
        self.retry_at = 0.0  # (time.monotonic) the safety net's next forced try

    def enqueue(self, task: Task, front: bool = False) -> None:
        q = self.queues.get(task.shape)
        if q is None:
            q = self.queues[task.shape] = deque()
        if front:
            q.appendleft(task)
        else:
            q.append(task)
        self.dirty = True

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def schedule(self) -> Decisions:
        d = Decisions()
        nodes = self.nodes
        picked: dict = {}  # busy executor -> tasks sent ahead to it in this pass
        self.wants_resources = False
        if nodes.freed or nodes.changed:  # something may fit now: every head is tried
            nodes.freed = False
            self.epoch += 1
        now = time.monotonic()
        if now >= self.retry_at:  # the safety net: every head is tried again now and then
            self.epoch += 1
            self.retry_at = now + RETRY_S
        epoch = self.epoch
        stuck = self.stuck
        for shape in list(self.queues):
            q = self.queues[shape]
            task = None
            starting = False  # a node that fits waits for an executor to start
            held = stuck.get(shape)
            if held is not None and held[1] == epoch and q:
                head = q[0]  # (another plain task of the shape fits where it did: nowhere)
                if head.state == TaskState.QUEUED and (head is held[0] or (
                        head.kind == P.TASK and held[0].kind == P.TASK)):
                    task = head  # nothing changed since the head fit nowhere: not tried
                    q = ()  # (no placing: straight to sending ahead)
                    self.wants_resources = True  # (leases: it still waits for resources)
            nowhere = False  # the head fit on no node (not: waits for an executor to start)
            while q:
                task = q[0]
                if task.state != TaskState.QUEUED:
                    q.popleft()
                    continue
                node, ex, err = self.place(task)
                if err:
                    q.popleft()
                    d.failed.append((task, err))
                    continue
                if task.kind == P.ACTOR_CREATE:
                    if node is None:
                        nowhere = True
                        break
                    if ex is not None:
                        nodes.push_idle(ex)  # not this one: an actor gets a fresh process
                    q.popleft()
                    nodes.acquire(task, node)
                    d.actors.append((task, node))
                    continue
                if ex is None:
                    if node is not None:
                        nodes.request_spawn(node)
                        starting = True
                    else:
                        nowhere = True
                    break
                q.popleft()
                nodes.acquire(task, node)
                d.run.append((task, node, ex))
                if _prefetchable(shape):  # a prefetch candidate once it runs
                    run = self.running.get(shape)
                    if run is None:
                        run = self.running[shape] = set()
                    run.add(ex)
                    self.room.add(ex)
            if nowhere:  # its head fits nowhere now: not tried again until the epoch moves
                stuck[shape] = (q[0], epoch)
                self.wants_resources = True  # (leases: revoked while it waits, engine.py)
            q = self.queues[shape]
            # Sent ahead only when no node has room: never behind a long task while a
            # node with free resources is starting an executor for it.
            if (q and task is not None and not starting and _prefetchable(shape)
                    and task.kind == P.TASK and "GPU" not in task.resources):
                # GPU tasks are never prefetched: their GPU ids are only known at start.
                self._prefetch(shape, q, d, picked)
            if not q:
                del self.queues[shape]
                stuck.pop(shape, None)
        if self.warnings:
            d.warnings, self.warnings = self.warnings, []
        return d

    def _prefetch(self, shape, q, d: Decisions, picked: dict) -> None:
        """Pipeline: give each busy pool executor running this shape its next tasks now,
        so it starts each the moment the last is done (no broker round trip idle): one,
        or up to its window for a short function (brokerd/window.py). Only the executors
        this pass or an earlier one started on the shape are looked at (``running``);
        those that moved on are dropped from it here."""
        execs = self.running.get(shape)
        if not execs:
            return
        runtimes = self.runtimes
        if runtimes.flips != self._flips:  # a function turned short: windows grew
            self._flips = runtimes.flips
            self.refill_all()
        room = self.room
        if not room:
            return
        now = time.time()  # (the clock of Task.started: the broker's moves.now)
        stale = []
        for ex in (room & execs if len(room) < 2 * len(execs) else
                   [ex for ex in execs if ex in room]):
            cur = ex.task
            state = ex.state
            if state in (ExecState.DEAD, ExecState.ACTOR) or (
                    cur is not None and cur.shape != shape):
                stale.append(ex)  # (one started in this pass is still IDLE: kept)
                continue
            if (state != ExecState.BUSY or cur is None or ex.blocked
                    or cur.state != TaskState.RUNNING):
                continue
            have = len(ex.ahead) + picked.get(ex, 0)  # (this pass's are not applied yet)
            limit = runtimes.window(ex, now)
            if have >= limit:  # full, or behind a long call: until a slot frees (refill)
                room.discard(ex)
                continue
            while have < limit:
                while q and q[0].state != TaskState.QUEUED:
                    q.popleft()
                if not q or (have and not runtimes.short(q[0].spec.fid)):
                    break  # (beyond the first slot: short functions only)
                d.prefetch.append((q.popleft(), ex))
                have += 1
            picked[ex] = have - len(ex.ahead)
            if have >= limit:
                room.discard(ex)
            if not q:
                break
        for ex in stale:
            execs.discard(ex)
            if ex.state in (ExecState.DEAD, ExecState.ACTOR):  # (else: another shape's now)
                room.discard(ex)
        if not execs:
            del self.running[shape]

    def refill(self, ex) -> None:
        """``ex``'s window may have room again (a task sent ahead started, went back or
        failed): the next pass looks at it."""
        self.room.add(ex)
        if self.queues:  # (something to send it: a pass)
            self.dirty = True

    def forget_executor(self, ex) -> None:
        """``ex`` is dead: no longer a prefetch candidate."""
        self.room.discard(ex)
        for shape in [s for s, execs in self.running.items() if ex in execs]:
            execs = self.running[shape]
            execs.discard(ex)
            if not execs:
                del self.running[shape]

    def refill_all(self) -> None:
        """Every prefetch candidate may have room: the next pass looks at each."""
        for execs in self.running.values():
            self.room |= execs

    def place(self, task: Task):
        """(node, executor, None) to run ``task`` now; (node, None, None) if a node fits
        but has no idle executor; (None, None, None) if no node fits right now;
        (None, None, error text) if it can never run as asked.

        DEFAULT, SPREAD, placement-group members and zero-resource actors are decided
        from the indexes (brokerd/nodeindex.py) in O(log nodes); a label selector or a
        node affinity looks at the nodes it names (``_place_scan``)."""
        need = task.resources
        opts = task.spec.options
        strategy = opts.get("strategy")
        table = self.nodes
        index = self.index
        index.refresh()
        group = None
        if strategy is not None and strategy != "DEFAULT":
            if isinstance(strategy, dict) and strategy.get("type") == "placement_group":
                group = strategy
            elif strategy != "SPREAD" or opts.get("label_selector"):
                return self._place_labels(task)
        elif opts.get("label_selector") or opts.get("fallback_strategy"):
            return self._place_labels(task)
        run = spawn = None
        if group is not None:  # only the nodes holding its group's bundles can run it
            pg = self.groups.groups.get(group.get("pg_id")) if self.groups else None
            for nid in dict.fromkeys(pg.nodes if pg is not None else ()):
                node = table.nodes.get(nid) if nid is not None else None
                if node is not None and node.alive and table.fits(node, need):
                    if node.idle:
                        run = node
                        break
                    spawn = spawn or node  # (take_idle below may still find none)
            if run is None and spawn is None:
                return None, None, None  # it waits for its group (placed, or with room)
        elif strategy == "SPREAD":
            run, spawn = index.spread.first_fit(need, table.fits)
        else:
            if task.deps:  # DEFAULT: the node that holds most of its arguments' bytes
                local = self.objects.bytes_by_node(task.deps)
                if local:
                    best = table.nodes.get(max(local, key=local.__getitem__))
                    if best is not None and best.alive and table.fits(best, need):
                        return best, take_idle(best.idle, env_of(opts), task.kind == P.TASK), None
            key = task.shape[0]  # (its resources' items, sorted: the names once per shape)
            names = self._names.get(key)
            if names is None:
                if len(self._names) > 10000:
                    self._names.clear()
                names = self._names[key] = tuple(r for r, u in key if u > 0)
            if not names and task.kind == P.ACTOR_CREATE and index.alive:
                # An actor that needs nothing goes to a random node (as in Ray).
                return index.random_live(), None, None
            run, spawn = index.score_index(names).pick(need, index.alive, table.fits)
        if run is not None:
            ex = take_idle(run.idle, env_of(opts), task.kind == P.TASK)
            if ex is not None:
                return run, ex, None
            return run, None, None  # its idle executors belong to other runtime_envs
        if spawn is not None:
            return spawn, None, None
        self._infeasible(task, need, None)
        return None, None, None

    def _place_labels(self, task: Task):
        """A label selector, then each of the task's ``fallback_strategy`` selectors in
        order, until one of them finds a node (Ray's fallback_strategy)."""
        opts = task.spec.options
        fallbacks = opts.get("fallback_strategy") or ()
        found = self._place_scan(task, opts.get("label_selector"), warn=not fallbacks)
        for i, fb in enumerate(fallbacks):
            if found[0] is not None or found[2] is not None:
                break
            found = self._place_scan(task, fb.get("label_selector"),
                                     warn=i == len(fallbacks) - 1)
        return found

    def _place_scan(self, task: Task, selector, warn: bool = True):
        """Label selectors, node labels and node affinity: the nodes they allow, looked at
        one by one."""
        need = task.resources
        opts = task.spec.options
        strategy = opts.get("strategy")
        table = self.nodes
        if selector:
            nodes = [n for n in table.nodes.values() if n.alive and labels_match(n.labels, selector)]
        else:
            nodes = [n for n in table.nodes.values() if n.alive]
        if strategy == "SPREAD":
            nodes.sort(key=lambda n: n.running)
        elif isinstance(strategy, dict) and strategy.get("type") == "node_affinity":
            try:
                target = table.nodes.get(bytes.fromhex(strategy["node_id"]))
            except (KeyError, TypeError, ValueError):
                return None, None, f"bad node affinity strategy {strategy!r:.80}"
            if target is not None and target.alive:
                if target not in nodes:  # its labels do not match: never there
                    if not strategy.get("soft"):
                        nodes = []
                elif table.fits(target, need) or not strategy.get("soft"):
                    nodes = [target]
            elif not strategy.get("soft"):
                return None, None, (f"node {strategy['node_id']} of a hard "
                                    "NodeAffinitySchedulingStrategy is not alive")
        elif isinstance(strategy, dict) and strategy.get("type") == "node_label":
            nodes = [n for n in nodes if label_exprs_match(n.labels, strategy["hard"])]
            soft = strategy["soft"]  # preferred, not required: matching nodes first
            nodes.sort(key=lambda n: (bool(soft) and not label_exprs_match(n.labels, soft),
                                      table.score(n, need)))
        elif len(nodes) > 1:
            nodes.sort(key=lambda n: table.score(n, need))
        spawn_node = None
        any_feasible = False
        for node in nodes:
            if not table.fits(node, need):
                if not any_feasible and table.feasible(node, need):
                    any_feasible = True
                continue
            any_feasible = True
            if node.idle:
                ex = take_idle(node.idle, env_of(opts), task.kind == P.TASK)
                if ex is not None:
                    return node, ex, None
            if spawn_node is None:
                spawn_node = node
        if not any_feasible and warn:
            self._infeasible(task, need, selector or strategy, checked=True)
        return spawn_node, None, None

    def _infeasible(self, task: Task, need: dict, selector, checked: bool = False) -> None:
        """Nothing fits now: if no live node could ever hold it, say so once per task in
        the log and once per shape to its driver (Ray's warning)."""
        if task.task_id in self.infeasible_warned:
            return
        if not checked:
            key = (task.shape[0], self.index.next_rank, self.index.alive)  # (need, sorted)
            feasible = self._feasible.get(key)
            if feasible is None:
                if len(self._feasible) > 10000:
                    self._feasible.clear()
                feasible = self._feasible[key] = any(
                    n.alive and self.nodes.feasible(n, need) for n in self.nodes.nodes.values())
            if feasible:
                return
        self.infeasible_warned.add(task.task_id)
        where = f" on a node with labels {selector}" if selector else ""
        log.warning("task %s needs %s%s: no node has that; it waits for one to join",
                    task.spec.name, P.from_units(need), where)
        shape = (task.spec.driver, tuple(sorted(need.items())), repr(selector))
        if shape not in self.warned_shapes:
            self.warned_shapes.add(shape)
            self.warnings.append((task, (
                f"Warning: {'actor' if task.kind == P.ACTOR_CREATE else 'task'} "
                f"{task.spec.name} needs {P.from_units(need)}{where}, and no node in the "
                "cluster has that. It is infeasible for now and waits until a node that fits "
                "joins (`zray status` lists pending demand).")))

    def forget(self, task: Task) -> None:
        self.infeasible_warned.discard(task.task_id)


def _prefetchable(shape) -> bool:
    """Tasks of this queue may be sent ahead: the default strategy, any runtime_env."""
    return shape[1] is None or shape[1][0:2] == (None, "renv")


def env_of(opts: dict) -> str:
    """The runtime_env key of a task ("" for none; checked at SUBMIT)."""
    renv = opts.get("renv")
    return renv["key"] if renv else ""


def take_idle(idle: list, env: str, bind: bool):
    """Take the most recently idle executor of environment ``env``, or else one not yet
    bound to any (``bind``: it is bound to ``env`` from now on); None if there is none.
    Executors of different runtime_envs never share a process."""
    for i in range(len(idle) - 1, -1, -1):
        ex = idle[i]
        if ex.env == env or ex.env is None:
            del idle[i]
            if bind:
                ex.env = env
            return ex
    return None


def strategy_key(opts: dict):
    """The part of a task's queue key beyond its resources: its strategy, label
    selector and fallbacks (None for the common case, which is the only one
    prefetched), and its runtime_env (so a queue holds one environment's tasks)."""
    renv = opts.get("renv")
    if renv:
        return (_strategy_key(opts), "renv", renv["key"])
    return _strategy_key(opts)


def _strategy_key(opts: dict):
    s = opts.get("strategy")
    if isinstance(s, dict):
        s = tuple(sorted((k, repr(v)) for k, v in s.items()))
    elif s is not None and not isinstance(s, str):
        s = repr(s)
    selector = opts.get("label_selector")
    fallback = opts.get("fallback_strategy")
    if selector or fallback:
        return (s, tuple(sorted((str(k), str(v)) for k, v in (selector or {}).items())),
                repr(fallback) if fallback else None)
    return s


def labels_match(labels: dict, selector: dict) -> bool:
    """Whether a node's ``labels`` satisfy a label selector (Ray's syntax): ``"v"`` the
    label equals v; ``"in(a, b)"`` it is one of them; a leading ``!`` negates (a node
    without the label satisfies a negated condition)."""
    for key, cond in selector.items():
        if type(cond) is not str:
            return False
        negate = cond.startswith("!")
        if negate:
            cond = cond[1:]
        if cond.startswith("in(") and cond.endswith(")"):
            values = {v.strip() for v in cond[3:-1].split(",")}
        else:
            values = (cond,)
        have = labels.get(key)
        if (have is not None and have in values) == negate:
            return False
    return True


LABEL_OPS = ("in", "not_in", "exists", "does_not_exist")


def label_exprs_match(labels: dict, exprs: list) -> bool:
    """NodeLabelSchedulingStrategy's expressions, [[key, op, [values]], ...]: all hold."""
    for key, op, values in exprs:
        have = labels.get(key)
        if op == "in":
            ok = have is not None and have in values
        elif op == "not_in":
            ok = have is None or have not in values
        elif op == "exists":
            ok = have is not None
        else:
            ok = have is None
        if not ok:
            return False
    return True


def check_strategy_options(opts: dict) -> None:
    """The scheduling options of a SUBMIT, checked field by field (ProtocolError)."""
    s = opts.get("strategy")
    if isinstance(s, dict) and s.get("type") == "node_label":
        for part in ("hard", "soft"):
            exprs = s.get(part)
            if type(exprs) is not list or not all(
                    type(e) is list and len(e) == 3 and type(e[0]) is str and e[1] in LABEL_OPS
                    and type(e[2]) is list and all(type(v) is str for v in e[2])
                    for e in exprs):
                raise P.ProtocolError(f"SUBMIT: node_label strategy {part} must be "
                                      "[[key, op, [values]], ...]")
    fb = opts.get("fallback_strategy")
    if fb is not None and not (type(fb) is list and len(fb) <= 64 and all(
            type(f) is dict and set(f) <= {"label_selector"} and type(
                f.get("label_selector", {})) is dict and all(
                type(k) is str and type(v) is str for k, v in f.get("label_selector", {}).items())
            for f in fb)):
        raise P.ProtocolError("SUBMIT: options.fallback_strategy must be a list of "
                              "{'label_selector': {str: str}}")
