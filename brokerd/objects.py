"""The object directory: values, locations, transfers, spilling, reference counts.

::

    PUT / DONE / YIELD --ready()--> Obj READY --> pushed to its owner and subscribers
                                      |--> tasks waiting on it: returned to the engine
    SUB --subscribe()--> deliver now, or when ready
    REFS / RELEASE --refs()--> holders, released --> free() when nothing refers to it
    large values: locations {node: size}; transfer() PULL (the node fetches it from a
        holder's peer socket) -> STORED; PULL_FAILED, or no peer socket: FETCH -> BLOB ->
        STORE -> STORED
    node dies: node_lost() -> lost objects -> engine rebuilds (rebuilding(): PENDING again)

Small values are kept here as the frames they arrived in; large ones live in
node stores and this directory only knows where (``Obj.locations``), moving
blobs between stores on demand and spilling the least recently used ones of a
node that is over its limit.

An object lives while its owner holds a ref (until it releases it), while any
other client holds one (``holders``), while an unfinished task has it among its
arguments, while a stored object contains it (``pins``), or while a ref to it
handed to a client inside an inline reply (a direct actor call's or a leased
task's, REFS 2) has not been taken by that client (REFS 3) and it is connected
(``handoffs``).

Owns: ``objects`` (Obj records), ``fns`` (function and class blobs by id) and
the store accounting fields of Node records (``lru``, ``store_used``,
``spilled``). Reads: clients (which node a client is on). Never touches a task:
``ready`` returns the tasks an object wakes or fails, the engine moves them.
Sends: OBJ, FETCH, STORE, PULL, FREE, SPILL (through the outbox).
"""

from __future__ import annotations

import logging
import os
import time

from brokerd.nodes import NodeTable
from brokerd.outbox import Outbox
from brokerd.records import Node, Obj, ObjState, TaskState
from zray import _peer, exceptions
from zray import _protocol as P
from zray._serialization import serialize_error

log = logging.getLogger("zray.broker")

# Lineage kept for rebuilding lost objects (task specs and argument frames), in bytes:
# past it, new results are not rebuildable (Ray's max_lineage_bytes, 1 GB by default).
MAX_LINEAGE_BYTES = int(os.environ.get("ZRAY_MAX_LINEAGE_BYTES") or 1 << 30)
# After a pull that its holder never answered, blobs from that holder to that node come
# through the broker for this long (then a direct pull is tried again).
NO_DIRECT_S = 60.0


class ObjectDirectory:
    def __init__(self, out: Outbox, nodes: NodeTable, clients: dict):
        self.out = out
        self.nodes = nodes
        self.clients = clients  # cid -> ClientInfo, read only
        self.objects: dict[bytes, Obj] = {}
        self.fns: dict[bytes, object] = {}
        self.released_actors: list = []  # actor ids whose handle object was freed
        self.lineage_bytes = 0  # spec + argument bytes of the tasks kept for lineage
        self.access = None  # brokerd.access.RefAccess: who may use which object
        # After a broker restart: oid -> clients that say they hold a ref to it, until its
        # owner puts it again (then they are its holders) or the grace period ends.
        self.restart_holders: dict = {}
        self.direct_pulls = 0  # transfers a node made straight from another (PULL)
        self.pull_fallbacks = 0  # ... that failed and came through here instead
        self.relayed_bytes = 0  # blob bytes this broker carried (BLOB to STORE or OBJ)
        # (holder, puller) pairs whose pulls went unanswered -> until when blobs between
        # them come through here (a firewall between two hosts: do not wait each time).
        self.no_direct: dict = {}

    # ------------------------------------------------------------- records
    def get(self, oid: bytes):
        return self.objects.get(oid)

    def create(self, oid: bytes, owner: bytes) -> Obj:
        obj = self.objects[oid] = Obj(oid, owner)
        if self.restart_holders:
            held = self.restart_holders.pop(oid, None)
            if held:  # borrowers said so before its owner put it again (a restart)
                obj.holders |= held
                for cid in held:
                    c = self.clients.get(cid)
                    if c is not None:
                        c.holds.add(oid)
        return obj

    def ensure(self, oid: bytes, owner: bytes) -> Obj:
        obj = self.objects.get(oid)
        if obj is None:
            obj = self.objects[oid] = Obj(oid, owner)
        return obj

    def create_handle(self, actor_id: bytes, owner: bytes) -> Obj:
        """The object that stands for a non-detached actor's handles: counted like any
        object (its owner, borrowers, tasks that carry a handle); when it is freed the
        actor's id goes to ``released_actors`` for the engine."""
        obj = self.create(P.object_id(actor_id, 0), owner)
        obj.state = ObjState.READY
        obj.actor = actor_id
        return obj

    def take_released_actors(self) -> list:
        out, self.released_actors = self.released_actors, []
        return out

    def register_fn(self, fid: bytes, blob, captured: list) -> None:
        self.fns[fid] = blob
        for oid in captured:  # captured in a function's closure: lives as long as the cluster
            obj = self.objects.get(oid)
            if obj is not None:
                obj.escaped = True

    # ----------------------------------------------------------- readiness
    def ready(self, obj: Obj, kind: int, frames, push_owner: bool = True) -> list:
        """``obj`` has its value (or error). Push it to its owner and subscribers;
        return [(task, error frames or None)] for the tasks that waited on it."""
        obj.state = ObjState.READY
        obj.kind = kind
        obj.frames = frames
        if not obj.locations:
            obj.size = sum(len(f) for f in frames)
        if push_owner and not obj.released:
            self.deliver(obj.owner, obj, False)
        if obj.subscribers:
            for cid in obj.subscribers:
                self.deliver(cid, obj, True)
            obj.subscribers = []
        woken = []
        if obj.waiting:
            waiting, obj.waiting = obj.waiting, []
            for task in waiting:
                if task.state != TaskState.WAITING_ARGS:
                    continue
                if kind == P.ERROR:
                    woken.append((task, frames))
                    continue
                task.pending -= 1
                if task.pending == 0:
                    woken.append((task, None))
        self.maybe_free(obj)
        return woken

    def subscribe(self, cid: bytes, oids: list) -> None:
        for oid in oids:
            obj = self.objects.get(oid)
            if obj is None:
                self.unknown(cid, oid)
            elif obj.state == ObjState.READY:
                self.deliver(cid, obj, True)
            else:
                obj.subscribers.append(cid)

    def unknown(self, cid: bytes, oid: bytes) -> None:
        """Answer a SUB for an object that does not exist (or that ``cid`` may not use)."""
        if oid in self.restart_holders:
            why = ("was lost when the broker restarted: its value lived only in the broker "
                   "and no client that reconnected held a copy of it")
        else:
            why = "is not known to the cluster: it was freed or never existed"
        err = serialize_error(exceptions.ObjectLostError(oid.hex(), f"Object {oid.hex()} {why}."))
        self.out.send(P.inbox_ident(cid), P.encode(P.Obj(oid, P.ERROR)), err)

    def deliver(self, cid: bytes, obj: Obj, want_data: bool) -> None:
        """Send ``obj`` to client ``cid``: inline, as "in your store", as "ready
        elsewhere" (want_data=False), or by moving it to the client's node first."""
        send = self.out.send
        if not obj.locations:
            if obj.lost:
                send(P.inbox_ident(cid), P.encode(P.Obj(obj.oid, P.ERROR)), self.lost_error(obj))
            else:
                send(P.inbox_ident(cid), P.encode_obj(obj.oid, obj.kind), obj.frames)
            return
        c = self.clients.get(cid)
        cnode = c.node_id if c is not None else b""
        if cnode in obj.locations:
            self.touch(obj, cnode)
            send(P.inbox_ident(cid), P.encode(P.Obj(obj.oid, obj.kind, cnode)))
        elif not want_data:
            send(P.inbox_ident(cid), P.encode(P.Obj(obj.oid, obj.kind, next(iter(obj.locations)))))
        elif cnode and cnode in self.nodes.nodes:
            self.transfer(obj, P.node_ident(cnode), cid)
        else:
            self.transfer(obj, P.client_dest(cid), cid)

    def bytes_by_node(self, oids) -> dict:
        """{node id: bytes of these objects its store holds}, for locality."""
        out: dict = {}
        for oid in oids:
            obj = self.objects.get(oid)
            if obj is not None:
                for node_id, size in obj.locations.items():
                    out[node_id] = out.get(node_id, 0) + size
        return out

    # --------------------------------------------------------- node stores
    def add_location(self, obj: Obj, node_id: bytes, size: int) -> None:
        node = self.nodes.nodes.get(node_id)
        obj.locations[node_id] = size
        obj.size = size
        if node is None:
            return
        node.lru[obj.oid] = size
        node.store_used += size
        if node.store_limit and node.store_used > node.store_limit:
            self.spill(node)

    def need_space(self, cid: bytes, nbytes: int) -> None:
        """A client's put waits for room in its node's store (NEED_SPACE): spill ``nbytes``
        more there than the limit asks (the store holds writes the broker has not heard of)."""
        c = self.clients.get(cid)
        node = self.nodes.nodes.get(c.node_id) if c is not None else None
        if node is not None and node.store_limit:
            self.spill(node, nbytes)

    def spill(self, node: Node, extra: int = 0) -> None:
        """Move the least recently used objects of a full store to disk (``extra``: bytes
        more than the limit asks, for a put that waits for room)."""
        target = min(int(node.store_limit * 0.8), node.store_used - extra)
        victims = []
        while node.lru and node.store_used > target:
            oid, size = node.lru.popitem(last=False)
            node.store_used -= size
            node.spilled += size
            victims.append(oid)
        if victims:
            log.info("node %s store over %d MB: spilling %d objects", node.node_id.hex(),
                     node.store_limit // 10**6, len(victims))
            self.out.send(node.ident, P.encode(P.Spill(victims)))

    def touch(self, obj: Obj, node_id: bytes) -> None:
        node = self.nodes.nodes.get(node_id)
        if node is not None and obj.oid in node.lru:
            node.lru.move_to_end(obj.oid)

    def transfer(self, obj: Obj, dest: bytes, cid: bytes, direct: bool = True) -> None:
        """Move ``obj`` to ``dest`` for client ``cid``: a node pulls it straight from a
        holder (PULL, zray/_peer.py) when both have peer sockets, else it comes
        through here (FETCH -> BLOB -> STORE, or BLOB -> OBJ for a client)."""
        waiting = obj.inflight.get(dest)
        if waiting is not None:
            waiting.append(cid)
            return
        puller = self.nodes.nodes.get(dest[1:]) if direct and dest[:1] == b"N" else None
        for node_id in obj.locations:
            node = self.nodes.nodes.get(node_id)
            if node is not None and node.alive:
                obj.inflight[dest] = [cid]
                obj.inflight_src[dest] = node_id
                if puller is not None and puller.peer and node.peer and not (
                        self.no_direct and self._no_direct(node_id, puller.node_id)):
                    self.direct_pulls += 1
                    grant = _peer.ticket(node.peer[1], obj.oid, puller.node_id)
                    self.out.send(dest, P.encode(P.Pull(obj.oid, node_id, node.peer[0], grant,
                                                        obj.locations[node_id])))
                else:
                    self.out.send(node.ident, P.encode(P.Fetch(obj.oid, dest)))
                return
        self.out.send(P.inbox_ident(cid), P.encode(P.Obj(obj.oid, P.ERROR)), self.lost_error(obj))

    def _no_direct(self, src: bytes, dst: bytes) -> bool:
        until = self.no_direct.get((src, dst))
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self.no_direct[(src, dst)]
        return False

    def pull_failed(self, node_id: bytes, m: P.PullFailed) -> None:
        """Node ``node_id`` could not pull ``m.oid`` from ``m.src``: move it through here
        (the holder's FETCH answers whether it still has a copy)."""
        obj = self.objects.get(m.oid)
        dest = P.node_ident(node_id)
        if obj is None or obj.inflight_src.get(dest) != m.src:
            return  # freed, or a transfer that was already started again elsewhere
        self.pull_fallbacks += 1
        if m.unreachable and len(self.no_direct) < 100_000:
            log.warning("node %s cannot reach node %s's peer socket: blobs between them go "
                        "through the broker for %.0f s", node_id.hex(), m.src.hex(),
                        NO_DIRECT_S)
            self.no_direct[(m.src, node_id)] = time.monotonic() + NO_DIRECT_S
        node = self.nodes.nodes.get(m.src)
        if node is not None and node.alive and m.src in obj.locations:
            self.out.send(node.ident, P.encode(P.Fetch(obj.oid, dest)))
            return
        obj.inflight_src.pop(dest, None)
        for cid in obj.inflight.pop(dest, []):
            self.transfer(obj, dest, cid, direct=False)

    @staticmethod
    def lost_error(obj: Obj):
        """A put object (Ray: ObjectLostError), or a task's result that cannot be rebuilt
        (ObjectReconstructionFailedError, saying why)."""
        oid = obj.oid.hex()
        msg = f"Object {oid} is lost: every node that held a copy is gone"
        if obj.no_lineage:
            return serialize_error(exceptions.ObjectReconstructionFailedError(
                oid, f"{msg}, and it cannot be rebuilt: {obj.no_lineage}."))
        return serialize_error(exceptions.ObjectLostError(oid, msg + "."))

    def blob(self, src_node: bytes, m: P.Blob, frames) -> None:
        """A node answered FETCH: forward the blob to the node or client that wants it."""
        oid, dest, codec = m
        obj = self.objects.get(oid)
        if obj is None:
            return
        if codec < 0 or len(frames) != 1:  # the source did not have it after all
            log.warning("node %s did not have object %s (asked for it for %s)",
                        src_node.hex(), oid.hex(), dest.hex())
            obj.locations.pop(src_node, None)
            waiting = obj.inflight.pop(dest, [])
            obj.inflight_src.pop(dest, None)
            if not obj.locations:
                obj.lost = True
            for cid in waiting:
                self.deliver(cid, obj, True)
            return
        self.relayed_bytes += len(frames[0])
        if dest[:1] == b"N":
            node = self.nodes.nodes.get(dest[1:])
            if node is not None:
                self.out.send(node.ident, P.encode(P.Store(oid, codec)), frames)
                return
            for cid in obj.inflight.pop(dest, []):
                self.transfer(obj, P.client_dest(cid), cid)
            return
        for cid in obj.inflight.pop(dest, []):
            self.out.send(P.inbox_ident(cid), P.encode(P.Obj(oid, obj.kind, None, codec)), frames)

    def stored(self, node_id: bytes, m: P.Stored) -> None:
        """A node wrote a transferred blob into its store (size -1: it could not)."""
        oid, size = m
        obj = self.objects.get(oid)
        dest = P.node_ident(node_id)
        if obj is None:  # freed while in flight
            node = self.nodes.nodes.get(node_id)
            if node is not None:
                self.out.send(node.ident, P.encode(P.Free([oid])))
            return
        waiting = obj.inflight.pop(dest, [])
        if size < 0:
            for cid in waiting:
                self.transfer(obj, P.client_dest(cid), cid)
            return
        if node_id not in obj.locations:  # (a second copy after a retried transfer: once)
            self.add_location(obj, node_id, size)
        for cid in waiting:
            self.out.send(P.inbox_ident(cid), P.encode(P.Obj(oid, obj.kind, node_id)))

    def node_lost(self, node_id: bytes) -> list:
        """A node died: its copies are gone. Returns the objects that lost their last
        copy (marked ``lost``); the engine rebuilds those it can (``rebuilding``) and
        then calls ``restart_transfers``."""
        lost = []
        for obj in self.objects.values():
            if node_id in obj.locations:
                del obj.locations[node_id]
                if not obj.locations:
                    obj.lost = True
                    lost.append(obj)
        if lost:
            log.warning("node %s died with the last copy of %d objects (%s...)",
                        node_id.hex(), len(lost), ", ".join(o.oid.hex() for o in lost[:5]))
        return lost

    def rebuilding(self, obj: Obj) -> None:
        """``obj`` (lost) is being rebuilt by its task: it is pending again; clients
        waiting for a transfer of it wait for the new value instead."""
        obj.state = ObjState.PENDING
        obj.lost = False
        obj.frames = []
        for dest in list(obj.inflight):
            obj.inflight_src.pop(dest, None)
            for cid in obj.inflight.pop(dest):
                if cid not in obj.subscribers:
                    obj.subscribers.append(cid)

    def restart_transfers(self, node_id: bytes) -> None:
        """Transfers to or from a dead node start again from another copy, or fail
        with the object's lost error."""
        dest_of_node = P.node_ident(node_id)
        for obj in self.objects.values():
            if obj.inflight_src:
                for dest in [d for d, src in obj.inflight_src.items()
                             if src == node_id or d == dest_of_node]:
                    obj.inflight_src.pop(dest, None)
                    for cid in obj.inflight.pop(dest, []):
                        self.deliver(cid, obj, True)

    # ------------------------------------------------------ reference counts
    def pin(self, oid: bytes) -> bool:
        obj = self.objects.get(oid)
        if obj is None:
            return False
        obj.pins += 1
        return True

    def unpin(self, oid: bytes) -> None:
        obj = self.objects.get(oid)
        if obj is not None:
            obj.pins -= 1
            self.maybe_free(obj)

    def contain(self, obj: Obj, nested, cid: bytes = b"") -> None:
        """``obj``'s value holds refs to ``nested``: keep them while ``obj`` lives.
        ``cid`` (the sender) must be allowed to use each of them (brokerd/access.py)."""
        if not nested:
            return
        access = self.access
        for oid in nested:
            child = self.objects.get(oid)
            if child is None or (cid and access is not None
                                 and not access.may_use(cid, oid)):
                continue
            child.pins += 1
            obj.contained.append(oid)
            if child.containers is None:
                child.containers = []
            child.containers.append(obj.oid)
        if access is not None:
            access.contained()

    def refs(self, cid: bytes, ops) -> None:
        """A client's refs appeared (+1) / all went away (-1) / were handed to another
        client inside an inline reply (2) / were taken from such a hand-off (3), in order."""
        client = self.clients.get(cid)
        objects = self.objects
        handed = False
        for op in ops:
            oid, delta = op[0], op[1]
            obj = objects.get(oid)
            if obj is None:
                continue
            if delta == 1 or delta == 3:
                obj.holders.add(cid)
                if client is not None:
                    client.holds.add(oid)
                if delta == 3:
                    self._hand_count(obj, cid, -1)
                continue
            if delta == 0:  # pickled out of band: nobody can count it any more
                obj.escaped = True
                continue
            if delta == 2:
                self._hand_count(obj, op[2], 1)
                handed = True
                continue
            obj.holders.discard(cid)
            if client is not None:
                client.holds.discard(oid)
            if obj.owner == cid:
                obj.released = True
            self.maybe_free(obj)
        if handed and self.access is not None:
            self.access.contained()  # (the recipient's SUB, +1 or take may wait for it)

    def _hand_count(self, obj: Obj, to: bytes, delta: int) -> None:
        """One more (+1, REFS 2) or fewer (-1, REFS 3) ref to ``obj`` handed to client
        ``to`` and not taken yet. A hand-off to a client that is gone counts for nothing
        (it will never take it); the object may go once none is left."""
        c = self.clients.get(to)
        if c is None:
            return
        counts = obj.handoffs
        if counts is None:
            counts = obj.handoffs = {}
        n = counts.get(to, 0) + delta
        if n:
            counts[to] = n
            c.handed.add(obj.oid)
            return
        counts.pop(to, None)
        c.handed.discard(obj.oid)
        if not counts:
            obj.handoffs = None
            self.maybe_free(obj)

    def drop_client(self, cid: bytes, holds: set, handed=()) -> None:
        """A client is gone: its borrowed refs, the refs handed to it and not taken, and
        the objects it owned go with it."""
        for oid in handed:
            obj = self.objects.get(oid)
            if obj is not None and obj.handoffs:
                obj.handoffs.pop(cid, None)
                if not obj.handoffs:
                    obj.handoffs = None
                    self.maybe_free(obj)
        for oid in holds:
            obj = self.objects.get(oid)
            if obj is not None:
                obj.holders.discard(cid)
                self.maybe_free(obj)
        for obj in [o for o in self.objects.values() if o.owner == cid]:
            obj.released = True
            self.maybe_free(obj)

    # ------------------------------------------------------------- lineage
    def keep_lineage(self, task) -> bool:
        """Keep ``task`` (finished, retryable, some results in node stores) to rebuild
        its results: its spec, argument frames and argument objects stay while one of
        them lives. False when the lineage budget is spent."""
        cost = len(task.spec_bytes or b"") + sum(len(f) for f in task.frames)
        if self.lineage_bytes + cost > MAX_LINEAGE_BYTES:
            return False
        task.lineage_cost = cost
        self.lineage_bytes += cost
        return True

    def drop_lineage(self, task) -> None:
        """The last result of ``task`` kept for lineage is freed: let its arguments go
        (unless it is running again, when the engine lets them go at its end)."""
        self.lineage_bytes -= task.lineage_cost
        task.lineage_cost = 0
        if task.state not in (TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELLED):
            return
        pinned = task.deps + task.holds
        task.deps, task.holds, task.frames = [], [], []
        for oid in pinned:
            self.unpin(oid)

    def maybe_free(self, obj: Obj) -> None:
        if (obj.released and obj.pins <= 0 and not obj.holders and not obj.escaped
                and obj.handoffs is None and obj.state == ObjState.READY):
            self.free(obj)

    def free(self, obj: Obj) -> None:
        self.objects.pop(obj.oid, None)
        if obj.actor:
            self.released_actors.append(obj.actor)
        if obj.lineage is not None:
            task, obj.lineage = obj.lineage, None
            task.lineage -= 1
            if task.lineage == 0:
                self.drop_lineage(task)
        contained, obj.contained = obj.contained, []
        for oid in contained:
            child = self.objects.get(oid)
            if child is not None and child.containers:
                try:
                    child.containers.remove(obj.oid)
                except ValueError:
                    pass
            self.unpin(oid)
        for node_id in obj.locations:
            node = self.nodes.nodes.get(node_id)
            if node is None:
                continue
            size = node.lru.pop(obj.oid, None)
            if size is not None:
                node.store_used -= size
            else:
                node.spilled -= obj.locations[node_id]
            self.out.send(node.ident, P.encode(P.Free([obj.oid])))
        obj.locations = {}
