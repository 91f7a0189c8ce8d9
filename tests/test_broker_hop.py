"""The cheaper broker hop: a turn's messages for one client go out as one BATCH, and
heartbeats are answered at most every HEARTBEAT_REPLY_S per peer.

The protocol half checks the BATCH codec; the other half talks to a real broker
(the module's embedded cluster) through raw DEALER sockets, as a client would.
"""

import os

import msgpack
import pytest
import zmq

from brokerd.broker import HEARTBEAT_REPLY_S
from zray import _protocol as P


@pytest.mark.timeout(10)
def test_batch_splits_into_the_messages_it_carries():
    oid = b"o" * P.OBJECT_ID_LEN
    msgs = [(P.encode(P.Heartbeat()), []), (P.encode(P.Obj(oid, P.VALUE)), [b"a", b"b"]),
            (P.encode(P.Free([oid])), [])]
    parts = P.encode_batch(msgs)
    # small: the messages' frames packed into one frame, their sizes in the header
    assert len(parts) == 2
    assert P.decode(parts[0]) == P.Batch([1, 3, 1], [len(f) for h, fs in msgs for f in [h, *fs]])
    assert P.unbatch(parts) == [[h, *f] for h, f in msgs]
    # big: every frame travels as its own (zero-copy)
    big = [(P.encode(P.Obj(oid, P.VALUE)), [b"x" * (P.PACK_MAX // 2)] * 3), msgs[0]]
    parts = P.encode_batch(big)
    assert P.decode(parts[0]) == P.Batch([4, 1]) and len(parts) == 6
    assert P.unbatch(parts) == [[h, *f] for h, f in big]
    plain = [P.encode(P.Heartbeat())]
    assert P.unbatch(plain) == [plain]  # not a batch: itself


@pytest.mark.timeout(10)
@pytest.mark.parametrize("sizes", [[1, 1], [100, 1, 1], [-1, 3], ["1"], 5])
def test_a_packed_batch_whose_sizes_do_not_fit_is_a_protocol_error(sizes):
    header = msgpack.packb([P.Msg.BATCH, [1, 1], sizes])
    with pytest.raises(P.ProtocolError):
        P.unbatch([header, b"abc"])


@pytest.mark.timeout(10)
@pytest.mark.parametrize("counts", [[], [0], [-1], [1.0], [True], [2, 2], [1] * (P.BATCH_MAX + 1)])
def test_a_bad_batch_is_a_protocol_error(counts):
    header = msgpack.packb([P.Msg.BATCH, counts, None])
    with pytest.raises(P.ProtocolError):
        P.unbatch([header, P.encode(P.Heartbeat()), P.encode(P.Heartbeat())])


def _dealer(ctx, address, identity):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


@pytest.mark.timeout(60)
def test_heartbeats_are_answered_once_per_interval_and_replies_arrive(ray_local):
    assert HEARTBEAT_REPLY_S >= 1.0
    address = ray_local._runtime.client.address
    ctx = zmq.Context()
    try:
        cid = os.urandom(P.ID_LEN)
        inbox = _dealer(ctx, address, P.inbox_ident(cid))
        inbox.send(P.encode(P.Hello(P.VERSION, "cli", b"", os.getpid(), b"probe")))
        assert inbox.poll(10000) and P.decode(inbox.recv()).TYPE == P.Msg.WELCOME
        out = _dealer(ctx, address, P.out_ident(cid))
        for _ in range(5):
            inbox.send(P.encode(P.Heartbeat()))
        for i in range(20):
            out.send(P.encode(P.Req(i, "cluster_resources", None)))
        got = []
        while (sum(m.TYPE == P.Msg.REPLY for m in got) < 20
               or not any(m.TYPE == P.Msg.HEARTBEAT for m in got)):
            assert inbox.poll(10000), f"replies missing; got {[m.TYPE.name for m in got]}"
            for msg in P.unbatch(inbox.recv_multipart()):
                got.append(P.decode(msg[0]))
        # any further answers to the other four heartbeats would have come by now
        while inbox.poll(500):
            got += [P.decode(m[0]) for m in P.unbatch(inbox.recv_multipart())]
        replies = [m for m in got if m.TYPE == P.Msg.REPLY]
        assert sorted(m.req_id for m in replies) == list(range(20))
        assert all(m.ok and m.result.get("CPU") == 4 for m in replies), replies[:2]
        # five heartbeats well within HEARTBEAT_REPLY_S: one answer
        assert sum(m.TYPE == P.Msg.HEARTBEAT for m in got) == 1, [m.TYPE.name for m in got]
        out.send(P.encode(P.Exit()))
    finally:
        ctx.destroy(linger=0)
