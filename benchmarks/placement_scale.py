"""The broker's scheduling cost per task at 8, 256 and 4,096 nodes, before and after.

Synthetic nodes inside the broker's own tables (no sockets): ``NodeTable`` with N
nodes of 4 CPUs and 4 idle executors each, and the real ``Placement.schedule``
deciding 512 no-op tasks of one shape. Each pass starts the tasks that fit and
prefetches the rest onto the busy executors; the tasks of the pass before
finish (resources and executors come back) before the next pass. The time
counted is ``schedule()`` only, per decision (a task started or prefetched).

    python benchmarks/placement_scale.py

runs "before" (``benchmarks/_placement_before.py``: brokerd/placement.py as it
was before the node indexes, which sorted every node for every task and
scanned every executor to prefetch) and "after" (brokerd/placement.py)
alternately in one process, ROUNDS times per node count, and prints the
medians and their ratio. Before timing, one task is placed and finished (a
live broker builds its indexes as nodes join, not per task).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

TASKS = 512
ROUNDS = 5
NODE_COUNTS = (8, 256, 4096)
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(variant: str, n_nodes: int) -> float:
    from types import SimpleNamespace

    from brokerd.nodes import NodeTable
    from brokerd.placement import strategy_key
    from brokerd.records import ExecState, Executor, Task, TaskState
    from zray import _protocol as P

    if variant == "before":
        from _placement_before import Placement
    else:
        from brokerd.placement import Placement
    random.seed(1)

    class Out:
        def send(self, *a, **k):
            pass

    class Objects:
        def bytes_by_node(self, deps):
            return {}

    nodes = NodeTable(Out())
    for i in range(n_nodes):
        node = nodes.join(i.to_bytes(8, "big"), {
            "resources": {"CPU": 4 * P.UNIT, "memory": 8 << 30}, "pid": 1})
        for j in range(4):
            ex = Executor(bytes([j]) + i.to_bytes(7, "big"), node, 0, ExecState.IDLE)
            node.executors[ex.cid] = ex
            nodes.push_idle(ex)
    placement = Placement(nodes, Objects())
    need = {"CPU": P.UNIT}
    shape = (tuple(sorted(need.items())), strategy_key({}))
    spec = SimpleNamespace(options={}, name="noop", driver=b"d" * 8, kind=P.TASK)
    warm = Task(b"w" * 12, P.TASK, spec, [], need, need, shape, [])
    warm.state = TaskState.QUEUED
    placement.enqueue(warm)
    for task, _node, ex in placement.schedule().run:
        nodes.release(task)
        nodes.push_idle(ex)
    tasks = []
    for i in range(TASKS):
        t = Task(i.to_bytes(12, "big"), P.TASK, spec, [], need, need, shape, [])
        t.state = TaskState.QUEUED
        tasks.append(t)
        placement.enqueue(t)
    spent, decided, previous = 0.0, 0, []
    while decided < TASKS:
        t0 = time.perf_counter()
        d = placement.schedule()
        spent += time.perf_counter() - t0
        for task, ex in d.prefetch:
            task.state = TaskState.ASSIGNED
            ex.ahead.append(task)
        for task, ex in previous:  # the last pass's tasks finish (and what was sent ahead)
            nodes.release(task)
            task.state = TaskState.FINISHED
            ex.task = None
            while ex.ahead:
                ex.ahead.popleft().state = TaskState.FINISHED
            ex.state = ExecState.IDLE
            nodes.push_idle(ex)
        previous = []
        for task, _node, ex in d.run:
            task.state = TaskState.RUNNING
            ex.state = ExecState.BUSY
            ex.task = task
            previous.append((task, ex))
        decided += len(d.run) + len(d.prefetch)
        if not d.run and not d.prefetch and not previous:
            raise RuntimeError("no progress")
    return spent / decided * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    results = {(v, n): [] for v in ("before", "after") for n in NODE_COUNTS}
    for _ in range(args.rounds):
        for n in NODE_COUNTS:
            for v in ("before", "after"):  # interleaved
                results[(v, n)].append(measure(v, n))
    print(f"broker scheduling cost per task decision (median of {args.rounds} rounds, us), "
          f"{TASKS} tasks of 1 CPU on N synthetic nodes of 4 CPUs / 4 executors:")
    print(f"{'nodes':>6} {'before':>10} {'after':>10} {'before/after':>13}")
    for n in NODE_COUNTS:
        b = statistics.median(results[("before", n)])
        a = statistics.median(results[("after", n)])
        print(f"{n:>6} {b:>10.1f} {a:>10.1f} {b / a:>12.1f}x")


if __name__ == "__main__":
    main()
