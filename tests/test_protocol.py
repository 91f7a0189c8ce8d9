"""The wire protocol: every message round-trips through its codec, bad headers are
refused at decode, and a real broker tells a peer of another protocol version so,
and answers clients whatever bytes their ids start with."""

import os

import msgpack
import pytest
import zmq
from conftest import poll_until

from zray import _protocol as P


def _sample(cls):
    """One valid instance of each message class."""
    tid, oid, cid = b"t" * P.TASK_ID_LEN, b"o" * P.OBJECT_ID_LEN, b"c" * P.ID_LEN
    spec = P.TaskSpec(tid, P.TASK, b"f" * 20, "f", 1, {"CPU": P.UNIT}, [[0, oid]], [oid],
                      {"max_retries": 3}, b"", cid, cid, b"job1", b"")
    values = {
        "version": P.VERSION, "kind": "driver", "node_id": cid, "pid": 1, "job_id": b"j",
        "info": {"a": 1}, "fid": b"f" * 20, "nested": [oid], "spec": spec, "oid": oid,
        "size": 10, "oids": [oid], "ops": [[oid, 1], [oid, -1], [oid, 0], [oid, 2, cid], [oid, 3]], "force": True,
        "recursive": False, "task_id": tid, "returned": [tid],
        "returns": [[P.VALUE, 1, None, 0], [P.VALUE, 0, cid, 10]], "retryable": False,
        "pushed": [True, False], "index": 1, "nframes": 1, "driver": cid, "prefix": "(f pid=1)",
        "text": "hi\n", "req_id": 7, "op": "status", "args": None, "ok": True, "result": {},
        "codec": 1, "fn_included": True, "n_args": 1, "deps": [[1, None]], "gpu_ids": [0],
        "count": 2, "cid": cid, "code": -9, "dest": b"N" + cid, "error": "", "token": b"t" * 16,
        "nbytes": 10, "counts": [1, 2], "sizes": [3, 0, 5],
        "src": cid, "ticket": b"k" * 32, "offset": 0,
        "length": 10, "total": 10, "unreachable": True,
        "actor_id": tid, "state": "alive", "address": "ipc:///tmp/a", "host": "h",
        "ordered": True, "incarnation": 0, "reason": "", "reply_to": "ipc:///tmp/r",
        "task_ids": [tid], "tcp_address": "tcp://[::1]:5555",
        "lease_id": b"L" * P.LEASE_ID_LEN, "holder": cid, "active": True, "running": tid,
        "handed": [[oid], []],
    }
    if cls is P.DCall:  # a direct call: an actor call without ref arguments
        values["spec"] = spec._replace(kind=P.ACTOR_CALL, fid="m", deps=[], actor_id=tid)
    if cls is P.DDone:
        values["returns"] = [[P.VALUE, 1], [P.ERROR, 0]]
    if cls is not P.Hello:
        values["kind"] = P.VALUE  # an object's kind elsewhere
    if cls is P.LogRead:
        values["args"] = {"name": "node.log"}  # a dict, checked as one
    return cls(*[values[f] for f in cls._fields])


@pytest.mark.timeout(10)
@pytest.mark.parametrize("cls", P.MESSAGES, ids=lambda c: c.TYPE.name)
def test_every_message_round_trips_and_rejects_bad_layouts(cls):
    msg = _sample(cls)
    back = P.decode(P.encode(msg))
    assert type(back) is cls and back == msg
    raw = msgpack.unpackb(P.encode(msg))
    with pytest.raises(P.ProtocolError):  # a field missing
        P.decode(msgpack.packb(raw[:-1] if len(raw) > 1 else raw + [1]))
    with pytest.raises(P.ProtocolError):  # a field too many
        P.decode(msgpack.packb(raw + [None]))
    for i in range(1, len(raw)):  # every field checked: a float is never valid here
        if cls.CHECKS[i - 1] is P._any:
            continue
        bad = list(raw)
        bad[i] = 1.5
        with pytest.raises(P.ProtocolError):
            P.decode(msgpack.packb(bad))


@pytest.mark.timeout(10)
def test_dcall_of_a_plain_task_only_on_its_lease_terms():
    """A DCALL may carry a plain task (a leased executor's, zray/_lease.py) only with one
    return and no ObjectRef arguments, top-level or nested."""
    tid, oid, cid = b"t" * P.TASK_ID_LEN, b"o" * P.OBJECT_ID_LEN, b"c" * P.ID_LEN
    spec = P.TaskSpec(tid, P.TASK, b"f" * 20, "f", 1, {"CPU": P.UNIT}, [], [],
                      {"max_retries": 3}, b"", cid, cid, b"job1", b"")
    ok = P.DCall(spec, 1, "ipc:///tmp/r")
    assert P.decode(P.encode(ok)) == ok
    for bad in (spec._replace(num_returns=2), spec._replace(nested=[oid]),
                spec._replace(deps=[[0, oid]]), spec._replace(kind=P.ACTOR_CREATE)):
        with pytest.raises(P.ProtocolError):
            P.decode(P.encode(P.DCall(bad, 1, "ipc:///tmp/r")))
    with pytest.raises(P.ProtocolError):  # a lease id of another length
        P.decode(P.encode(P.Lease(b"short", cid, True, b"f")))


@pytest.mark.timeout(10)
def test_hand_off_ops_and_handed_refs_are_checked():
    """REFS 2 names the client a ref is handed to, REFS 3 takes it; DDONE's handed is
    one list of object ids per return. Anything else is refused at decode."""
    oid, cid = b"o" * P.OBJECT_ID_LEN, b"c" * P.ID_LEN
    for op in ([oid, 2], [oid, 3, cid], [oid, 2, b"short"], [oid, 2, "c" * P.ID_LEN],
               [oid, 4], [oid, -2], [b"short", 3], [oid, 1, cid]):
        with pytest.raises(P.ProtocolError):
            P.decode(P.encode(P.Refs([op])))
    tid = b"t" * P.TASK_ID_LEN
    for handed in ([oid], [[b"short"]], [[1]], "x", [[oid] * 2, None]):
        with pytest.raises(P.ProtocolError):
            P.decode(P.encode(P.DDone(tid, [[P.VALUE, 1]], False, handed)))
    ok = P.DDone(tid, [[P.VALUE, 1], [P.VALUE, 0]], False, [[oid, oid], []])
    assert P.decode(P.encode(ok)) == ok


@pytest.mark.timeout(10)
def test_task_spec_fields_are_checked():
    msg = _sample(P.Submit)
    good = msgpack.unpackb(P.encode(msg))
    for field, bad in [("task_id", b"short"), ("kind", 9), ("num_returns", -5),
                       ("resources", {"CPU": -1}), ("deps", [[0, b"x"]]), ("nested", [1]),
                       ("options", []), ("owner", None)]:
        spec = list(good[1])
        spec[P.TaskSpec._fields.index(field)] = bad
        with pytest.raises(P.ProtocolError):
            P.decode(msgpack.packb([P.Msg.SUBMIT, spec]))


@pytest.mark.timeout(10)
def test_garbage_is_a_protocol_error_never_another_exception():
    import random

    rng = random.Random(3)
    for _ in range(2000):
        buf = rng.randbytes(rng.randint(0, 40))
        try:
            P.decode(buf)
        except P.ProtocolError:
            pass


@pytest.mark.timeout(10)
def test_ids_and_identity_roles():
    tid = b"x" * P.TASK_ID_LEN
    assert P.task_of(P.object_id(tid, 3)) == tid and len(P.object_id(tid, 3)) == P.OBJECT_ID_LEN
    cid = b"N" + b"\0" * (P.ID_LEN - 1)  # a cid that starts like a node identity
    assert P.role_of(P.inbox_ident(cid)) == (P.ROLE_INBOX, cid)
    assert P.role_of(P.out_ident(cid)) == (P.ROLE_OUT, cid)
    assert P.role_of(P.node_ident(cid)) == (P.ROLE_NODE, cid)
    assert P.role_of(b"x" * P.ID_LEN + b"i")[0] is None  # v1 style: not ours


@pytest.fixture
def broker_address(ray_local):
    return ray_local._runtime.client.address


def _dealer(ctx, address, identity):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


@pytest.mark.timeout(30)
def test_a_peer_of_another_version_is_told_both_versions(broker_address):
    ctx = zmq.Context()
    try:
        s = _dealer(ctx, broker_address, P.inbox_ident(os.urandom(P.ID_LEN)))
        s.send(msgpack.packb([P.Msg.HELLO, 1, "driver", b"", os.getpid(), b"j", "extra"]))
        assert s.poll(10000), "the broker did not answer a HELLO of another version"
        reply = P.decode(s.recv())
        assert reply.TYPE == P.Msg.WELCOME
        err = reply.info["error"]
        assert "version 1" in err and f"speaks {P.VERSION}" in err
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(60)
def test_clients_get_heartbeat_answers_whatever_their_first_id_byte(broker_address):
    """Identities say their role by construction: a client id starting with b"N" (or any
    other byte) is never taken for a node."""
    ctx = zmq.Context()
    socks = []
    try:
        for first in range(256):
            cid = bytes([first]) + os.urandom(P.ID_LEN - 1)
            s = _dealer(ctx, broker_address, P.inbox_ident(cid))
            s.send(P.encode(P.Hello(P.VERSION, "cli", b"", os.getpid(), b"probe")))
            socks.append(s)
        for s in socks:
            assert s.poll(10000) and P.decode(s.recv()).TYPE == P.Msg.WELCOME
            s.send(P.encode(P.Heartbeat()))
        for i, s in enumerate(socks):
            assert s.poll(10000), f"no heartbeat answer for a cid starting with {i:#04x}"
            assert P.decode(s.recv()).TYPE == P.Msg.HEARTBEAT
            out = _dealer(ctx, broker_address, P.out_ident(P.role_of(
                s.getsockopt(zmq.IDENTITY))[1]))
            out.send(P.encode(P.Exit()))
            out.close()
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(30)
def test_a_message_from_the_wrong_role_is_dropped(ray_local, broker_address):
    """A client socket cannot speak for a node (EXEC_DIED), and garbage is counted."""
    ctx = zmq.Context()
    try:
        s = _dealer(ctx, broker_address, P.out_ident(os.urandom(P.ID_LEN)))
        nodes = ray_local.nodes()
        s.send(P.encode(P.NodeHello(P.VERSION, bytes.fromhex(nodes[0]["NodeID"]),
                                    {"resources": {"CPU": 1000 * P.UNIT}})))
        s.send(b"\xc1garbage")
    finally:
        ctx.destroy(linger=0)

    @ray_local.remote
    def f():
        return 1

    assert ray_local.get(f.remote(), timeout=20) == 1
    assert ray_local.cluster_resources()["CPU"] == 4  # the forged node hello took no effect


@pytest.mark.timeout(10)
def test_exec_from_forwarded_spec_bytes_is_the_same_message():
    """The broker forwards a SUBMIT's packed spec into EXEC without re-packing it."""
    sub = _sample(P.Submit)
    raw = P.submit_spec_bytes(P.encode(sub))
    for args in [(True, 2, [[1, None]], [0]), (False, 0, [], [])]:
        assert P.encode_exec(raw, *args) == P.encode(P.Exec(sub.spec, *args))
        assert P.decode(P.encode_exec(raw, *args)) == P.Exec(sub.spec, *args)
    assert P.submit_spec_bytes(P.encode(P.Heartbeat())) is None


@pytest.mark.timeout(10)
@pytest.mark.parametrize("cls", P.MESSAGES, ids=lambda c: c.TYPE.name)
def test_the_clients_light_decode_reads_the_same_messages(cls):
    msg = _sample(cls)
    assert P.decode_from_broker(P.encode(msg)) == msg
    with pytest.raises(P.ProtocolError):
        P.decode_from_broker(msgpack.packb([cls.TYPE] + [None] * (len(cls._fields) + 1)))


@pytest.mark.timeout(30)
def test_only_an_executor_its_node_started_is_taken_for_one(ray_local, broker_address):
    """A peer saying HELLO as an executor of a real node (a real node id, any cid, a wrong
    or no token) is refused and never gets a task."""
    node_id = bytes.fromhex(ray_local.nodes()[0]["NodeID"])
    ctx = zmq.Context()
    try:
        for token in (b"", os.urandom(16)):
            cid = os.urandom(P.ID_LEN)
            s = _dealer(ctx, broker_address, P.inbox_ident(cid))
            s.send(P.encode(P.Hello(P.VERSION, "executor", node_id, os.getpid(), b"", token)))
            assert s.poll(10000), "no answer to the HELLO"
            reply = P.decode(s.recv())
            assert reply.TYPE == P.Msg.WELCOME and "error" in reply.info, reply
            out = _dealer(ctx, broker_address, P.out_ident(cid))
            out.send(P.encode(P.Ready()))  # would make it an idle pool executor

            @ray_local.remote
            def f(x):
                return x + 1

            assert ray_local.get([f.remote(i) for i in range(20)], timeout=30) == list(
                range(1, 21))
            assert not s.poll(200), "the impostor was sent something"
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(10)
def test_direct_call_addresses_are_ipc_or_a_plain_tcp_endpoint():
    """reply_to (DCALL) and ROUTE's tcp_address: ipc://..., tcp://host:port, IPv6
    bracketed; no wildcard, no bind-source syntax, no other transport."""
    spec = _sample(P.DCall).spec
    for good in ("ipc:///tmp/r", "tcp://10.1.2.3:4000", "tcp://[::1]:4000", "tcp://h.example:1"):
        assert P.decode(P.encode(P.DCall(spec, 1, good))).reply_to == good
    for bad in ("tcp://*:4000", "tcp://h:0", "tcp://h:99999", "tcp://:4000", "tcp://h",
                "tcp://a;b:4000", "tcp://[::1:4000", "inproc://x", "pgm://h:1", "x" * 300):
        with pytest.raises(P.ProtocolError):
            P.decode(P.encode(P.DCall(spec, 1, bad)))
    route = _sample(P.Route)
    assert P.decode(P.encode(route._replace(tcp_address=""))).tcp_address == ""
    with pytest.raises(P.ProtocolError):
        P.decode(P.encode(route._replace(tcp_address="ipc:///tmp/a")))


@pytest.mark.timeout(10)
def test_a_recall_names_one_to_recall_max_task_ids():
    tid = b"t" * P.TASK_ID_LEN
    assert P.decode(P.encode(P.Recall([tid] * P.RECALL_MAX))) == P.Recall([tid] * P.RECALL_MAX)
    for bad in ([], [tid] * (P.RECALL_MAX + 1), [b"short"], [tid, None], tid, None):
        with pytest.raises(P.ProtocolError):
            P.decode(msgpack.packb([P.Msg.RECALL, bad]))


@pytest.mark.timeout(30)
def test_a_recall_sent_to_the_broker_is_dropped_and_counted(ray_local, broker_address):
    """RECALL goes from the broker to an executor only: from a client it is dropped."""
    client = ray_local._runtime.client
    before = client.request("status")["dropped_messages"]
    ctx = zmq.Context()
    try:
        s = _dealer(ctx, broker_address, P.out_ident(os.urandom(P.ID_LEN)))
        s.send(P.encode(P.Recall([b"t" * P.TASK_ID_LEN])))
    finally:
        ctx.destroy(linger=1000)

    @ray_local.remote
    def f():
        return 1

    assert ray_local.get(f.remote(), timeout=20) == 1
    poll_until(lambda: client.request("status")["dropped_messages"] > before, 10,
               what="the RECALL to be counted as dropped")
