"""Node-to-node blobs: what the broker and node agents share (grants, chunk sizes).

::

    broker: obj on node A is needed on node B
        --PULL(oid, A, A's peer address, ticket, size)--> node B (workerd/peer.py Puller)
    node B --PEER_GET(oid, B, ticket, offset, length) x window--> node A's peer socket
    node A (PeerServer) checks the ticket, reads the chunk from its store (memory file,
        or its spill file restored), lz4 when it pays --PEER_CHUNK--> node B
    node B writes the chunks into a private file, the store I/O thread renames it in
        --STORED(oid, size)--> broker          (failure: PULL_FAILED -> FETCH/STORE)

A *ticket* is ``expiry | HMAC-SHA256(secret of A, expiry | oid | B's node id)``
truncated to 24 bytes (32 bytes in all, as the wire has always carried): expiry
is the unix time (8 bytes, big-endian) after which A refuses it, TICKET_TTL_S
after the broker granted it (``ZRAY_PEER_TICKET_TTL_S``, default 10 minutes:
longer than any pull that makes progress, and a pull that outlives its ticket
fails and is moved by the broker, FETCH/STORE, as any failed pull). A copied
or logged ticket is therefore good for one object, one node, a bounded time;
the hosts' clocks need only agree to well within the TTL. Each node agent
draws its secret at start and tells only the broker (NODE_HELLO info, over its
encrypted connection); the broker grants B a pull by handing it a ticket. So a
node serves an object only to a peer the broker told to fetch it, and a holder
of the cluster key cannot read objects it holds no grant for by talking to the
peer socket directly. Under CURVE the peer socket also admits only holders of
the cluster key and encrypts the bulk once (A to B), not twice (A to broker to B).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time

from zray._procutil import env_number

SECRET_LEN = 32
# Chunks of an object in flight from one holder: bounded memory (WINDOW x CHUNK_BYTES
# per pull), enough to keep both ends busy (measured: benchmarks/transfer_cross_node.py).
CHUNK_BYTES = int(os.environ.get("ZRAY_PEER_CHUNK_BYTES") or 4 << 20)
WINDOW = int(os.environ.get("ZRAY_PEER_WINDOW") or 4)
MAX_CHUNK_BYTES = 64 << 20  # the largest chunk a peer asks for (a bigger ask is dropped)
# A pull whose holder stays silent this long fails (the broker then moves the object).
PULL_TIMEOUT_S = float(os.environ.get("ZRAY_PULL_TIMEOUT_S") or 15.0)
PULLERS = 4  # pulls a node runs at once


# Threads that lz4 chunks on each side (a holder compressing, a puller decompressing), so
# the chunks of a window are (de)compressed at once (lz4 releases the GIL); 0 or 1: on the
# server / puller thread itself, one chunk after the other.
LZ4_THREADS = env_number("ZRAY_PEER_LZ4_THREADS", min(4, os.cpu_count() or 1), 0, 64,
                         cast=int, what="a thread count")


def peer_port() -> int:
    """The TCP port a node's peer socket listens on: ``ZRAY_PEER_PORT`` (for a firewall
    that must let it through), or 0: any free port."""
    v = os.environ.get("ZRAY_PEER_PORT") or "0"
    try:
        port = int(v)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"ZRAY_PEER_PORT must be a TCP port number (0: any free one), got {v!r}")
    return port


def _ttl() -> float:
    v = os.environ.get("ZRAY_PEER_TICKET_TTL_S") or "600"
    try:
        ttl = float(v)
    except ValueError:
        ttl = 0.0
    if not 1 <= ttl <= 7 * 86400:
        raise ValueError(f"ZRAY_PEER_TICKET_TTL_S must be seconds (1 .. 604800), got {v!r}")
    return ttl


TICKET_TTL_S = _ttl()  # (the broker's copy counts: it grants)
TICKET_LEN = 32
_MAC_LEN = TICKET_LEN - 8


def new_secret() -> bytes:
    return os.urandom(SECRET_LEN)


def ticket(secret: bytes, oid: bytes, node_id: bytes, expiry: float | None = None) -> bytes:
    """The grant that lets node ``node_id`` fetch ``oid`` from the node whose secret it
    is, until ``expiry`` (unix time; default: TICKET_TTL_S from now)."""
    if expiry is None:
        expiry = time.time() + TICKET_TTL_S
    head = struct.pack(">Q", max(0, int(expiry)))
    return head + hmac.new(secret, head + oid + node_id, hashlib.sha256).digest()[:_MAC_LEN]


def valid_ticket(secret: bytes, oid: bytes, node_id: bytes, t: bytes) -> bool:
    """``t`` is a grant of ours for this object and node, and has not expired."""
    if type(t) is not bytes or len(t) != TICKET_LEN:
        return False
    mac = hmac.new(secret, t[:8] + oid + node_id, hashlib.sha256).digest()[:_MAC_LEN]
    return hmac.compare_digest(mac, t[8:]) and struct.unpack(">Q", t[:8])[0] >= time.time()


def expired(t: bytes) -> bool:
    """(for the log only: says nothing about the ticket's validity)"""
    return len(t) == TICKET_LEN and struct.unpack(">Q", t[:8])[0] < time.time()
