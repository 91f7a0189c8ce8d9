"""The broker's one way out: every message the broker sends goes through ``Outbox``.

::

    engine / directories --send(ident, header, frames)--> Outbox --> ROUTER socket
                                                            |
                              unreachable peers  <----------+  (ROUTER_MANDATORY: EHOSTUNREACH)

Messages to a client's inbox wait for the end of the loop's turn (``flush``):
those of one turn for one client go out as one BATCH message (zray._protocol),
so a driver that gets 500 results in a turn costs one send, one wake-up of
libzmq's I/O thread and one CURVE box instead of 500; a turn with one message
for a client sends it as it is. Per peer the order is kept. Messages to node
agents go out at once. A peer that is gone makes the ROUTER raise
EHOSTUNREACH; the outbox records it in ``unreachable`` and the broker's loop
deals with those peers after the turn (an executor that cannot be reached is
dead), so no component has to handle a failed send where it happens.

Owns: the socket's send side, the messages waiting for the turn's end, the
list of unreachable identities and the count of messages sent.
"""

from __future__ import annotations

import logging

import zmq

from zray import _protocol as P
from zray._transport import send_parts

log = logging.getLogger("zray.broker")


class Outbox:
    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.unreachable: list = []
        self.sent = 0
        self.pending: dict = {}  # client inbox identity -> [(header, frames)] this turn

    def send(self, ident: bytes, header: bytes, frames=()) -> None:
        if ident[-1] == 105 and ident[0] == 67:  # b"i", b"C": a client's inbox: at the turn's end
            msgs = self.pending.get(ident)
            if msgs is None:
                self.pending[ident] = [(header, frames)]
            else:
                msgs.append((header, frames))
                if len(msgs) >= P.BATCH_MAX:
                    self._send_batch(ident, self.pending.pop(ident))
            return
        self._send(ident, header, frames)

    def flush(self) -> None:
        """Send what waits for client inboxes: one message, or one BATCH, per client."""
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        for ident, msgs in pending.items():
            if len(msgs) == 1:
                self._send(ident, *msgs[0])
            else:
                self._send_batch(ident, msgs)

    def _send_batch(self, ident: bytes, msgs: list) -> None:
        parts = P.encode_batch(msgs)
        self._send(ident, parts[0], parts[1:], len(msgs))

    def _send(self, ident: bytes, header, frames, count: int = 1) -> None:
        try:
            send_parts(self.sock, ident, header, frames)  # EHOSTUNREACH: nothing queued
            self.sent += count
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            log.debug("peer %r is gone", ident[:16])
            self.unreachable.append(ident)

    def take_unreachable(self) -> list:
        out, self.unreachable = self.unreachable, []
        return out
