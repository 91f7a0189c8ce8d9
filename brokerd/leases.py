"""Leased executors: the broker's side. An idle pool executor lent to one client.

::

    holder (driver / executor with a store on node N)
        --REQ task_lease {fid, resources}--> grant(): an idle executor on N (no runtime_env),
              the shape's resources taken as for a running task (``_Hold``), the executor
              BUSY ("leased"), LEASE(active) [+ fn blob] to it; the reply names it
    holder --DCALL / DDONE on the executor's lane (zray/_lease.py, workerd/lease.py): the
              broker sees none of it
    executor --REQ lease_books {lease_id, events, dropped}--> the tasks it ran into the
              event log (list_tasks, get_task, timeline), about once a second; an event
              is [task id, name, start, end, failed, error, parent task id, retry]
    executor --REQ lease_end {lease_id, events, dropped}--> end(): books, resources back,
              the executor IDLE again (it ended the lease: idle, holder gone, work queued)
    holder --REQ lease_return {lease_id}--> give_back(): it wants another function's lease,
              or a task of its goes through the broker (it keeps one idle lease): the
              resources now, the executor back in the pool once its lease_end comes
    holder --REQ lease_cancel {task_id, force, recursive, lease_id}--> INTERRUPT (or KILL_EXEC when forced) to
              the leased executor, as for a task the broker runs itself
    tasks queued (each liveness check) --revoke()--> LEASE(active=False) to each leased
              executor: it ends the lease at once (lease_end), as when it idles
    executor's task waits in get() (BLOCK) --lend()--> its CPU lent, as for a task
    executor dies --executor_gone()--> resources back (the holder sees its lane close)

Owns: ``by_exec`` (executor cid -> Lease), ``by_holder`` (holder cid -> {lease id ->
Lease}) and the counters (``granted``, ``ended``, ``tasks``, ``refused``). Up to
MAX_PER_HOLDER leases per holder (one per idle executor it asks for, zray/_lease.py); one
resource shape (CPUs only) and one function per lease (the function's blob goes with
the LEASE when the executor has not loaded it). Sends: LEASE, INTERRUPT, KILL_EXEC.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from brokerd.placement import take_idle
from brokerd.records import ExecState
from zray import _protocol as P

log = logging.getLogger("zray.broker")

MAX_EVENTS = 5000  # task events per report
MAX_ERROR_CHARS = 1100  # an event's error: "raised: " and the tail of the error's text
MAX_PER_HOLDER = 64  # leases one holder may hold at once


@dataclass(eq=False)
class _Hold:
    """What a lease holds of its node, in the shape NodeTable.acquire/release/lend_cpu
    take from a Task."""

    hold: dict
    node: object = None
    blocked: bool = False
    gpu_alloc: list = field(default_factory=list)


@dataclass(eq=False)
class Lease:
    lease_id: bytes
    holder: bytes
    ex: object  # the Executor
    held: _Hold
    tasks: int = 0
    revoked: bool = False  # asked to end (tasks were queued)


class TaskLeases:
    def __init__(self, out, engine):
        self.out = out
        self.engine = engine
        self.by_exec: dict = {}
        self.by_holder: dict = {}
        # task id -> (job id, resources, executor cid, pid, parent task id): leased tasks in
        # the event log
        self.lease_tasks: dict = {}
        self.returned: dict = {}  # executor cid -> its lease its holder gave back (books due)
        self.granted = self.ended = self.tasks = self.refused = self.revoked = 0

    # ------------------------------------------------------------------ grant
    def grant(self, cid: bytes, args: dict):
        """REQ task_lease: lend an idle executor on the caller's node; {"refused": why} if
        none can be lent now ("no idle executor": a CPU is free for the broker's path)."""
        engine = self.engine
        c = engine.clients.get(cid)
        fid, res = args.get("fid"), args.get("resources")
        if (type(fid) is not bytes or len(fid) > 64 or type(res) is not dict or set(res) != {"CPU"}
                or type(res["CPU"]) is not int or res["CPU"] <= 0 or set(args) - {"fid", "resources"}):
            raise ValueError("task_lease: {fid: bytes, resources: {CPU: units > 0}}")
        if c is None or c.kind not in ("driver", "executor"):
            raise PermissionError("task_lease: only a driver or an executor may hold a lease")
        held = self.by_holder.get(cid)
        if held is not None and len(held) >= MAX_PER_HOLDER:
            self.refused += 1
            return {"refused": "leases per holder", "free": 0}
        node = engine.nodes.nodes.get(c.node_id)
        blob = engine.objects.fns.get(fid)
        why = ("no node" if node is None or not node.alive else "function unknown"
               if blob is None else "tasks queued"
               if engine.placement.wants_resources and engine.placement.pending()
               else "resources busy" if not engine.nodes.fits(node, res) else "")
        ex = take_idle(node.idle, "", True) if not why else None
        if ex is None:
            self.refused += 1
            why = why or "no idle executor"
            log.debug("no lease for %s: %s", cid.hex(), why)
            # free: the lease's shapes that fit the node now (the holder sends that many
            # of its waiting calls through the broker rather than queue them on a lease)
            free = int(min(node.avail.get(r, 0) // u for r, u in res.items())) \
                if why == "no idle executor" else 0
            return {"refused": why, "free": free}
        lease = Lease(os.urandom(P.LEASE_ID_LEN), cid, ex, _Hold(dict(res)))
        engine.nodes.acquire(lease.held, node)
        engine.moves.move(ex, ExecState.BUSY, f"leased to {cid.hex()}")
        self.by_exec[ex.cid] = lease
        self.by_holder.setdefault(cid, {})[lease.lease_id] = lease
        frames = []
        if fid not in ex.fns:
            frames.append(blob)
            ex.fns.add(fid)
        self.out.send(P.inbox_ident(ex.cid), P.encode(P.Lease(lease.lease_id, cid, True, fid)),
                      frames)
        self.granted += 1
        return {"lease_id": lease.lease_id, "executor": ex.cid, "pid": ex.pid}

    # ------------------------------------------------------------------ books
    def books(self, cid: bytes, args: dict, end: bool = False) -> None:
        """REQ lease_books / lease_end from the leased executor: its tasks' events; at the
        end, the executor goes back to the pool."""
        op = "lease_end" if end else "lease_books"
        lease_id = args.get("lease_id") if type(args) is dict else None
        if (type(lease_id) is not bytes
                or set(args) - ({"lease_id", "events", "dropped", "adopted"} if end
                                else {"lease_id", "events", "dropped"})
                or type(args.get("adopted", True)) is not bool):
            raise ValueError(f"{op}: {{lease_id, events, dropped}} (lease_end: and adopted, "
                             f"a bool) from the leased executor")
        lease = self.by_exec.get(cid)
        if lease is None or lease_id != lease.lease_id:
            # returned by its holder before the executor saw it end: its last books
            lease = self.returned.get(cid)
            if lease is None or lease_id != lease.lease_id:
                return  # (ended already: nothing of it is held)
            self._events(lease, args.get("events", []), args.get("dropped", 0))
            if end:  # its loop is over: only now may it be lent or given work again
                del self.returned[cid]
                self._pool(lease.ex, "lease ended")
            return
        self._events(lease, args.get("events", []), args.get("dropped", 0))
        if end:
            self._release(lease, "lease ended")
            if not args.get("adopted", True):
                # its holder's lane was never taken: the end on the lane may never come (it
                # connected after the lease ended): the holder learns it here, and sends
                # its calls through the broker as never run
                self.out.send(P.inbox_ident(lease.holder), P.encode(
                    P.Lease(lease.lease_id, lease.holder, False, b"")))

    def give_back(self, cid: bytes, args: dict) -> None:
        """REQ lease_return from the holder: it wants a lease of another function. The
        executor goes back to the pool now; it sees the lane close and sends its books."""
        lease_id = args.get("lease_id")
        if type(lease_id) is not bytes or set(args) - {"lease_id"}:
            raise ValueError("lease_return: {lease_id}")
        lease = self.by_holder.get(cid, {}).get(lease_id)
        if lease is not None:
            self._give_back_lease(lease)

    def _give_back_lease(self, lease: Lease) -> None:
        """Its resources now; the executor itself once its lease_end says its loop is
        over (it may even be dead, and the broker not know yet)."""
        self._release(lease, "returned by its holder", pool=False)
        if len(self.returned) > 10_000:
            self.returned.clear()
        self.returned[lease.ex.cid] = lease

    def _events(self, lease: Lease, events, dropped) -> None:
        if type(events) is not list or len(events) > MAX_EVENTS or type(dropped) is not int \
                or dropped < 0:
            raise ValueError(f"lease_books: events must be a list of at most {MAX_EVENTS}, "
                             "dropped an int >= 0")
        for e in events:  # all checked before any is logged: a bad report changes nothing
            if (type(e) is not list or len(e) != 8 or type(e[0]) is not bytes
                    or len(e[0]) != P.TASK_ID_LEN or e[0][:P.ID_LEN] != lease.holder
                    or type(e[1]) is not str or len(e[1]) > 512
                    or type(e[2]) is not float or type(e[3]) is not float
                    or type(e[4]) is not bool or type(e[5]) is not str
                    or len(e[5]) > MAX_ERROR_CHARS or type(e[6]) is not bytes
                    or len(e[6]) not in (0, P.TASK_ID_LEN) or type(e[7]) is not bool
                    or (e[7] and not e[4])):
                raise ValueError("lease_books: an event is [task id of the holder's, name, "
                                 "start, end, failed, error, parent task id or b'', retry "
                                 "(only if failed)]")
        moves = self.engine.moves
        log_, node_id = moves.events, lease.ex.node.node_id
        holder = self.engine.clients.get(lease.holder)
        # what list_tasks shows of it beyond its events
        job, res, ex_cid, pid = (holder.job_id if holder is not None else None,
                                 lease.held.hold, lease.ex.cid, lease.ex.pid)
        children, seen, logged = self.engine.children, self.lease_tasks, 2 * len(events)
        for task_id, name, t0, t1, failed, error, parent, retry in events:
            if task_id not in seen:  # (its first run: a retry was queued by the last one)
                log_.append((t0, "task", task_id, "waiting_args", "queued", "", None, name))
                logged += 1
            log_.append((t0, "task", task_id, "queued", "running", "", node_id, name))
            if retry:  # as the broker logs a task it runs again after an application error
                log_.append((t1, "task", task_id, "running", "queued",
                             "application error, retrying", node_id, name))
            else:
                children.pop(task_id, None)  # (a leased task's own children: it is over)
                log_.append((t1, "task", task_id, "running", "failed" if failed else "finished",
                             error if failed else "", node_id, name))
            self.lease_tasks[task_id] = (job, res, ex_cid, pid, parent)
        moves.appended += logged + 2 * dropped
        lease.tasks += len(events) + dropped
        self.tasks += len(events) + dropped
        if len(self.lease_tasks) > 200_000:  # (as bounded as the event log)
            for k in list(self.lease_tasks)[:100_000]:
                del self.lease_tasks[k]

    # ------------------------------------------------------------------ ends
    def _release(self, lease: Lease, why: str, pool: bool = True) -> None:
        engine = self.engine
        self.by_exec.pop(lease.ex.cid, None)
        held = self.by_holder.get(lease.holder)
        if held is not None and held.get(lease.lease_id) is lease:
            del held[lease.lease_id]
            if not held:
                del self.by_holder[lease.holder]
        engine.nodes.release(lease.held)
        self.ended += 1
        if pool:
            self._pool(lease.ex, why)

    def _pool(self, ex, why: str) -> None:
        """The executor back in its node's pool of idle executors."""
        if ex.state == ExecState.BUSY and ex.task is None and ex.cid not in self.by_exec:
            self.engine.moves.move(ex, ExecState.IDLE, why)
            self.engine.nodes.push_idle(ex)

    def executor_gone(self, ex) -> None:
        """(engine.executor_dead) The leased executor died: the lease's resources come
        back; its holder sees the lane close and retries or fails what it had sent."""
        self.returned.pop(ex.cid, None)
        lease = self.by_exec.get(ex.cid)
        if lease is not None:
            self._release(lease, "its executor died")

    def lend(self, ex, lend: bool) -> bool:
        """The leased task waits in get() (BLOCK) or resumes: lend the lease's CPU."""
        lease = self.by_exec.get(ex.cid)
        if lease is None:
            return False
        self.engine.nodes.lend_cpu(lease.held, lend)
        return True

    def cancel(self, cid: bytes, args: dict) -> None:
        """REQ lease_cancel: ray.cancel of a leased task, only from its holder."""
        task_id, force = args.get("task_id"), args.get("force")
        recursive, lease_id = args.get("recursive", True), args.get("lease_id")
        if (type(task_id) is not bytes or len(task_id) != P.TASK_ID_LEN
                or task_id[:P.ID_LEN] != cid or type(force) is not bool
                or type(recursive) is not bool
                or (lease_id is not None and (type(lease_id) is not bytes
                                              or len(lease_id) != P.LEASE_ID_LEN))
                or set(args) - {"task_id", "force", "recursive", "lease_id"}):
            raise ValueError("lease_cancel: {task_id: a task of yours, force: bool, "
                             "recursive: bool, lease_id: the lease it is on}")
        if recursive:  # the tasks it submitted (through the broker) go too, as in Ray
            engine = self.engine
            for child in list(engine.children.get(task_id, ())):
                engine.cancel(child, force, True)
        held = self.by_holder.get(cid) or {}
        lease = (held.get(lease_id) if lease_id is not None
                 else next(iter(held.values())) if len(held) == 1 else None)
        if lease is None:
            return
        ex = lease.ex
        if force:  # as the broker path does: the process goes (TaskCancelledError there)
            self.out.send(ex.node.ident, P.encode(P.KillExec(ex.cid)))
        else:
            self.out.send(P.inbox_ident(ex.cid), P.encode(P.Interrupt(task_id, False)))

    def revoke(self) -> None:
        """(each liveness check, with tasks queued) Ask every leased executor to end its
        lease: LEASE(active=False) wakes its main thread, which ends the lease as when it
        idles (lease_end), and the queued tasks get its resources."""
        for lease in self.by_exec.values():
            if not lease.revoked:
                lease.revoked = True
                self.revoked += 1
                self.out.send(P.inbox_ident(lease.ex.cid),
                              P.encode(P.Lease(lease.lease_id, lease.holder, False, b"")))

    def report(self) -> dict:
        return {"granted": self.granted, "ended": self.ended, "active": len(self.by_exec),
                "tasks": self.tasks, "refused": self.refused, "revoked": self.revoked}
