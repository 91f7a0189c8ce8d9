"""The broker's one way out: every message the broker sends goes through ``Outbox``.

::

    engine / directories --send(ident, header, frames)--> Outbox --> ROUTER socket
                                                            |
                              unreachable peers  <----------+  (ROUTER_MANDATORY: EHOSTUNREACH)

Messages go out at once, in the order they were sent (per peer, ZeroMQ keeps
that order). A peer that is gone makes the ROUTER raise EHOSTUNREACH; the
outbox records it in ``unreachable`` and the broker's loop deals with those
peers after the turn (an executor that cannot be reached is dead), so no
component has to handle a failed send where it happens.

Owns: the socket's send side, the list of unreachable identities and the
count of messages sent.
"""

from __future__ import annotations

import logging

import zmq

from zray._transport import send_parts

log = logging.getLogger("zray.broker")


class Outbox:
    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.unreachable: list = []
        self.sent = 0

    def send(self, ident: bytes, header: bytes, frames=()) -> None:
        try:
            send_parts(self.sock, ident, header, frames)  # EHOSTUNREACH: nothing queued
            self.sent += 1
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            log.debug("peer %r is gone", ident[:16])
            self.unreachable.append(ident)

    def take_unreachable(self) -> list:
        out, self.unreachable = self.unreachable, []
        return out
