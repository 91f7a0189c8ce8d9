"""What a client keeps so that it can live through a broker restart, and its replay.

::

    .remote() --record_submit--> unfinished[task_id] = [header, frames, live refs]  until a
                                 result comes or every ref to its returns is dropped
    FN        --record_fn------> fns[fid] = (header, blob)                 (or STREAM_END)
    request("register_job")  --> job = (op, args)
    I/O thread: HEARTBEAT answered by WELCOME{rehello}  --> HELLO again (same cid, token)
                WELCOME with a new broker epoch         --> replay():
        FN for every function, REQ register_job, PUT of every value this client owns
        and holds (inline frames, or the node store it is in), REFS +1 for refs it
        borrowed, SUBMIT of every unfinished task and actor call in submission order,
        SUB for what it waits for.

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
import threading

from zray import _protocol as P

log = logging.getLogger("zray.client")


class ReplayLog:
    """A client's record of what a restarted broker must be told again."""

    def __init__(self):
        self.unfinished: dict = {}  # task_id -> (header, frames), in submission order
        self.fns: dict = {}  # fid -> (header, blob)
        self.job = None  # (op, args) of the driver's register_job
        self.lock = threading.Lock()
        self.replays = 0

    def record_submit(self, spec: P.TaskSpec, header: bytes, frames) -> None:
        # An actor's creation is durable in the broker; a task without returns would
        # never be heard of again: neither is kept.
        if spec.kind == P.ACTOR_CREATE or spec.num_returns == 0:
            return
        with self.lock:  # [header, frames, refs to its returns still held]
            self.unfinished[spec.task_id] = [header, list(frames), max(1, spec.num_returns)]

    def finished(self, task_id: bytes) -> None:
        if task_id in self.unfinished:
            with self.lock:
                self.unfinished.pop(task_id, None)

    def dropped(self, task_id: bytes) -> None:
        """The last ref to one of the task's returns is gone: once all are, nobody
        waits for it and it is not resubmitted (a fire-and-forget task is not kept)."""
        if task_id in self.unfinished:
            with self.lock:
                entry = self.unfinished.get(task_id)
                if entry is not None:
                    entry[2] -= 1
                    if entry[2] <= 0:
                        del self.unfinished[task_id]

    def record_fn(self, fid: bytes, header: bytes, blob) -> None:
        self.fns[fid] = (header, blob)

    def replay(self, client) -> dict:
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
            unfinished = list(self.unfinished.items())
        puts, borrowed, subs = client.held_objects({tid for tid, _ in unfinished})
        for header, frames in puts:
            client.send(header, frames)
        counts["puts"] = len(puts)
        if borrowed:
            client.send(P.encode(P.Refs(borrowed)))
            counts["borrowed"] = len(borrowed)
        for _tid, (header, frames, _live) in unfinished:
            client.send(header, frames)
            counts["resubmitted"] += 1
        if subs:
            client.send(P.encode(P.Sub(subs)))
            counts["subscribed"] = len(subs)
        log.warning("the zray broker restarted: re-registered with it (%s)", counts)
        return counts
