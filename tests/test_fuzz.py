"""The broker and node agents against garbage: random and mutated frames of every message
type, wrong types, huge lengths, impersonated identities, sent to a real broker. Nothing
crashes or hangs, bad messages are counted, memory stays bounded, and the cluster still
computes correctly afterwards. ``-m slow`` runs the long version (200,000 messages)."""

import os
import random

import msgpack
import psutil
import pytest
import zmq
from test_protocol import _sample

import zray
from zray import _protocol as P
from zray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def _mutations(rng: random.Random, cls):
    """A stream of headers derived from a valid message of ``cls``."""
    raw = msgpack.unpackb(P.encode(_sample(cls)))
    junk = [None, True, -1, 2**63, 1.5, "", "x" * 300, b"", b"\0" * 16, [], {}, [[1, 2]],
            {"CPU": "x"}, {"a": [1]}, [b"\0" * 16, 1.0], 10**6]
    while True:
        k = rng.randrange(7)
        h = list(raw)
        if k == 0 and len(h) > 1:  # one field of the wrong type or out of range
            i = rng.randrange(1, len(h))
            h[i] = rng.choice(junk)
        elif k == 1:  # truncated or padded
            h = h[:rng.randrange(len(h) + 1)] if rng.random() < 0.5 else h + [None] * 3
        elif k == 2:
            yield msgpack.packb(h)[:rng.randrange(1, 40)]  # cut in the middle
            continue
        elif k == 3:  # a huge declared length with few bytes behind it
            yield b"\xdd\x7f\xff\xff\xff" + os.urandom(8)
            continue
        elif k == 4:
            yield os.urandom(rng.randrange(0, 64))
            continue
        elif k == 5 and cls is P.Submit:  # a spec field mutated
            spec = list(h[1])
            spec[rng.randrange(len(spec))] = rng.choice(junk)
            h[1] = spec
        yield msgpack.packb(h)


def _fuzz(address: str, count: int, node_id: bytes, seed: int = 1) -> int:
    rng = random.Random(seed)
    ctx = zmq.Context()
    socks = []
    try:
        idents = [P.out_ident(os.urandom(P.ID_LEN)) for _ in range(4)]
        idents += [P.inbox_ident(os.urandom(P.ID_LEN)) for _ in range(2)]
        idents += [P.node_ident(os.urandom(P.ID_LEN)), b"\x00junk", os.urandom(9)]
        idents += [P.node_ident(node_id)]  # impersonates the real node: ZeroMQ refuses it
        for ident in idents:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, ident)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.connect(address)
            socks.append(s)
        # Some of the fake clients say HELLO, so their later messages reach the handlers.
        for s in socks[:2]:
            cid = P.role_of(s.getsockopt(zmq.IDENTITY))[1]
            hello = ctx.socket(zmq.DEALER)
            hello.setsockopt(zmq.IDENTITY, P.inbox_ident(cid))
            hello.setsockopt(zmq.LINGER, 0)
            hello.connect(address)
            hello.send(P.encode(P.Hello(P.VERSION, "driver", b"", 1, b"fuzz")))
            socks.append(hello)
        streams = {cls: _mutations(rng, cls) for cls in P.MESSAGES if cls is not P.NodeHello}
        classes = list(streams)
        for n in range(count):
            header = next(streams[classes[n % len(classes)]])
            frames = [header] + [os.urandom(rng.randrange(0, 32))] * rng.randrange(0, 3)
            if n % 7 == 6:  # a well-formed C->B BATCH of mutated messages
                frames = P.encode_batch([(next(streams[rng.choice(classes)]), [])
                                         for _ in range(rng.randrange(1, 4))])
            rng.choice(socks).send_multipart(frames)
        return count
    finally:
        ctx.destroy(linger=0)


def _broker_and_node():
    procs = [psutil.Process(p.pid) for p in zray._runtime.cluster.procs]
    return procs


def _run(count: int):
    zray.init(num_cpus=2)
    try:
        procs = _broker_and_node()
        rss_before = sum(p.memory_info().rss for p in procs)
        client = zray._runtime.client
        node_id = bytes.fromhex(zray.nodes()[0]["NodeID"])
        sent = _fuzz(client.address, count, node_id)
        status = client.request("status", timeout=120)  # answered after the flood drained
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
        assert status["dropped_messages"] >= sent // 4, status

        @zray.remote
        def square(x):
            return x * x

        @zray.remote
        class Acc:
            def __init__(self):
                self.n = 0

            def add(self, k):
                self.n += k
                return self.n

        here = NodeAffinitySchedulingStrategy(node_id.hex(), soft=False)
        assert zray.get([square.options(scheduling_strategy=here).remote(i) for i in range(50)],
                        timeout=60) == [i * i for i in range(50)]
        acc = Acc.options(scheduling_strategy=here).remote()
        assert zray.get([acc.add.remote(1) for _ in range(20)], timeout=60)[-1] == 20
        assert zray.get(zray.put(list(range(1000))), timeout=30) == list(range(1000))
        rss_after = sum(p.memory_info().rss for p in procs)
        print(f"\n[measure] fuzz: {sent} messages, dropped {status['dropped_messages']}; "
              f"broker+node RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
        assert rss_after - rss_before < 200 * 2**20
    finally:
        zray.shutdown()


@pytest.mark.timeout(180)
def test_fuzzed_messages_leave_the_cluster_working():
    if zray.is_initialized():
        zray.shutdown()
    _run(20_000)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzz_long():
    if zray.is_initialized():
        zray.shutdown()
    _run(200_000)


# REQ ops added with the state API, placement groups, metrics, logs and the dashboard:
# each is asked with wrong types, huge and negative numbers in every argument it reads.
_NEW_OPS = ("state_list", "state_summary", "event_log", "node_logs", "pg_create", "pg_remove",
            "pg_ready", "pg_table", "pg_get", "demand", "metrics_report", "metrics",
            "recent_events", "memory", "task_events", "timeline", "log_dirs", "actors", "jobs",
            "actor_state", "pending_calls")
_ARG_KEYS = ("resource", "filters", "limit", "detail", "since", "node_id", "op", "args",
             "pg_id", "bundles", "strategy", "name", "namespace", "lifetime", "oid", "series",
             "top", "id", "actor_id")
_JUNK = (None, True, -1, -2**63, 2**64 - 1, 1.5, float("nan"), float("inf"), "", "x" * 100_000,
         b"", b"\0" * 18, [], {}, [[1, 2]], {"a": {"b": [1] * 1000}}, 10**9, "../../etc/passwd",
         [["state", "=", "x"]] * 1000)


@pytest.mark.timeout(300)
def test_fuzzed_request_arguments_are_refused_clearly():
    if zray.is_initialized():
        zray.shutdown()
    zray.init(num_cpus=1)
    try:
        client = zray._runtime.client
        procs = _broker_and_node()
        rng = random.Random(7)
        asked = refused = 0
        for op in _NEW_OPS:
            for args in (None, 5, "x", [1], {"limit": 10**12}):
                asked += 1
                try:
                    client.request(op, args, timeout=60)
                except (ValueError, PermissionError) as e:
                    refused += 1
                    assert "unhashable" not in str(e), (op, args, e)
            for key in _ARG_KEYS:
                for junk in _JUNK:
                    args = {key: junk}
                    if op.startswith("state_") and key != "resource":
                        args["resource"] = rng.choice(["tasks", "actors", "objects"])
                    if op == "node_logs" and key not in ("node_id", "op"):
                        args.update(node_id=rng.choice(["", "00" * 8]),
                                    op=rng.choice(["tail", "read", "task", "list"]))
                        args["args"] = {rng.choice(["name", "lines", "offset", "ino",
                                                    "task_id"]): junk}
                    asked += 1
                    try:  # an answer or a refusal, never a stall or a dead broker
                        client.request(op, args, timeout=60)
                    except (ValueError, PermissionError) as e:
                        refused += 1
                        assert "unhashable" not in str(e), (op, args, e)
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
        print(f"\n[measure] REQ fuzz: {asked} requests, {refused} refused")
        assert refused > asked // 3

        @zray.remote
        def square(x):
            return x * x

        assert zray.get([square.remote(i) for i in range(20)], timeout=60) == [
            i * i for i in range(20)]
    finally:
        zray.shutdown()


@pytest.mark.timeout(120)
def test_garbage_pushed_to_a_drivers_direct_inbox_leaves_it_working():
    """Executors on a node push results straight to an owner's PULL socket, one OBJ or a
    BATCH of them (workerd/held.py): whatever lands there, the driver drops what does not
    decode and its own results still arrive."""
    if zray.is_initialized():
        zray.shutdown()
    zray.init(num_cpus=2)
    ctx = zmq.Context()
    try:
        client = zray._runtime.client
        assert client._direct_path, "the driver has a direct inbox on its node"
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(f"ipc://{client._direct_path}")
        rng = random.Random(3)
        obj = P.encode(P.Obj(b"o" * P.OBJECT_ID_LEN, P.VALUE, None, None))
        samples = [
            [P.encode(P.Batch([2, 2], None)), obj],  # counts that do not add up
            [msgpack.packb([P.Msg.BATCH, [1], [5]]), b"abc"],  # sizes that do not add up
            P.encode_batch([(b"\xc1garbage", []), (obj, [b"x"])]),  # a bad message inside
            P.encode_batch([(obj, [os.urandom(40)])] * 3),  # unpicklable values, unknown oid
            [msgpack.packb([P.Msg.BATCH, [1] * 5000, None])] + [obj] * 5000,  # too many
        ]
        for _ in range(300):
            samples.append([os.urandom(rng.randrange(1, 64))] * rng.randrange(1, 4))
        for parts in samples:
            push.send_multipart(parts)

        @zray.remote
        def square(x):
            return x * x

        for _ in range(3):
            assert zray.get([square.remote(i) for i in range(300)], timeout=60) == [
                i * i for i in range(300)]
    finally:
        ctx.destroy(linger=0)
        zray.shutdown()
