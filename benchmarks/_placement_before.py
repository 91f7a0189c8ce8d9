"""Placement: where ready tasks run. Owns the ready queues; decides, never sends.

::

    engine --enqueue(task)--> queues[(resource shape, strategy)] --schedule()--> Decisions
                                                                                  .run:      (task, node, idle executor)
                                                                                  .actors:   (creation task, node): start a fresh process
                                                                                  .prefetch: (task, busy executor): send ahead
                                                                                  .failed:   (task, error text)

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

Owns: ``queues`` and the set of tasks already warned about as infeasible.
Reads: node table, object locations (to prefer nodes holding a task's
arguments), executors' current tasks (to pipeline). Writes node resources
only through ``NodeTable``.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from brokerd.nodes import NodeTable
from brokerd.records import ExecState, Task, TaskState
from zray import _protocol as P

log = logging.getLogger("zray.broker")


@dataclass
class Decisions:
    run: list = field(default_factory=list)
    actors: list = field(default_factory=list)
    prefetch: list = field(default_factory=list)
    failed: list = field(default_factory=list)


class Placement:
    def __init__(self, nodes: NodeTable, objects):
        self.nodes = nodes
        self.objects = objects  # ObjectDirectory, read only: where arguments are
        self.queues: dict[tuple, deque] = {}
        self.infeasible_warned: set = set()
        self.dirty = False  # something was queued since the last pass

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
        picked: set = set()  # busy executors given a prefetch in this pass
        for shape in list(self.queues):
            q = self.queues[shape]
            task = None
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
                    break
                q.popleft()
                nodes.acquire(task, node)
                d.run.append((task, node, ex))
            if (q and task is not None and shape[1] is None and task.kind == P.TASK
                    and "GPU" not in task.resources):
                # GPU tasks are never prefetched: their GPU ids are only known at start.
                self._prefetch(shape, q, d, picked)
            if not q:
                del self.queues[shape]
        return d

    def _prefetch(self, shape, q, d: Decisions, picked: set) -> None:
        """Pipeline: give each busy pool executor running this shape its next task now,
        so it starts the moment the current one is done (no broker round trip idle)."""
        for node in self.nodes.nodes.values():
            for ex in node.executors.values():
                cur = ex.task
                if (ex.state != ExecState.BUSY or ex.prefetch is not None or ex.blocked
                        or cur is None or cur.shape != shape or cur.state != TaskState.RUNNING
                        or ex in picked):
                    continue
                while q and q[0].state != TaskState.QUEUED:
                    q.popleft()
                if not q:
                    return
                picked.add(ex)
                d.prefetch.append((q.popleft(), ex))

    def place(self, task: Task):
        """(node, executor, None) to run ``task`` now; (node, None, None) if a node fits
        but has no idle executor; (None, None, None) if no node fits right now;
        (None, None, error text) if it can never run as asked."""
        need = task.resources
        opts = task.spec.options
        strategy = opts.get("strategy")
        table = self.nodes
        selector = opts.get("label_selector")
        if selector:
            nodes = [n for n in table.nodes.values() if n.alive and labels_match(n.labels, selector)]
        else:
            nodes = [n for n in table.nodes.values() if n.alive]
        if strategy is not None and strategy != "DEFAULT":
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
        elif len(nodes) > 1:
            local = self.objects.bytes_by_node(task.deps)
            if local:  # prefer the node that already holds the task's large arguments
                nodes.sort(key=lambda n: (-local.get(n.node_id, 0), table.score(n, need)))
            else:
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
                return node, node.idle.pop(), None
            if spawn_node is None:
                spawn_node = node
        if not any_feasible and task.task_id not in self.infeasible_warned:
            self.infeasible_warned.add(task.task_id)
            log.warning("task %s needs %s%s: no node has that; it waits for one to join",
                        task.spec.name, P.from_units(need),
                        f" on a node with labels {selector}" if selector else "")
        return spawn_node, None, None

    def forget(self, task: Task) -> None:
        self.infeasible_warned.discard(task.task_id)


def strategy_key(opts: dict):
    """The part of a task's queue key beyond its resources: its strategy and label
    selector (None for the common case, which is the only one prefetched)."""
    s = opts.get("strategy")
    if isinstance(s, dict):
        s = tuple(sorted((k, repr(v)) for k, v in s.items()))
    elif s is not None and not isinstance(s, str):
        s = repr(s)
    selector = opts.get("label_selector")
    if selector:
        return (s, tuple(sorted((str(k), str(v)) for k, v in selector.items())))
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
