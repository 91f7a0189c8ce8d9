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

log = logging.getLogger("zray.broker")


# pyzmq's sugar send_multipart ORs Flag enums per frame (Python-level enum code, about
# half the cost of a small message here); the backend's send takes plain ints.
_send = zmq.backend.Socket.send
_SNDMORE = int(zmq.SNDMORE)


class Outbox:
    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.unreachable: list = []
        self.sent = 0

    def send(self, ident: bytes, header: bytes, frames=()) -> None:
        sock = self.sock
        try:
            _send(sock, ident, _SNDMORE, True, False)  # EHOSTUNREACH here: nothing queued
            if frames:
                _send(sock, header, _SNDMORE, True, False)
                last = len(frames) - 1
                for i, f in enumerate(frames):  # payloads zero-copy
                    _send(sock, f, _SNDMORE if i < last else 0, False, False)
            else:
                _send(sock, header, 0, True, False)
            self.sent += 1
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            log.debug("peer %r is gone", ident[:16])
            self.unreachable.append(ident)

    def take_unreachable(self) -> list:
        out, self.unreachable = self.unreachable, []
        return out
