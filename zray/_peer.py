"""Node-to-node blobs: what the broker and node agents share (grants, chunk sizes).

::

    broker: obj on node A is needed on node B
        --PULL(oid, A, A's peer address, ticket, size)--> node B (workerd/peer.py Puller)
    node B --PEER_GET(oid, B, ticket, offset, length) x window--> node A's peer socket
    node A (PeerServer) checks the ticket, reads the chunk from its store (memory file,
        or its spill file restored), lz4 when it pays --PEER_CHUNK--> node B
    node B writes the chunks into a private file, the store I/O thread renames it in
        --STORED(oid, size)--> broker          (failure: PULL_FAILED -> FETCH/STORE)

A *ticket* is ``HMAC-SHA256(secret of A, oid | B's node id)``. Each node agent
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

SECRET_LEN = 32
# Chunks of an object in flight from one holder: bounded memory (WINDOW x CHUNK_BYTES
# per pull), enough to keep both ends busy (measured: benchmarks/transfer_cross_node.py).
CHUNK_BYTES = int(os.environ.get("ZRAY_PEER_CHUNK_BYTES") or 4 << 20)
WINDOW = int(os.environ.get("ZRAY_PEER_WINDOW") or 4)
MAX_CHUNK_BYTES = 64 << 20  # the largest chunk a peer asks for (a bigger ask is dropped)
# A pull whose holder stays silent this long fails (the broker then moves the object).
PULL_TIMEOUT_S = float(os.environ.get("ZRAY_PULL_TIMEOUT_S") or 15.0)
PULLERS = 4  # pulls a node runs at once


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


def new_secret() -> bytes:
    return os.urandom(SECRET_LEN)


def ticket(secret: bytes, oid: bytes, node_id: bytes) -> bytes:
    """The grant that lets node ``node_id`` fetch ``oid`` from the node whose secret it is."""
    return hmac.new(secret, oid + node_id, hashlib.sha256).digest()


def valid_ticket(secret: bytes, oid: bytes, node_id: bytes, t: bytes) -> bool:
    return hmac.compare_digest(ticket(secret, oid, node_id), t)
