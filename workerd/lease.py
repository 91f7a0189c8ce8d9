"""Leased executors, the executor's side: a pool executor lent to one client runs its
plain tasks straight off a lane, with no broker turn per task.

::

    broker --LEASE(active) [+ fn blob]--> I/O thread --queue--> main thread: serve()
    holder --connect <node store>/t-<cid> (zray/_lane.py), LEASE(active, lease id)-->
    holder --DCALL (a TASK spec)--> main thread: checks, TaskRunner.run as for an EXEC
          (prepare, print prefix, runtime context, cancel by SIGUSR1, BLOCK in get); the
          holder may have a window of calls in flight: they run one by one, in order
    ResultSender.finish_values / finish_error --reply()--> DDONE + frames on the lane
    print() in a task of the holder's job (holder = its driver) --LOG on the lane, ahead of
          the task's DDONE (the broker's way would come after the result)
    every BOOKS_S and at the end: REQ lease_books / lease_end {lease_id, events}
    the lease ends when: no DCALL for IDLE_S (LEASE(active=False) on the lane first: it
    reads nothing after it), the holder closes the lane (it left or died), the queue
    has something (the broker's EXIT, SHUTDOWN, anything; looked at between two calls
    of a window too): REQ lease_end, then the serve loop goes on with the queue
    a leased task waits in get() (``blocked``): the end mark goes on the lane at once,
    naming that task (LEASE running): the calls queued behind it may be what it waits
    for, so none of them runs here (the holder sends them through the broker); the
    lease ends when the task does

The listener is bound when the executor starts, so a holder can connect as soon as
the broker's answer reaches it; a connection is served only once its first message
names the current lease (its random id), and only while the lease lasts. One that
names another lease is kept, with what came after it, for the next lease: the broker
may lend this executor again (it took it back from a holder that gave it back) before
this loop noticed the previous lease ended, and that holder connects at once. Everything
read is checked in full (P.decode); a bad message closes that lane (counted in
``dropped``). A task that ends the process (sys.exit, a crash) sends no LEASE end:
the holder sees EOF and retries or fails the task as the broker path would.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING

from workerd.direct import inline_values
from zray import _lane
from zray import _protocol as P
from zray._procutil import env_number
from zray._protocol import Msg

if TYPE_CHECKING:
    from workerd.executor import ExecutorProcess

log = logging.getLogger("zray.executor")



def read_env() -> tuple:
    """(ENABLED, IDLE_S, LONG_S) from ZRAY_TASK_LEASES, ZRAY_TASK_LEASE_IDLE_MS and
    ZRAY_TASK_LEASE_LONG_MS: a bad value is a ValueError naming its variable (zray.init
    and ``zray worker`` check them first)."""
    return (env_number("ZRAY_TASK_LEASES", 1, 0, 1, int, "0 or 1") == 1,
            env_number("ZRAY_TASK_LEASE_IDLE_MS", 50, 1, 60_000, int, "milliseconds") / 1000,
            env_number("ZRAY_TASK_LEASE_LONG_MS", 20, 1, 3_600_000, int, "milliseconds")
            / 1000)


# LONG_S: a leased call that runs this long hands back the calls queued behind it (they
# could wait for it for long: the broker's path runs them elsewhere), as the broker
# recalls tasks sent ahead to an executor whose task turned long (brokerd/window.py)
ENABLED, IDLE_S, LONG_S = read_env()
BOOKS_S = 1.0
TURN_AWAY_S = 0.05  # how long a connection's hello is waited for when it is turned away
MAX_EVENTS = 5000
EVENT_ERROR_CHARS = 1000  # of a failure's text in its event: its tail, as the broker keeps


def start(proc: ExecutorProcess):
    """The lease listener of a pool executor with a store; None when leases are off."""
    if not ENABLED or proc.client.store is None:
        return None
    try:
        return LeaseServer(proc)
    except OSError:
        log.warning("no lane for leases: this executor is never leased", exc_info=True)
        return None


class LeaseServer:
    def __init__(self, proc: ExecutorProcess):
        self.proc = proc
        client = proc.client
        self.path = os.path.join(client.store.dir, f"t-{client.cid.hex()}")
        self.listener = _lane.listen(self.path)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.active = False
        self.lease_id = b""
        self.holder = b""
        self.fid = b""
        self.calls: dict = {}  # task id -> its lane (ResultSender replies through us)
        self.started: dict = {}  # task id -> (name, wall-clock start, parent, retries left)
        self.retried: dict = {}  # task id -> its runs here that ended in a retry (this lease)
        # [task id, name, start, end, failed, error, parent task id, retry] since the last
        # books (retry: it failed with an error its retry_exceptions covers, and runs again)
        self.events: list = []
        self.events_dropped = 0
        self.dropped = 0
        self.leases = 0
        self.lane = None  # the holder's lane (its hello came)
        self.waiting: dict = {}
        self.later: list = []  # [(Lane, messages read)]: hellos for a lease not served yet
        self.latest = b""  # (I/O thread) the last lease the broker lent us
        # the call running now and since when (main thread), read by the watch thread,
        # which sends the end mark naming it once it runs LONG_S; under mark_lock
        self.mark_lock = threading.Lock()
        self.current = b""
        self.current_since = 0.0
        self.serving = threading.Event()
        self.watcher = None
        self.poller = None
        self.polled_out = False
        self.last = 0.0  # when the last call came
        # the end mark is on the lane already (a task waits in get(): its calls queued
        # behind it must not wait for it, they go back to the holder): run nothing more
        self.stop = False
        self.mark_sent = False
        client.on_close.append(self.close)

    def wake(self) -> None:
        """(I/O thread) Something was queued for the main thread: end the lease."""
        if self.active:
            try:
                os.write(self.wake_w, b"w")
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.listener.close()
            os.unlink(self.path)
        except OSError:
            pass

    # ------------------------------------------------------------ main thread
    def serve(self, m: P.Lease, frames: list) -> None:
        """Serve the lease ``m`` until it ends (module doc)."""
        proc = self.proc
        if not m.active:
            return
        if frames:
            proc.fns.setdefault(m.fid, frames[0])
        self.lease_id, self.holder, self.fid = m.lease_id, m.holder, m.fid
        self.leases += 1
        self._drain_wake()
        self.active = True
        proc.results.direct = self
        self.lane = None
        poller = self.poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        self.waiting = {}  # fd -> a Lane whose hello has not come yet
        self.polled_out = False
        self.adopted = False  # (lease_end says so: see _books)
        self.stop = self.mark_sent = False
        self.last = last_books = time.monotonic()
        if self.watcher is None:
            self.watcher = threading.Thread(target=self._watch, name="lease-watch", daemon=True)
            self.watcher.start()
        self.serving.set()
        end_on_lane = False
        try:
            later, self.later = self.later, []
            for ln, msgs in later:  # connected while the previous lease was served
                if msgs and self._hello(msgs[0]) and self.lane is None:
                    self._adopt(ln, msgs[1:])
                else:
                    self._turn_away(ln, msgs)
            while True:
                if self.stop or not proc.queue.empty():
                    end_on_lane = True
                    break
                now = time.monotonic()
                if now - last_books >= BOOKS_S:
                    last_books = now
                    self._books("lease_books")
                left = self.last + IDLE_S - now
                lane = self.lane
                if left <= 0:
                    if lane is None or not lane.outq:
                        end_on_lane = True
                        break
                    left = IDLE_S
                want_out = lane is not None and bool(lane.outq)
                if lane is not None and want_out != self.polled_out:
                    poller.modify(lane.fd, select.POLLIN | (select.POLLOUT if want_out else 0))
                    self.polled_out = want_out
                for fd, ev in poller.poll(min(left, BOOKS_S) * 1000):
                    if fd == self.wake_r:
                        self._drain_wake()
                    elif fd == self.listener.fileno():
                        new = self._accept()
                        if new is not None:
                            self.waiting[new.fd] = new
                            poller.register(new.fd, select.POLLIN)
                    elif fd in self.waiting:
                        self._read_waiting(self.waiting[fd])
                    elif self.lane is not None and fd == self.lane.fd:
                        lane = self.lane
                        try:
                            if ev & select.POLLOUT:
                                lane.flush()
                            if ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
                                self._run(lane.read(), lane)
                        except _lane.LaneClosed as e:
                            if "closed the lane" not in str(e):
                                self._drop(f"lane: {e}")
                            raise _Ended() from None  # the holder left: the lease is over
        except _Ended:
            pass
        except BaseException:
            # the process ends (sys.exit in a task, exit_actor...): no LEASE end on the lane,
            # so the holder takes the task for crashed (it retries or fails it); no
            # lease_end either: the broker must not take this process for idle (its death
            # ends the lease there)
            self._finish(self.lane, False, "lease_books")
            raise
        self._finish(self.lane, end_on_lane)

    def _read_waiting(self, ln) -> None:
        """A connection not yet this lease's: its first message says whose lease it is. A
        hello for another lease is kept for the next one (the broker may have lent us to
        its holder already: that LEASE waits in our queue), with what came after it."""
        try:
            msgs = ln.read()
        except _lane.LaneClosed:
            self._unwait(ln)
            ln.close()
            return
        if not msgs:
            return
        self._unwait(ln)
        if self._hello(msgs[0]):
            if self.lane is None:
                self._adopt(ln, msgs[1:])
                return
        elif self._hello(msgs[0], any_lease=True) and len(self.later) < 8:
            self.later.append((ln, msgs))
            return
        self._turn_away(ln, msgs)

    def _turn_away(self, ln, msgs=None) -> None:
        """Close a holder's connection this lease does not serve (its hello came late, or
        names a lease that is over). Its hello named a lease: the end mark for it goes
        first (nothing it sent ran here), so that its holder sends those calls through
        the broker as never run, not as crashed. A hello not read yet (``msgs`` None) is
        waited for briefly: it follows the connect at once."""
        if msgs is None:
            msgs = []
            deadline = time.monotonic() + TURN_AWAY_S
            while not msgs:
                try:
                    msgs = ln.read()
                except _lane.LaneClosed:
                    break
                left = deadline - time.monotonic()
                if msgs or left <= 0:
                    break
                select.select([ln.fd], [], [], left)
        if msgs and self._hello(msgs[0], any_lease=True):
            m = P.decode(P.buffer_of(msgs[0][0]))
            try:
                ln.send(P.encode(P.Lease(m.lease_id, m.holder, False, b"")))
            except _lane.LaneClosed:
                pass
        ln.close()

    def _unwait(self, ln) -> None:
        self.waiting.pop(ln.fd, None)
        try:
            self.poller.unregister(ln.fd)
        except (KeyError, ValueError):
            pass

    def _adopt(self, ln, msgs: list) -> None:
        """The holder's lane: its calls run from now on."""
        self.lane = ln
        self.adopted = True
        self.poller.register(ln.fd, select.POLLIN)
        self.polled_out = False
        self.proc.logs.lane = (self.holder, ln)  # (its output: see LogForwarder)
        self.last = time.monotonic()
        try:
            self._run(msgs, ln)
        except _lane.LaneClosed:
            raise _Ended() from None

    def _run(self, msgs: list, lane) -> None:
        """Run the calls read, in order (the holder counts on it: the first call it has
        not heard back from is the one running). One read may bring a window of calls:
        between them, anything in the queue (the broker revokes the lease, EXIT) or an
        end mark already sent ends the lease; the calls not run are not answered, so the
        holder sends them through the broker after the end mark."""
        empty = self.proc.queue.empty
        for parts in msgs:
            if self.stop or not empty():
                self.stop = True
                return
            if self._call(parts, lane):
                self.last = time.monotonic()

    def blocked(self) -> None:
        """(main thread, ExecutorProcess._on_block) The leased task waits in get(): calls
        queued behind it on the lane could be what it waits for. Send the end mark now,
        naming the running call (its DDONE follows); nothing after it runs here."""
        with self.mark_lock:
            running = self.proc.running_task
            if running in self.calls:
                self._mark(running)

    def _mark(self, running: bytes) -> None:
        """(under mark_lock) The end mark, naming the call still running."""
        lane = self.lane
        if not self.active or self.mark_sent or lane is None:
            return
        self.stop = self.mark_sent = True
        try:
            lane.send(P.encode(P.Lease(self.lease_id, self.holder, False, b"", running)))
        except _lane.LaneClosed:
            pass

    def _watch(self) -> None:
        """(its own thread) A call that runs LONG_S: the end mark now, naming it."""
        while True:
            self.serving.wait()
            time.sleep(LONG_S / 2)
            with self.mark_lock:
                cur = self.current
                if cur and time.monotonic() - self.current_since >= LONG_S:
                    self._mark(cur)

    def _finish(self, lane, end_on_lane: bool, books: str = "lease_end") -> None:
        self.serving.clear()
        with self.mark_lock:
            self.active = False
        self.proc.logs.lane = None
        self.lane = None
        if lane is None and end_on_lane:
            self._end_unadopted()
        for ln in self.waiting.values():  # (a hello that did not come in time)
            self._turn_away(ln)
        self.waiting = {}
        self.proc.results.direct = None
        if lane is not None:
            try:
                if end_on_lane and not self.mark_sent:  # (a holder gone sees EOF anyway)
                    lane.send(P.encode(P.Lease(self.lease_id, self.holder, False, b"")))
                _flush_out(lane)
            except _lane.LaneClosed:
                pass
            lane.close()
        self.calls.clear()
        self.started.clear()
        self.retried.clear()  # (a retry after the lease ended goes through the broker)
        self._books(books)

    def _end_unadopted(self) -> None:
        """The lease ends before its holder's lane was taken (revoked at once, the queue
        had work): a holder that connected already gets the end mark, so that it sends
        its calls through the broker as never run (not taken for a crash)."""
        while True:
            ln = self._accept()
            if ln is None:
                break
            self.waiting[ln.fd] = ln
        deadline = time.monotonic() + 0.2
        for ln in list(self.waiting.values()):
            msgs = []
            while not msgs and time.monotonic() < deadline:
                try:
                    msgs = ln.read()
                except _lane.LaneClosed:
                    break
                if not msgs:
                    select.select([ln.fd], [], [], max(0.0, deadline - time.monotonic()))
            self._unwait(ln)
            if (msgs and not self._hello(msgs[0]) and self._hello(msgs[0], any_lease=True)
                    and len(self.later) < 8):
                self.later.append((ln, msgs))  # (for a lease not served yet)
            else:
                self._turn_away(ln, msgs)  # (the end mark for the lease its hello names)

    def _books(self, op: str) -> None:
        events, self.events = self.events, []
        dropped, self.events_dropped = self.events_dropped, 0
        if events or dropped or op == "lease_end":
            args = {"lease_id": self.lease_id, "events": events, "dropped": dropped}
            if op == "lease_end":
                # a lease that ended (idle, revoked) before its holder's lane was taken: the
                # holder may have connected too late for us to see it (its hello waits
                # unread in the listener's queue), so the broker tells it (nothing ran)
                args["adopted"] = self.adopted
            self.proc.client.request_nowait(op, args)

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass

    def _accept(self):
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            log.warning("leases: accept failed", exc_info=True)
            return None
        sock.setblocking(False)
        return _lane.Lane(sock)

    def _hello(self, parts: list, any_lease: bool = False) -> bool:
        """Whether ``parts`` is a holder's LEASE hello for this lease (``any_lease``: for
        any lease: one not served yet)."""
        try:
            m = P.decode(P.buffer_of(parts[0]))
        except P.ProtocolError as e:
            self._drop(str(e))
            return False
        if m.TYPE != Msg.LEASE or len(parts) != 1 or not m.active:
            return False
        return any_lease or (m.lease_id == self.lease_id and m.holder == self.holder)

    def _call(self, parts: list, lane) -> bool:
        """A DCALL on the lease's lane: run it here (main thread). False if dropped."""
        try:
            m = P.decode(P.buffer_of(parts[0]))
        except P.ProtocolError as e:
            self._drop(str(e))
            return False
        if m.TYPE != Msg.DCALL:
            self._drop(f"{m.TYPE.name} on a lease's lane")
            return False
        spec = m.spec
        if (spec.kind != P.TASK or m.n_args != len(parts) - 1 or spec.fid != self.fid
                or spec.task_id[:P.ID_LEN] != self.holder or spec.task_id in self.calls
                or set(spec.options) - {"max_retries", "retry_exceptions"}):
            self._drop("DCALL: not a plain task of the lease's holder and function")
            return False
        with self.mark_lock:
            if self.stop:
                return False  # the end mark went: not run, not answered (the holder resends)
            self.current, self.current_since = spec.task_id, time.monotonic()
        self.calls[spec.task_id] = lane
        # Retries left as the holder counts them (zray/_direct.py: it sends the same spec
        # again while max_retries allows): max_retries less the runs here that retried.
        mr = spec.options.get("max_retries", 0)
        mr = mr if type(mr) is int else 0
        left = -1 if mr < 0 else max(0, mr - self.retried.get(spec.task_id, 0))
        self.started[spec.task_id] = (spec.name, time.time(), spec.parent, left)
        proc = self.proc
        try:
            proc.tasks.run(P.Exec(spec, False, m.n_args, [], []), parts[1:])
        finally:
            self.current = b""
        if proc.client.forked:  # user code forked and the child got back here
            from zray._procutil import exit_forked_child

            exit_forked_child()
        return True

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("leases: dropping %s (dropped so far: %d)", why, self.dropped)

    # -------------------------------------------------------------- replies
    def finish_values(self, spec: P.TaskSpec, values: list) -> None:
        """(ResultSender.finish_values) The task's values, inline on the lane."""
        if spec.task_id not in self.calls:
            return  # (answered already: nothing to hand over)
        layout, frames, handed = inline_values(self.proc.client, values, self.holder)
        self.reply(spec.task_id, layout, frames, False, handed=handed)

    def reply(self, task_id: bytes, layout: list, frames: list, retryable: bool,
              text: str = "", handed: list = ()) -> None:
        """The task's DDONE on its lane; its event for the books, as the broker would log
        it: a failure's reason is "raised: <the error's text>" (``text``), and a run its
        holder will retry (``retryable``, retries left) is a retry, not a failure."""
        lane = self.calls.pop(task_id, None)
        if lane is None:
            return
        failed = bool(layout) and layout[0][0] == P.ERROR
        started = self.started.pop(task_id, None)
        if started is not None:
            name, t0, parent, left = started
            retry = failed and retryable and left != 0
            if retry:
                if len(self.retried) > 10_000:
                    self.retried.clear()
                self.retried[task_id] = self.retried.get(task_id, 0) + 1
            else:
                self.retried.pop(task_id, None)
            if len(self.events) < MAX_EVENTS:
                error = (f"raised: {text[-EVENT_ERROR_CHARS:]}" if text else "raised") \
                    if failed else ""
                self.events.append([task_id, name, t0, time.time(), failed, error, parent,
                                    retry])
            else:
                self.events_dropped += 1
        try:
            lane.send(P.encode(P.DDone(task_id, layout, retryable, list(handed))), frames)
        except _lane.LaneClosed:
            pass  # the holder is gone


class _Ended(Exception):
    pass


def _flush_out(lane, wait_s: float = 5.0) -> None:
    """Send what waits in the lane's outq (replies, the end mark) before it closes: the
    holder takes an EOF without the mark for this process's death."""
    deadline = time.monotonic() + wait_s
    poller = None
    while lane.outq:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("leases: the holder reads nothing; closing its lane with replies unsent")
            return
        if lane.flush():
            return
        if poller is None:
            poller = select.poll()
            poller.register(lane.fd, select.POLLOUT)
        poller.poll(min(left, 0.1) * 1000)
