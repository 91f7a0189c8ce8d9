"""Placement: which node and executor runs a ready task, and resource accounting.

Ready tasks wait in ``queues`` keyed by (resource shape, strategy); a pass of
``schedule`` walks each queue head-first and stops at the first task that does
not fit, so tasks that cannot run are never rescanned one by one.
"""

from __future__ import annotations

import logging
import random

from brokerd.records import (
    ExecState,
    Node,
    Task,
    TaskState,
)
from zray import _protocol as P
from zray import exceptions
from zray._serialization import serialize_error

log = logging.getLogger("zray.broker")


class Placement:
    """Mixin of Broker; see brokerd/broker.py for the state it shares."""

    def schedule(self):
        for shape in list(self.queues):
            q = self.queues[shape]
            while q:
                task = q[0]
                if task.state != TaskState.QUEUED:
                    q.popleft()
                    continue
                node, ex = self.place(task)
                if task.kind == P.ACTOR_CREATE:
                    if node is None:
                        break
                    if ex is not None:
                        node.idle.append(ex)  # not this one: an actor gets a fresh process
                    q.popleft()
                    self.start_actor_process(task, node)
                    continue
                if ex is None:
                    if node is not None:
                        self.request_spawn(node)
                    break
                q.popleft()
                self.run_task(task, node, ex)
            if q and shape[1] is None and task.kind == P.TASK and "GPU" not in task.resources:
                # GPU tasks are never prefetched: their GPU ids are only known at start.
                self.prefetch(shape, q)
            if not q:
                del self.queues[shape]

    def prefetch(self, shape, q):
        """Pipeline: give each busy pool executor running this shape its next task now,
        so it starts the moment the current one is done (no broker round trip idle)."""
        for node in self.nodes.values():
            if not q:
                return
            for ex in node.executors.values():
                cur = ex.task
                if (ex.state != ExecState.BUSY or ex.prefetch is not None or ex.blocked
                        or cur is None or cur.shape != shape or cur.state != TaskState.RUNNING):
                    continue
                while q and q[0].state != TaskState.QUEUED:
                    q.popleft()
                if not q:
                    return
                task = q.popleft()
                task.state = TaskState.ASSIGNED
                task.executor = ex
                ex.prefetch = task
                header, frames = self.exec_header(task, ex)
                self.send(P.inbox_ident(ex.cid), header, frames)

    def fits(self, node: Node, need: dict) -> bool:
        avail = node.avail
        for r, u in need.items():
            if avail.get(r, 0) < u:
                return False
        g = need.get("GPU")
        if g:
            return self.gpu_alloc(node, g, dry=True) is not None
        return True

    def feasible(self, node: Node, need: dict) -> bool:
        total = node.total
        return all(total.get(r, 0) >= u for r, u in need.items())

    def place(self, task: Task):
        """(node, executor) to run ``task`` now; (node, None) if a node fits but
        has no idle executor; (None, None) if no node fits right now."""
        need = task.resources
        opts = task.spec.options
        strategy = opts.get("strategy")
        nodes = [n for n in self.nodes.values() if n.alive]
        if strategy is not None and strategy != "DEFAULT":
            if strategy == "SPREAD":
                nodes.sort(key=lambda n: n.running)
            elif isinstance(strategy, dict) and strategy.get("type") == "node_affinity":
                target = self.nodes.get(bytes.fromhex(strategy["node_id"]))
                if target is not None and target.alive:
                    if self.fits(target, need) or not strategy.get("soft"):
                        nodes = [target]
                elif not strategy.get("soft"):
                    self.fail_task(task, serialize_error(exceptions.TaskUnschedulableError(
                        f"node {strategy['node_id']} of a hard NodeAffinitySchedulingStrategy "
                        "is not alive")))
                    return None, None
        elif len(nodes) > 1:
            local = self.dep_bytes(task)
            if local:  # prefer the node that already holds the task's large arguments
                nodes.sort(key=lambda n: (-local.get(n.node_id, 0), self.score(n, need)))
            else:
                nodes.sort(key=lambda n: self.score(n, need))
        spawn_node = None
        any_feasible = False
        for node in nodes:
            if not self.fits(node, need):
                if not any_feasible and self.feasible(node, need):
                    any_feasible = True
                continue
            any_feasible = True
            if node.idle:
                return node, node.idle.pop()
            if spawn_node is None:
                spawn_node = node
        if not any_feasible and task.task_id not in self.infeasible_warned:
            self.infeasible_warned.add(task.task_id)
            log.warning("task %s needs %s: no node has that; it waits for one to join",
                        task.spec.name, P.from_units(need))
        return spawn_node, None

    def dep_bytes(self, task: Task) -> dict:
        out: dict = {}
        for oid in task.deps:
            obj = self.objects.get(oid)
            if obj is not None:
                for node_id, size in obj.locations.items():
                    out[node_id] = out.get(node_id, 0) + size
        return out

    @staticmethod
    def score(node: Node, need: dict) -> float:
        # Ray's hybrid policy: pack while a node is under half used, then spread.
        util = 0.0
        for r in need or {"CPU": 1}:
            tot = node.total.get(r, 0)
            if tot:
                util = max(util, 1 - node.avail.get(r, 0) / tot)
        return (0.0 if util < 0.5 else util) + random.random() * 1e-3

    def start_actor_process(self, task: Task, node: Node):
        """Reserve the actor's resources on ``node`` and have a process started for it
        alone (like Ray: an actor never inherits a pooled task process's state); the
        creation is sent when that executor reports READY (Broker.on_ready)."""
        self.acquire(task, node)
        task.state = TaskState.RUNNING
        task.executor = None
        node.actor_spawns.append(task)
        node.spawning += 1
        self.send(node.ident, P.encode(P.Spawn(1)))

    def request_spawn(self, node: Node):
        if node.spawning < 2:
            node.spawning += 1
            self.send(node.ident, P.encode(P.Spawn(1)))

    def gpu_alloc(self, node: Node, units: int, dry=False):
        gpus = node.gpus
        if units >= P.UNIT:
            whole = units // P.UNIT
            free = [i for i, (_, f) in enumerate(gpus) if f == P.UNIT]
            if len(free) < whole:
                return None
            alloc = [(i, P.UNIT) for i in free[:whole]]
        else:
            for i, (_, f) in enumerate(gpus):
                if f >= units:
                    alloc = [(i, units)]
                    break
            else:
                return None
        if not dry:
            for i, u in alloc:
                gpus[i][1] -= u
        return alloc

    def acquire(self, task: Task, node: Node):
        avail = node.avail
        for r, u in task.hold.items():
            avail[r] = avail.get(r, 0) - u
        g = task.hold.get("GPU")
        if g:
            task.gpu_alloc = self.gpu_alloc(node, g) or []
        task.node = node
        node.running += 1

    def release(self, task: Task):
        node = task.node
        if node is None:
            return
        task.node = None
        avail = node.avail
        hold = dict(task.hold)
        if task.blocked:
            hold.pop("CPU", None)
            task.blocked = False
        for r, u in hold.items():
            avail[r] = avail.get(r, 0) + u
        for i, u in task.gpu_alloc:
            if i < len(node.gpus):
                node.gpus[i][1] += u
        task.gpu_alloc = []
        node.running -= 1
        self.dirty = True
