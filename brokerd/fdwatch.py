"""The broker's file descriptors: raise the limit at start, notice when it is reached.

::

    broker start --raise_nofile_limit()--> soft RLIMIT_NOFILE = hard (logged)
    ROUTER socket --zmq monitor (ACCEPT_FAILED)--> FdWatch thread --EMFILE/ENFILE-->
        counted, logged loudly (the first time, then at most once a minute)
                  --zmq monitor (DISCONNECTED)--> closed_fds --> Broker._disconnects
    `zray status` <-- REQ status <-- report(): open / limit / accept failures (a lower
                                             bound: at the ceiling libzmq retries in a loop)

Every client holds two connections to the broker (its out and inbox sockets), every
executor too: a soft limit of 1,024 descriptors stops a cluster at a few hundred
processes. At the ceiling libzmq cannot accept a connection and retries quietly, so
new clients hang in their handshake: this module makes that loud.

Owns: the monitor socket (used by its thread only) and its counters.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque

import zmq

log = logging.getLogger("zray.broker")


def raise_nofile_limit() -> tuple:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; (soft, hard) after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    else:
        target = hard
    if soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("file descriptor limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft,
                        target, e)
    if soft < 4096:
        log.warning("file descriptor limit is %d: each client holds 2 connections, so at "
                    "most about %d clients fit; raise it (systemd: LimitNOFILE=, shell: "
                    "ulimit -n)", soft, soft // 2)
    return soft, hard


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


class FdWatch:
    """Watches the ROUTER socket's accept failures from a thread of its own."""

    LOG_EVERY_S = 60.0

    def __init__(self, sock: zmq.Socket):
        import resource

        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.accept_failed = 0  # connections refused for want of descriptors
        self.last_failure = 0.0  # time.time() of the latest
        self._logged = 0.0
        # fds of connections that closed, for the broker loop (Broker._disconnects): one
        # monitor per socket, so this thread reads that event for it too
        self.closed_fds: deque = deque(maxlen=100_000)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPT_FAILED
                                                | zmq.EVENT_DISCONNECTED)
        self._thread = threading.Thread(target=self._run, name="zray-fdwatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        mon = self._monitor
        while True:
            # At the ceiling libzmq retries accept() in a tight loop, one event per try:
            # take what has queued, then pause, so this thread never competes with the
            # broker loop for the GIL (the count is then a lower bound).
            try:
                events = [parse_monitor_message(mon.recv_multipart())]
                while len(events) < 10_000:
                    try:
                        events.append(parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
            except zmq.ZMQError:  # the broker stopped (its context is terminating)
                mon.close(0)
                return
            for e in events:
                if e.get("event") == zmq.EVENT_DISCONNECTED:
                    self.closed_fds.append(e.get("value"))
            failed = [e for e in events if e.get("event") == zmq.EVENT_ACCEPT_FAILED
                      and e.get("value") in (errno.EMFILE, errno.ENFILE)]
            if failed:
                self._failed(len(failed), failed[-1]["value"])
                time.sleep(0.5)

    def _failed(self, n: int, code: int) -> None:
        self.accept_failed += n
        now = time.time()
        self.last_failure = now
        if now - self._logged >= self.LOG_EVERY_S:
            self._logged = now
            fds = open_fds()
            log.error("OUT OF FILE DESCRIPTORS: the broker cannot accept connections (%s; "
                      "%s open of a limit of %d; %d refused so far). New clients hang until "
                      "descriptors are free: raise the limit (systemd LimitNOFILE=, ulimit "
                      "-n) and restart the broker.", errno.errorcode.get(code, code),
                      fds if fds >= 0 else "all", self.limit, self.accept_failed)

    def report(self) -> dict:
        return {"fd_open": open_fds(), "fd_limit": self.limit,
                "accept_failed_no_fds": self.accept_failed,
                "last_accept_failure": self.last_failure}
