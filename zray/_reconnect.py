"""What a client keeps so that it can live through a broker restart, and its replay.

::

    .remote() --record_submit--> unfinished[task_id] = _Entry(header, frames)  until its
                                 result came or every ref to it was dropped, and no kept
                                 task takes its result as an argument
    FN        --record_fn------> fns[fid] = (header, blob)
    request("register_job")  --> job = (op, args)
    I/O thread: HEARTBEAT answered by WELCOME{rehello}  --> HELLO again (same cid, token)
                WELCOME with a new broker epoch         --> replay():
        FN for every function, REQ register_job, PUT of every value this client owns
        and holds (inline frames, or the node store it is in), REFS +1 for refs it
        borrowed, LINEAGE of the finished tasks whose stored results it put again (the
        broker can rebuild them: brokerd/relineage.py), SUBMIT of every unfinished task
        and actor call in submission order
        (and of finished ones a kept task needs, or whose stored result was on a node
        the restarted broker does not know: WELCOME lists its nodes),
        REQ pg_ready for the pg.ready() refs still pending, SUB for what it waits for,
        the requests (REQ) still unanswered.

An executor that hosts no actor does not replay: it leaves (its node starts
fresh ones), and the tasks it ran are resubmitted by their owners. A task or
actor call that was running when the broker died may therefore run twice
(at-least-once, as Ray's retries); one whose owner is gone too is lost.

Lost in the replay, documented in README "What survives a broker restart":
refs pickled inside stored values are not re-pinned by their container; a ref
borrowed from an owner that did not come back fails with ObjectLostError.
"""

from __future__ import annotations

import logging

from zray import _protocol as P

log = logging.getLogger("zray.client")


class _Entry:
    """One task a restarted broker may need again."""

    __slots__ = ("header", "frames", "refs", "consumers", "done", "deps", "stream", "lineage")

    def __init__(self, header, frames, refs, deps, stream):
        self.header, self.frames, self.refs, self.deps = header, frames, refs, deps
        self.consumers = 0  # kept tasks that take one of its returns as an argument
        self.done = False  # its result came
        self.stream = stream  # a streaming generator: done at STREAM_END, not its first item
        self.lineage = False  # a result lives in a node store: rerun if that node is gone


class ReplayLog:
    """A client's record of what a restarted broker must be told again."""

    def __init__(self, lock):
        # task_id -> _Entry, in submission order (producers before their consumers). A
        # task is kept while its result has not come and a ref to it is held, or while a
        # kept task needs its result (then a restarted broker runs it again: lineage).
        self.unfinished: dict = {}
        self.fns: dict = {}  # fid -> (header, blob)
        self.job = None  # (op, args) of the driver's register_job
        self.requests: dict = {}  # req_id -> REQ header, while a user thread waits for it
        # oid -> args of the pg_ready request that makes it (pg.ready(): an object the
        # broker resolves, so a restarted broker must be asked again while it is pending)
        self.pg_ready: dict = {}
        # The client's _ref_lock (an RLock): decref and the arrival of a result call in
        # holding it, and a ref freed by the garbage collector inside record_submit
        # re-enters it; a lock of our own would deadlock against it.
        self.lock = lock
        self.replays = 0

    def record_submit(self, spec: P.TaskSpec, header: bytes, frames) -> None:
        # An actor's creation is durable in the broker; a task without returns would
        # never be heard of again: neither is kept.
        if spec.kind == P.ACTOR_CREATE or spec.num_returns == 0:
            return
        with self.lock:
            unfinished = self.unfinished
            deps = []
            for oid in [d[1] for d in spec.deps] + list(spec.nested):
                producer = unfinished.get(oid[:P.TASK_ID_LEN])
                if producer is not None:
                    producer.consumers += 1
                    deps.append(oid[:P.TASK_ID_LEN])
            unfinished[spec.task_id] = _Entry(header, list(frames), max(1, spec.num_returns),
                                              deps, spec.num_returns == P.STREAMING)

    def finished(self, task_id: bytes, end: bool = False, stored: bool = False) -> None:
        """A result of the task came (``end``: its stream ended). A stream cut by a
        restart runs again from its first item (items already taken arrive again and
        are dropped unless a ref to them is made)."""
        if task_id in self.unfinished:
            with self.lock:
                entry = self.unfinished.get(task_id)
                if entry is not None and (end or not entry.stream):
                    entry.done = True
                    entry.lineage = entry.lineage or stored
                    self._maybe_forget(task_id, entry)

    def dropped(self, task_id: bytes) -> None:
        """The last ref to one of the task's returns is gone: once all are, nobody
        waits for it (a fire-and-forget task is not kept)."""
        if task_id in self.unfinished:
            with self.lock:
                entry = self.unfinished.get(task_id)
                if entry is not None and not entry.stream:  # (a stream: until its end)
                    entry.refs -= 1
                    self._maybe_forget(task_id, entry)

    def _maybe_forget(self, task_id: bytes, entry: _Entry) -> None:
        stack = [(task_id, entry)]
        while stack:
            tid, e = stack.pop()
            if e.consumers > 0 or not (e.refs <= 0 or e.done and not e.lineage):
                continue
            del self.unfinished[tid]
            for dep in e.deps:
                producer = self.unfinished.get(dep)
                if producer is not None:
                    producer.consumers -= 1
                    stack.append((dep, producer))

    def record_pg_ready(self, oid: bytes, args: dict, records: dict) -> None:
        with self.lock:
            if len(self.pg_ready) >= 64:  # forget the resolved and dropped ones
                for old in list(self.pg_ready):
                    if not _unresolved(records.get(old)):
                        del self.pg_ready[old]
            self.pg_ready[oid] = args

    def record_fn(self, fid: bytes, header: bytes, blob) -> None:
        self.fns[fid] = (header, blob)

    def replay(self, client, live_nodes: set) -> dict:
        """Tell a restarted broker what this client holds and waits for. Runs on the
        client's I/O thread; sends through ``client.send`` (program order kept)."""
        self.replays += 1
        counts = {"fns": 0, "puts": 0, "borrowed": 0, "resubmitted": 0, "subscribed": 0}
        for header, blob in list(self.fns.values()):
            client.send(header, [blob])
            counts["fns"] += 1
        if self.job is not None:
            op, args = self.job
            client.send(P.encode(P.Req(next(client._ids), op, args)))
        with self.lock:
            entries = list(self.unfinished.items())
        # A finished task kept for its stored results runs again only if a store that
        # held one is gone (not among the nodes the restarted broker knows).
        gone = client.results_on_lost_nodes(live_nodes)
        unfinished = [(tid, e) for tid, e in entries
                      if not e.done or e.consumers > 0 or (e.lineage and tid in gone)]
        puts, borrowed, subs = client.held_objects({tid for tid, _ in unfinished})
        for header, frames in puts:
            client.send(header, frames)
        counts["puts"] = len(puts)
        if borrowed:
            client.send(P.encode(P.Refs(borrowed)))
            counts["borrowed"] = len(borrowed)
        # The finished tasks behind the stored results just put again by location: the
        # restarted broker keeps them as their lineage (brokerd/relineage.py).
        again = {tid for tid, _ in unfinished}
        counts["lineage"] = 0
        for tid, entry in entries:
            if entry.done and entry.lineage and tid not in again:
                m = P.decode(entry.header)
                client.send(P.encode(P.Lineage(m.spec)), entry.frames)
                counts["lineage"] += 1
        for _tid, entry in unfinished:
            client.send(entry.header, entry.frames)
            counts["resubmitted"] += 1
        with self.lock:  # pg.ready() refs still pending: asked again before we SUB them
            ready = [(oid, args) for oid, args in self.pg_ready.items()
                     if _unresolved(client.records.get(oid))]
            self.pg_ready = dict(ready)
        for _oid, args in ready:
            client.request_nowait("pg_ready", args)
        counts["pg_ready"] = len(ready)
        if subs:
            client.send(P.encode(P.Sub(subs)))
            counts["subscribed"] = len(subs)
        for header in list(self.requests.values()):  # (a reply to both is harmless)
            client.send(header)
        log.warning("the zray broker restarted: re-registered with it (%s)", counts)
        return counts


def _unresolved(rec) -> bool:
    """A client's record of an object whose value has not come (PENDING,
    AWAITING_PUSH or SUBSCRIBED in zray/_client.py)."""
    return rec is not None and rec.state.name in ("PENDING", "AWAITING_PUSH", "SUBSCRIBED")
