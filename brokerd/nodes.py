"""The node table: which nodes are in the cluster, what they have free, their executor pools.

::

    NODE_HELLO --join()--> Node(total, avail, GPU slots, idle executor stack)
    engine --acquire(task, node) / release(task)--> avail, GPU slots, running count
    placement --fits() / feasible() / score()--> read only
    heartbeats --seen()--> last_seen;  check_liveness() --> nodes silent too long

Resources are integers in 1/UNIT (see ``zray._protocol``). A GPU request of
whole units takes whole free GPUs; a fraction takes part of one GPU.

Owns: ``nodes``, ``gone`` (the nodes that left, for the state API) and every field of a Node record (free resources, GPU slots,
idle executor stack, spawn counters, store accounting is the object
directory's). Sends: SPAWN, KILL_EXEC, EXIT to idle executors (through the outbox).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque

from brokerd.outbox import Outbox
from brokerd.records import Executor, Node, Task
from zray import _peer
from zray import _protocol as P

log = logging.getLogger("zray.broker")

IDLE_REAP_S = float(os.environ.get("ZRAY_IDLE_EXECUTOR_S", "30"))
MAX_SPAWNING = 2  # pool executors being started at once per node (actors start their own)


class NodeTable:
    def __init__(self, out: Outbox):
        self.out = out
        self.nodes: dict[bytes, Node] = {}
        self.gone: deque = deque(maxlen=1000)  # (node, time it left): list_nodes shows DEAD
        self.freed = False  # resources came back since the last scheduling pass
        self.changed: set = set()  # nodes whose resources changed: placement re-indexes them

    # ------------------------------------------------------------ membership
    def join(self, node_id: bytes, info: dict) -> Node:
        total = _units(info.get("resources"))
        gpus = [[g, P.UNIT] for g in info.get("gpu_ids", []) if isinstance(g, (int, str))]
        node = Node(node_id, P.node_ident(node_id), total, dict(total), gpus,
                    str(info.get("hostname", "")), _int(info.get("pid")),
                    info.get("labels") if isinstance(info.get("labels"), dict) else {},
                    str(info.get("address", "")), last_seen=time.monotonic())
        node.spawning = max(0, min(_int(info.get("prestart")), 64))
        node.store_limit = max(0, _int(info.get("store_limit")))
        log_dir = info.get("log_dir")
        node.log_dir = log_dir if isinstance(log_dir, str) and len(log_dir) <= 4096 else ""
        node.peer = _peer_info(info.get("peer"))
        self.nodes[node_id] = node
        self.changed.add(node)
        log.info("node %s joined: %s", node_id.hex(), P.from_units(total))
        self.freed = True
        return node

    def leave(self, node: Node) -> None:
        node.alive = False
        if self.nodes.pop(node.node_id, None) is not None:
            self.gone.append((node, time.time()))
        self.changed.add(node)

    def seen(self, node_id: bytes) -> bool:
        node = self.nodes.get(node_id)
        if node is None or node.reconnecting:  # (unanswered: it must say hello again)
            return False
        node.last_seen = time.monotonic()
        return True

    def silent(self, now: float) -> list:
        """Nodes that missed heartbeats for NODE_TIMEOUT_S."""
        return [n for n in self.nodes.values() if n.alive and now - n.last_seen > P.NODE_TIMEOUT_S]

    # ------------------------------------------------------------ resources
    def fits(self, node: Node, need: dict) -> bool:
        avail = node.avail
        for r, u in need.items():
            if avail.get(r, 0) < u:
                return False
        g = need.get("GPU")
        if g:
            return self.gpu_alloc(node, g, dry=True) is not None
        return True

    @staticmethod
    def feasible(node: Node, need: dict) -> bool:
        total = node.total
        return all(total.get(r, 0) >= u for r, u in need.items())

    @staticmethod
    def score(node: Node, need: dict) -> float:
        # Pack while a node is under half used, then spread; a little noise breaks ties.
        util = 0.0
        for r in need or {"CPU": 1}:
            tot = node.total.get(r, 0)
            if tot:
                util = max(util, 1 - node.avail.get(r, 0) / tot)
        return (0.0 if util < 0.5 else util) + random.random() * 1e-3

    @staticmethod
    def gpu_alloc(node: Node, units: int, dry=False):
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

    def acquire(self, task: Task, node: Node) -> None:
        avail = node.avail
        for r, u in task.hold.items():
            avail[r] = avail.get(r, 0) - u
        g = task.hold.get("GPU")
        if g is None and len(task.hold) > 1:  # in a placement group: its bundle's GPUs
            g = next((u for r, u in task.hold.items() if r.startswith("GPU_group_")), None)
        if g:
            task.gpu_alloc = self.gpu_alloc(node, g) or []
        task.node = node
        node.running += 1
        self.changed.add(node)

    def release(self, task: Task) -> None:
        node = task.node
        if node is None:
            return
        task.node = None
        avail = node.avail
        for r, u in task.hold.items():
            if task.blocked and (r == "CPU" or r.startswith("CPU_group_")):
                continue  # lent while the task waited in get()
            avail[r] = avail.get(r, 0) + u
        task.blocked = False
        for i, u in task.gpu_alloc:
            if i < len(node.gpus):
                node.gpus[i][1] += u
        task.gpu_alloc = []
        node.running -= 1
        self.freed = True
        self.changed.add(node)

    def lend_cpu(self, task: Task, lend: bool) -> None:
        """A task waits in get() (lend) or resumes: its CPU is free meanwhile."""
        node = task.node
        if node is None or task.blocked == lend:
            return
        avail = node.avail
        for r, cpu in task.hold.items():  # its CPUs (in a placement group: its group's)
            if cpu and (r == "CPU" or r.startswith("CPU_group_")):
                avail[r] = avail.get(r, 0) + (cpu if lend else -cpu)
                self.freed = self.freed or lend
                self.changed.add(node)
        task.blocked = lend

    def gpu_ids(self, task: Task) -> list:
        node = task.node
        return [node.gpus[i][0] for i, _ in task.gpu_alloc] if node is not None else []

    def totals(self, avail: bool = False) -> dict:
        out: dict = {}
        for n in self.nodes.values():
            for r, u in (n.avail if avail else n.total).items():
                if u > 0 or not avail:
                    out[r] = out.get(r, 0) + u
        return P.from_units(out)

    # -------------------------------------------------------- executor pools
    def request_spawn(self, node: Node, for_actor: bool = False) -> None:
        if for_actor or node.spawning < MAX_SPAWNING:
            node.spawning += 1
            self.out.send(node.ident, P.encode(P.Spawn(1)))

    def spawned(self, node: Node) -> None:
        node.spawning = max(0, node.spawning - 1)

    def push_idle(self, ex: Executor) -> None:
        ex.idle_since = time.monotonic()
        ex.node.idle.append(ex)
        self.freed = True

    def reap_idle(self, node: Node, now: float) -> list:
        """Pool executors beyond one per CPU idle for IDLE_REAP_S: taken off the pool and
        returned (a burst of blocked nested tasks grows the pool; it should not stay grown)."""
        keep = max(1, int(node.total.get("CPU", 0) // P.UNIT))
        out = []
        # Executors of a runtime_env go when idle that long whatever the pool's size:
        # their environment may never be asked for again.
        for ex in [e for e in node.idle if e.env and now - e.idle_since > IDLE_REAP_S]:
            node.idle.remove(ex)
            out.append(ex)
        while len(node.idle) > keep and now - node.idle[0].idle_since > IDLE_REAP_S:
            out.append(node.idle.pop(0))  # the longest idle (the stack's bottom)
        return out


def _int(v) -> int:
    return v if type(v) is int else 0


def _units(resources) -> dict:
    """A node's advertised resources, checked: {str: non-negative int units}."""
    if not isinstance(resources, dict):
        return {}
    return {k: v for k, v in resources.items() if type(k) is str and type(v) is int and v >= 0}


def _peer_info(v) -> tuple:
    """(address, secret) of a node's peer socket from NODE_HELLO (zray/_peer.py); ()
    when it has none or it is malformed (blobs to and from it then go through here)."""
    if not isinstance(v, dict):
        return ()
    address, secret = v.get("address"), v.get("secret")
    try:
        P.Pull.CHECKS[2](address)
    except P.ProtocolError:
        return ()
    if type(secret) is not bytes or len(secret) != _peer.SECRET_LEN:
        return ()
    return address, secret
