"""A node's peer listener (workerd/peer.py): tickets expire, and IPv6 works.

A real PeerServer (its own thread, ZeroMQ context and CURVE listener, on a
store dir under this test's tmp dir) is asked for an object the way another
node asks: a DEALER holding the cluster key sends PEER_GET with a ticket. It
answers a ticket the broker would grant now (zray._peer.ticket with the node's
secret, which only the broker learns), and drops, unanswered, one whose expiry
has passed, one whose expiry was changed (the MAC covers it), and one granted
to another node. When the route to the broker is IPv6 (the broker at
``tcp://[::1]:...``), the listener announces an IPv6 address and serves there,
and still serves IPv4 peers.
"""

import os
import socket
import time

import pytest
import zmq

from zray import _peer
from zray import _protocol as P
from zray._security import create_key_file

pytestmark = pytest.mark.timeout(60)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def curve_env(tmp_path, monkeypatch):
    monkeypatch.delenv("ZRAY_INSECURE", raising=False)
    monkeypatch.setenv("ZRAY_KEY_FILE", str(tmp_path / "cluster.key"))
    monkeypatch.setenv("ZRAY_TMPDIR", str(tmp_path / "zt"))
    monkeypatch.setenv("ZRAY_SHM_DIR", str(tmp_path / "shm"))
    os.makedirs(tmp_path / "shm", mode=0o700)
    return create_key_file()


def _server(broker_address):
    from workerd.peer import PeerServer
    from zray._store import ObjectStore

    store = ObjectStore(os.urandom(P.ID_LEN))
    store.create_dirs()
    return PeerServer(store, store.node_id, broker_address, "127.0.0.1")


class _Peer:
    """Another node's view of the listener: a CURVE DEALER holding the cluster key."""

    def __init__(self, address, keys):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.curve_serverkey = keys["server_public"].encode()
        self.sock.curve_publickey = keys["client_public"].encode()
        self.sock.curve_secretkey = keys["client_secret"].encode()
        self.sock.connect(address)

    def ask(self, oid, node_id, ticket, wait_s):
        """The answer (a PEER_CHUNK) or None if none came within ``wait_s``."""
        self.sock.send(P.encode(P.PeerGet(oid, node_id, ticket, 0, 1024)))
        if not self.sock.poll(int(wait_s * 1000)):
            return None
        return P.decode(self.sock.recv_multipart()[0])

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def test_an_expired_or_altered_ticket_is_refused(curve_env):
    server = _server("tcp://127.0.0.1:9")
    peer = _Peer(server.address, curve_env)
    try:
        oid, me = os.urandom(P.OBJECT_ID_LEN), os.urandom(P.ID_LEN)
        good = _peer.ticket(server.secret, oid, me)
        assert len(good) == 32  # (the wire's ticket size is unchanged)
        answer = peer.ask(oid, me, good, 30)
        assert answer is not None and answer.TYPE == P.Msg.PEER_CHUNK
        assert answer.codec == -1  # answered: "not here" (this store holds nothing)
        # refused: each is dropped, counted, never answered
        expired = _peer.ticket(server.secret, oid, me, expiry=time.time() - 1)
        altered = (int.from_bytes(expired[:8], "big") + 3600).to_bytes(8, "big") + expired[8:]
        other_node = _peer.ticket(server.secret, oid, os.urandom(P.ID_LEN))
        dropped0 = server.dropped
        for t in (expired, altered, other_node):
            assert peer.ask(oid, me, t, 1.0) is None
        assert server.dropped == dropped0 + 3
        assert peer.ask(oid, me, good, 30) is not None  # and it still serves
    finally:
        peer.close()
        server.close()


def test_a_ticket_lasts_the_configured_time():
    t = _peer.ticket(b"s" * 32, b"o" * P.OBJECT_ID_LEN, b"n" * P.ID_LEN)
    left = int.from_bytes(t[:8], "big") - time.time()
    assert _peer.TICKET_TTL_S - 5 <= left <= _peer.TICKET_TTL_S + 1
    assert _peer.valid_ticket(b"s" * 32, b"o" * P.OBJECT_ID_LEN, b"n" * P.ID_LEN, t)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_the_peer_listener_serves_on_ipv6_when_the_broker_route_is_ipv6(curve_env):
    server = _server("tcp://[::1]:9")
    try:
        assert server.address.startswith("tcp://[::1]:"), server.address
        port = server.address.rsplit(":", 1)[1]
        for address in (server.address, f"tcp://127.0.0.1:{port}"):  # v6, and v4 still
            peer = _Peer(address, curve_env)
            try:
                oid, me = os.urandom(P.OBJECT_ID_LEN), os.urandom(P.ID_LEN)
                answer = peer.ask(oid, me, _peer.ticket(server.secret, oid, me), 30)
                assert answer is not None and answer.TYPE == P.Msg.PEER_CHUNK, address
            finally:
                peer.close()
    finally:
        server.close()
