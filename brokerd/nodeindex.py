"""Indexes of the nodes for placement: a decision costs O(log nodes), not a sort of them.

::

    NodeTable.acquire/release/join/leave/lend_cpu, pgroups --> NodeTable.changed (nodes)
    Placement.place --refresh()--> every index re-files only the changed nodes
                    --ScoreIndex.pick(need)--> DEFAULT's choice
                    --SpreadIndex.first_fit(need)--> SPREAD's choice

``ScoreIndex`` (one per set of resource names a task asks for, e.g. ("CPU",))
holds the nodes that have all of those resources, in DEFAULT's order (the
seed's 3.5.2, Ray's hybrid policy): a node's utilisation is the highest used
fraction among those resources; a node under ``SPREAD_THRESHOLD`` scores 0 and
such nodes come first in a stable order (the order they joined), so work packs
onto the first of them until it passes the threshold; the others follow by
utilisation, least used first, so above the threshold work spreads. A task
goes to a node picked at random among the first k, k = max(20% of the live
nodes, 1). The two sorted lists are kept with ``bisect``: finding a node's
place is O(log n); the insert is a memmove of the list (a few microseconds
at 4,096 nodes, measured in benchmarks/placement_scale.py).

``SpreadIndex`` orders every live node by the tasks running on it (SPREAD).

A chosen node may not fit a request larger than its free share (a node under
the threshold has more than half its resources free, which fits any task
asking for at most half a node); the pick then walks on in order over the
nodes that are not fully used (those sort last and are cut off with a bisect:
a task of the index needs some of each of its resources), so the common case
is O(log n), a saturated cluster too, and the worst case a walk over the nodes
with room left.
"""

from __future__ import annotations

import os
import random
from bisect import bisect_left, insort

SPREAD_THRESHOLD = float(os.environ.get("RAY_scheduler_spread_threshold", "0.5"))
TOP_K_FRACTION = float(os.environ.get("RAY_scheduler_top_k_fraction", "0.2"))
TOP_K_ABSOLUTE = int(os.environ.get("RAY_scheduler_top_k_absolute", "1"))
PICK_TRIES = 4  # random picks in the top k looking for a node with an idle executor


def fits(node, need: dict) -> bool:
    avail = node.avail
    for r, u in need.items():
        if avail.get(r, 0) < u:
            return False
    return True


_FULL = (1.0,)  # sorts before every busy entry of a node at utilisation >= 1


class ScoreIndex:
    """Nodes holding every resource in ``names``, in DEFAULT's order."""

    def __init__(self, names: tuple, ranks: dict):
        self.names = names
        self.ranks = ranks  # node id -> join order (shared by every index)
        self.zero: list = []  # [(rank, node_id)]: under the threshold, stable order
        self.busy: list = []  # [(utilisation, rank, node_id)]: over it, least used first
        self.entry: dict = {}  # node id -> its tuple in zero or busy
        self.by_id: dict = {}

    def __len__(self) -> int:
        return len(self.zero) + len(self.busy)

    def update(self, node) -> None:
        nid = node.node_id
        e = None
        if node.alive:
            total, avail = node.total, node.avail
            util = 0.0
            for r in self.names:
                t = total.get(r, 0)
                if t <= 0:  # it lacks one of them: not in this index
                    util = -1.0
                    break
                u = 1 - avail.get(r, 0) / t
                if u > util:
                    util = u
            if util >= 0:
                rank = self.ranks[nid]
                e = (rank, nid) if util < SPREAD_THRESHOLD else (util, rank, nid)
        old = self.entry.get(nid)
        if old == e:  # (a node under the threshold keeps its place: nothing to move)
            return
        if old is not None:
            del self.entry[nid]
            lst = self.zero if len(old) == 2 else self.busy
            i = bisect_left(lst, old)
            if i < len(lst) and lst[i] == old:
                del lst[i]
        if e is None:
            self.by_id.pop(nid, None)
            return
        insort(self.zero if len(e) == 2 else self.busy, e)
        self.entry[nid] = e
        self.by_id[nid] = node

    def at(self, i: int):
        z = self.zero
        e = z[i] if i < len(z) else self.busy[i - len(z)]
        return self.by_id[e[-1]]

    def pick(self, need: dict, alive: int, fits=fits):
        """DEFAULT's node for ``need``: (node to run on now or None, node chosen or None).
        At random among the top k (a few tries, preferring one with an idle executor);
        if none of those fits, the first node in order that does."""
        n = len(self)
        if not n:
            return None, None
        k = min(n, max(int(alive * TOP_K_FRACTION), TOP_K_ABSOLUTE, 1))
        chosen = None
        for _ in range(PICK_TRIES if k > 1 else 1):
            node = self.at(random.randrange(k) if k > 1 else 0)
            if fits(node, need):
                if node.idle:
                    return node, node
                if chosen is None:
                    chosen = node
        if chosen is not None:
            return None, chosen  # an executor is started there
        # The top k is full: walk on in order, over the nodes not fully used. A node
        # using all of one of ``names`` (utilisation >= 1, the busy list's tail) fits no
        # task of this index (each asks for some of every one of them), so a saturated
        # cluster answers "nothing fits" in O(log n), not a walk over every node.
        by_id, busy = self.by_id, self.busy
        for e in self.zero:
            node = by_id[e[1]]
            if fits(node, need):
                return (node if node.idle else None), node
        for i in range(bisect_left(busy, _FULL)):
            node = by_id[busy[i][2]]
            if fits(node, need):
                return (node if node.idle else None), node
        return None, None


class SpreadIndex:
    """Every live node, fewest running tasks first (SPREAD)."""

    def __init__(self, ranks: dict):
        self.ranks = ranks
        self.order: list = []  # [(running, rank, node_id)]
        self.entry: dict = {}
        self.by_id: dict = {}

    def update(self, node) -> None:
        nid = node.node_id
        old = self.entry.pop(nid, None)
        if old is not None:
            i = bisect_left(self.order, old)
            if i < len(self.order) and self.order[i] == old:
                del self.order[i]
        if not node.alive:
            self.by_id.pop(nid, None)
            return
        e = (node.running, self.ranks[nid], nid)
        insort(self.order, e)
        self.entry[nid] = e
        self.by_id[nid] = node

    def first_fit(self, need: dict, fits=fits):
        first = None
        for e in self.order:
            node = self.by_id[e[2]]
            if fits(node, need):
                if node.idle:
                    return node, first or node
                if first is None:
                    first = node
        return None, first


class NodeIndex:
    """The indexes Placement reads, kept current from ``NodeTable.changed``."""

    def __init__(self, table):
        self.table = table
        self.ranks: dict = {}  # node id -> join order
        self.next_rank = 0
        self.by_names: dict = {}  # names tuple -> ScoreIndex
        self._spread = None  # SpreadIndex, built when a SPREAD task first asks
        self.live: list = []  # live nodes, in no order (a random one: O(1))
        self.live_pos: dict = {}  # node id -> its index in ``live``

    def refresh(self) -> None:
        changed = self.table.changed
        if not changed:
            return
        self.table.changed = set()
        for node in changed:
            if node.node_id not in self.ranks:
                self.ranks[node.node_id] = self.next_rank
                self.next_rank += 1
            nid = node.node_id
            pos = self.live_pos.get(nid)
            if node.alive and pos is None:
                self.live_pos[nid] = len(self.live)
                self.live.append(node)
            elif not node.alive and pos is not None:
                last = self.live.pop()  # swap the last one into its place
                del self.live_pos[nid]
                if last is not node:
                    self.live[pos] = last
                    self.live_pos[last.node_id] = pos
            if self._spread is not None:
                self._spread.update(node)
            for idx in self.by_names.values():
                idx.update(node)

    @property
    def alive(self) -> int:
        return len(self.live)

    def random_live(self):
        return self.live[random.randrange(len(self.live))] if self.live else None

    @property
    def spread(self) -> SpreadIndex:
        if self._spread is None:
            self._spread = SpreadIndex(self.ranks)
            for node in self.live:
                self._spread.update(node)
        return self._spread

    def score_index(self, names: tuple) -> ScoreIndex:
        idx = self.by_names.get(names)
        if idx is None:
            idx = self.by_names[names] = ScoreIndex(names, self.ranks)
            for node in self.table.nodes.values():
                if node.node_id in self.ranks:
                    idx.update(node)
        return idx
