"""The broker's object directory: values, locations, transfers, spilling, freeing.

Small values are kept here as the frames they arrived in and pushed to their
owner and subscribers; large ones live in node stores and this directory only
knows where (``Obj.locations``), moving blobs between stores on demand
(FETCH -> BLOB -> STORE -> STORED) and spilling the least recently used ones
of a node that is over its limit.
"""

from __future__ import annotations

import logging

from brokerd.records import (
    Node,
    Obj,
    ObjState,
    TaskState,
)
from zray import _protocol as P
from zray import exceptions
from zray._serialization import serialize_error

log = logging.getLogger("zray.broker")


class ObjectDirectory:
    """Mixin of Broker; see brokerd/broker.py for the state it shares."""

    # ---------------------------------------------------------------- objects
    def on_fn(self, cid, m: P.Fn, frames):
        if len(frames) != 1:
            raise P.ProtocolError("FN carries exactly one frame")
        self.fns[m.fid] = frames[0]
        for oid in m.nested:
            self.escape(oid)  # captured in a function's closure: lives as long as the cluster

    def on_put(self, cid, m: P.Put, frames):
        obj = self.objects.get(m.oid)
        if obj is None:
            obj = self.objects[m.oid] = Obj(m.oid, cid)
        self.contain(obj, m.nested)
        if m.node_id is not None:
            self.add_location(obj, m.node_id, m.size)
        self.object_ready(obj, m.kind, frames, push_owner=False)

    # ------------------------------------------------------- object store
    def add_location(self, obj: Obj, node_id: bytes, size: int):
        node = self.nodes.get(node_id)
        obj.locations[node_id] = size
        obj.size = size
        if node is None:
            return
        node.lru[obj.oid] = size
        node.store_used += size
        if node.store_limit and node.store_used > node.store_limit:
            self.spill(node)

    def spill(self, node: Node):
        """Move the least recently used objects of a full store to disk."""
        target = int(node.store_limit * 0.8)
        victims = []
        while node.lru and node.store_used > target:
            oid, size = node.lru.popitem(last=False)
            node.store_used -= size
            node.spilled += size
            victims.append(oid)
        if victims:
            log.info("node %s store over %d MB: spilling %d objects", node.node_id.hex(),
                     node.store_limit // 10**6, len(victims))
            self.send(node.ident, P.encode(P.Spill(victims)))

    def touch(self, obj: Obj, node_id: bytes):
        node = self.nodes.get(node_id)
        if node is not None and obj.oid in node.lru:
            node.lru.move_to_end(obj.oid)

    def deliver(self, cid: bytes, obj: Obj, want_data: bool):
        """Send ``obj`` to client ``cid``: inline, as "in your store", as "ready
        elsewhere" (want_data=False), or by moving it to the client's node first."""
        if not obj.locations:
            if obj.lost:
                self.send(P.inbox_ident(cid), P.encode(P.Obj(obj.oid, P.ERROR)), self.lost_error(obj.oid))
            else:
                self.send(P.inbox_ident(cid), P.encode(P.Obj(obj.oid, obj.kind)), obj.frames)
            return
        c = self.clients.get(cid)
        cnode = c.node_id if c is not None else b""
        if cnode in obj.locations:
            self.touch(obj, cnode)
            self.send(P.inbox_ident(cid), P.encode(P.Obj(obj.oid, obj.kind, cnode)))
        elif not want_data:
            self.send(P.inbox_ident(cid), P.encode(P.Obj(obj.oid, obj.kind, next(iter(obj.locations)))))
        elif cnode and cnode in self.nodes:
            self.transfer(obj, P.node_ident(cnode), cid)
        else:
            self.transfer(obj, P.client_dest(cid), cid)

    def transfer(self, obj: Obj, dest: bytes, cid: bytes):
        waiting = obj.inflight.get(dest)
        if waiting is not None:
            waiting.append(cid)
            return
        for node_id in obj.locations:
            node = self.nodes.get(node_id)
            if node is not None and node.alive:
                obj.inflight[dest] = [cid]
                obj.inflight_src[dest] = node_id
                self.send(node.ident, P.encode(P.Fetch(obj.oid, dest)))
                return
        self.send(P.inbox_ident(cid), P.encode(P.Obj(obj.oid, P.ERROR)), self.lost_error(obj.oid))

    def lost_error(self, oid: bytes):
        return serialize_error(exceptions.ObjectLostError(
            oid.hex(), f"Object {oid.hex()} is lost: every node that held a copy is gone."))

    def on_blob(self, node_id, m: P.Blob, frames):
        oid, dest, codec = m
        obj = self.objects.get(oid)
        if obj is None:
            return
        if codec < 0:  # the source did not have it after all
            obj.locations.pop(node_id, None)
            waiting = obj.inflight.pop(dest, [])
            obj.inflight_src.pop(dest, None)
            if not obj.locations:
                obj.lost = True
            for cid in waiting:
                self.deliver(cid, obj, True)
            return
        if dest[:1] == b"N":
            node = self.nodes.get(dest[1:])
            if node is not None:
                self.send(node.ident, P.encode(P.Store(oid, codec)), frames)
                return
            waiting = obj.inflight.pop(dest, [])
            for cid in waiting:
                self.transfer(obj, P.client_dest(cid), cid)
            return
        for cid in obj.inflight.pop(dest, []):
            self.send(P.inbox_ident(cid), P.encode(P.Obj(oid, obj.kind, None, codec)), frames)

    def on_stored(self, node_id, m: P.Stored, frames):
        oid, size = m
        obj = self.objects.get(oid)
        dest = P.node_ident(node_id)
        if obj is None:  # freed while in flight
            node = self.nodes.get(node_id)
            if node is not None:
                self.send(node.ident, P.encode(P.Free([oid])))
            return
        waiting = obj.inflight.pop(dest, [])
        if size < 0:
            for cid in waiting:
                self.transfer(obj, P.client_dest(cid), cid)
            return
        self.add_location(obj, node_id, size)
        for cid in waiting:
            self.send(P.inbox_ident(cid), P.encode(P.Obj(oid, obj.kind, node_id)))

    def escape(self, oid):
        obj = self.objects.get(oid)
        if obj is not None:
            obj.escaped = True

    def object_ready(self, obj: Obj, kind: int, frames, push_owner: bool = True):
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
        if obj.waiting:
            waiting, obj.waiting = obj.waiting, []
            for task in waiting:
                if task.state != TaskState.WAITING_ARGS:
                    continue
                if kind == P.ERROR:
                    self.fail_task(task, frames)
                    continue
                task.pending -= 1
                if task.pending == 0:
                    self.task_ready(task)
        self.maybe_free(obj)

    # ------------------------------------------------------ reference counts
    # An object lives while its owner holds a ref (until RELEASE), while any other
    # client holds one (REFS +1 .. -1: ``holders``), while an unfinished task has it
    # among its arguments, or while a stored object contains it (``pins``).
    def pin(self, oid: bytes) -> bool:
        obj = self.objects.get(oid)
        if obj is None:
            return False
        obj.pins += 1
        return True

    def unpin(self, oid: bytes):
        obj = self.objects.get(oid)
        if obj is not None:
            obj.pins -= 1
            self.maybe_free(obj)

    def contain(self, obj: Obj, nested):
        """``obj``'s value holds refs to ``nested``: keep them while ``obj`` lives."""
        for oid in nested:
            if self.pin(oid):
                obj.contained.append(oid)

    def on_refs(self, cid, m: P.Refs, frames):
        """A client's refs appeared (+1) / all went away (-1), in order."""
        client = self.clients.get(cid)
        objects = self.objects
        for oid, delta in m.ops:
            obj = objects.get(oid)
            if obj is None:
                continue
            if delta > 0:
                obj.holders.add(cid)
                if client is not None:
                    client.holds.add(oid)
                continue
            obj.holders.discard(cid)
            if client is not None:
                client.holds.discard(oid)
            if obj.owner == cid:
                obj.released = True
            self.maybe_free(obj)

    def drop_client_refs(self, cid: bytes, holds: set):
        """A client is gone: its borrowed refs and the objects it owned go with it."""
        for oid in holds:
            obj = self.objects.get(oid)
            if obj is not None:
                obj.holders.discard(cid)
                self.maybe_free(obj)
        for obj in [o for o in self.objects.values() if o.owner == cid]:
            obj.released = True
            self.maybe_free(obj)

    def maybe_free(self, obj: Obj):
        if (obj.released and obj.pins <= 0 and not obj.holders and not obj.escaped
                and obj.state == ObjState.READY):
            self.free(obj)

    def free(self, obj: Obj):
        self.objects.pop(obj.oid, None)
        contained, obj.contained = obj.contained, []
        for oid in contained:
            self.unpin(oid)
        for node_id in obj.locations:
            node = self.nodes.get(node_id)
            if node is None:
                continue
            size = node.lru.pop(obj.oid, None)
            if size is not None:
                node.store_used -= size
            else:
                node.spilled -= obj.locations[node_id]
            self.send(node.ident, P.encode(P.Free([obj.oid])))
        obj.locations = {}

    def on_sub(self, cid, m: P.Sub, frames):
        for oid in m.oids:
            obj = self.objects.get(oid)
            if obj is None:
                err = serialize_error(exceptions.ObjectLostError(
                    oid.hex(), f"Object {oid.hex()} is not known to the cluster: it was freed "
                               "or never existed."))
                self.send(P.inbox_ident(cid), P.encode(P.Obj(oid, P.ERROR)), err)
            elif obj.state == ObjState.READY:
                self.deliver(cid, obj, True)
            else:
                obj.subscribers.append(cid)

    def on_release(self, cid, m: P.Release, frames):
        self.on_refs(cid, P.Refs([(oid, -1) for oid in m.oids]), frames)
