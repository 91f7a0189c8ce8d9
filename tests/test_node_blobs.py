"""Node-to-node blobs: a large object moves from the node holding it to the node that
needs it, directly, on a CLI cluster with CURVE (as a user starts one):

    zray broker --host 127.0.0.1 --port PORT
    zray worker --address tcp://127.0.0.1:PORT --num-cpus 1 --resources '{"nodeA": 1}'
                --object-store-memory 64 MiB          (the holder: small, so it spills)
    zray worker ... --resources '{"nodeB": 1}'        (the consumer)

A task pinned to node A makes an array; a task pinned to node B consumes it and
checks every byte. The broker's own counters (``zray status``'s REQ) must show
that the object was pulled node to node (``direct_pulls``) and that the broker
carried none of it (``relayed_blob_bytes``). A spilled object is served from
node A's disk. A holder that dies while a pull from it is in flight ends as it
did when the broker moved blobs: a result with lineage is rebuilt, one without
raises ObjectLostError. Forged requests on a node's peer socket (from a holder
of the cluster key, without the broker's ticket) are dropped, counted and never
answered.
"""

import os
import random
import re
import signal

import numpy as np
import pytest
import zmq
from _cluster import CliCluster, cli_cluster
from conftest import kill_tree, poll_until

import zray
from zray import _protocol as P
from zray import _runtime
from zray._security import load_key_file
from zray.exceptions import ObjectLostError
from zray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(180)

MB = 2**20
STORE_A = 64 * MB


class Cluster(CliCluster):
    def add_worker(self, name, extra=()):
        return super().add_worker(name, cpus=1, extra=extra)

    def peer_address(self, name) -> str:
        found = re.search(r"peers pull blobs at (\S+)", self.log(name))
        assert found, self.log(name)[-2000:]
        return found.group(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # CURVE, as any tcp cluster by default; node death noticed quickly; a pull from a
    # dead holder gives up soon
    with cli_cluster(tmp_path_factory.mktemp("blobs"), Cluster, unset=("ZRAY_INSECURE",),
                     env={"ZRAY_NODE_TIMEOUT_S": "2", "ZRAY_PULL_TIMEOUT_S": "4"}) as c:
        c.add_worker("nodeA", ["--object-store-memory", str(STORE_A)])
        c.add_worker("nodeB")
        yield c


def broker_stats() -> dict:
    return _runtime.require_client().request("status")


def _array(kind: str, nbytes: int, seed: int = 0):
    if kind == "compressible":
        return np.arange(nbytes // 8, dtype=np.int64)
    return np.random.default_rng(seed).integers(0, 2**62, nbytes // 8, dtype=np.int64)


@zray.remote
def make(kind, nbytes, seed=0):
    return _array(kind, nbytes, seed)


@zray.remote
def check(x, kind, nbytes, seed=0):
    """On the consuming node: the value is identical, byte for byte; where it ran."""
    same = x.dtype == np.int64 and bool(np.array_equal(x, _array(kind, nbytes, seed)))
    return same, zray.get_runtime_context().get_node_id()


def on(name):
    return {"resources": {name: 0.01}}


@pytest.mark.parametrize("kind", ["compressible", "incompressible"])
def test_large_object_made_on_a_is_pulled_by_b_directly(cluster, kind):
    nbytes = 24 * MB  # several chunks (zray._peer.CHUNK_BYTES)
    ref = make.options(**on("nodeA")).remote(kind, nbytes, seed=3)
    zray.wait([ref], timeout=60, fetch_local=False)
    before = broker_stats()
    same, where = zray.get(check.options(**on("nodeB")).remote(ref, kind, nbytes, seed=3),
                           timeout=60)
    after = broker_stats()
    assert where == cluster.node_of["nodeB"]
    assert same, f"the {kind} array arrived on node B changed"
    assert after["direct_pulls"] >= before["direct_pulls"] + 1, (before, after)
    assert after["pull_fallbacks"] == before["pull_fallbacks"], (before, after)
    assert after["relayed_blob_bytes"] == before["relayed_blob_bytes"], (
        f"the broker carried {after['relayed_blob_bytes'] - before['relayed_blob_bytes']} "
        f"bytes of blobs")


def test_spilled_object_is_served_from_the_holders_disk(cluster):
    nbytes = 24 * MB
    node_a = cluster.node_of["nodeA"]
    first = make.options(**on("nodeA")).remote("incompressible", nbytes, seed=11)
    zray.wait([first], timeout=60, fetch_local=False)
    # Node A's store holds 64 MiB: two more objects push the oldest to disk.
    more = [make.options(**on("nodeA")).remote("compressible", nbytes) for _ in range(2)]
    zray.wait(more, num_returns=2, timeout=60, fetch_local=False)
    spill_file = os.path.join(cluster.procs.env["ZRAY_TMPDIR"], "spill", node_a, first.hex())
    poll_until(lambda: os.path.exists(spill_file), 60, interval=0.1,
               what=f"node A to spill {first.hex()}")
    before = broker_stats()
    same, where = zray.get(check.options(**on("nodeB")).remote(first, "incompressible", nbytes,
                                                                  seed=11), timeout=60)
    after = broker_stats()
    assert where == cluster.node_of["nodeB"] and same
    assert after["direct_pulls"] >= before["direct_pulls"] + 1, (before, after)
    assert after["relayed_blob_bytes"] == before["relayed_blob_bytes"], (before, after)
    del more


def test_forged_peer_requests_are_dropped_and_counted(cluster):
    """A holder of the cluster key talks to node A's peer socket directly, without a
    ticket from the broker (a few forged requests, then 300 random or mutated ones):
    nothing is answered, every request is counted, and node A still serves."""
    ref = make.options(**on("nodeA")).remote("compressible", 2 * MB)
    zray.wait([ref], timeout=60, fetch_local=False)
    keys = load_key_file()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = keys["server_public"].encode()
        sock.curve_publickey = keys["client_public"].encode()
        sock.curve_secretkey = keys["client_secret"].encode()
        sock.connect(cluster.peer_address("nodeA"))
        oid = ref.binary()
        forged = [
            [P.encode(P.PeerGet(oid, b"\x01" * P.ID_LEN, os.urandom(32), 0, MB))],  # no grant
            [b"\x93\x01\x02"],  # not a message
            [P.encode(P.PeerChunk(oid, 0, MB, 0)), b"x" * 10],  # not a request
            [P.encode(P.PeerGet(oid, b"\x01" * P.ID_LEN, os.urandom(32), 0, MB)), b"extra"],
            [P.encode(P.PeerGet(oid, b"\x01" * P.ID_LEN, os.urandom(32), 0, 1 << 40))],  # huge
        ]
        rng = random.Random(5)
        good = bytearray(P.encode(P.PeerGet(oid, b"\x01" * P.ID_LEN, os.urandom(32), 0, MB)))
        for _ in range(300):  # random bytes, and a request with bytes flipped
            if rng.random() < 0.5:
                forged.append([rng.randbytes(rng.randint(0, 300))])
            else:
                bad = bytearray(good)
                for _ in range(rng.randint(1, 4)):
                    bad[rng.randrange(len(bad))] = rng.randrange(256)
                forged.append([bytes(bad)])
        for frames in forged:
            sock.send_multipart(frames)
        poll_until(lambda: f"dropped {len(forged)} bad peer requests so far" in cluster.log("nodeA"),
                   30, interval=0.2, what="node A to drop and count the forged requests")
        assert sock.poll(500) == 0, "node A answered a forged request"
    finally:
        sock.close(0)
        ctx.term()
    # ... and it still serves the nodes the broker sends.
    same, _ = zray.get(check.options(**on("nodeB")).remote(ref, "compressible", 2 * MB),
                       timeout=60)
    assert same


def test_holder_dying_during_a_pull_rebuilds_or_loses_as_before(cluster):
    """Node D holds two results; its agent is stopped, node B is told to pull both
    (pulls in flight, unanswered), then D is SIGKILLed. The result whose task can run
    elsewhere (soft affinity) is rebuilt and arrives intact; the one that cannot be
    rebuilt (max_retries=0) raises ObjectLostError, as when the broker moved blobs."""
    node_d = cluster.add_worker("nodeD")
    victim = cluster.procs.procs["nodeD"]
    nbytes = 8 * MB
    soft = NodeAffinitySchedulingStrategy(node_d, soft=True)
    rebuildable = make.options(scheduling_strategy=soft).remote("incompressible", nbytes, seed=5)
    lost = make.options(**on("nodeD"), max_retries=0).remote("compressible", nbytes)
    zray.wait([rebuildable, lost], num_returns=2, timeout=60, fetch_local=False)
    try:
        before = broker_stats()
        os.kill(victim.pid, signal.SIGSTOP)
        got_rebuilt = check.options(**on("nodeB")).remote(rebuildable, "incompressible", nbytes,
                                                          seed=5)
        got_lost = check.options(**on("nodeB")).remote(lost, "compressible", nbytes)
        poll_until(lambda: broker_stats()["direct_pulls"] >= before["direct_pulls"] + 2, 30,
                   interval=0.1, what="the broker to send node B both pulls")
    finally:
        kill_tree(victim.pid)  # (SIGKILL ends a stopped process too)
        victim.wait(10)
        cluster.procs.procs.pop("nodeD")
    same, where = zray.get(got_rebuilt, timeout=90)
    assert same and where == cluster.node_of["nodeB"]
    with pytest.raises(ObjectLostError) as e:
        zray.get(got_lost, timeout=90)
    assert lost.hex() in str(e.value), str(e.value)
    # Node B's stale pulls from D gave up and the cluster still moves blobs node to node.
    ref = make.options(**on("nodeA")).remote("incompressible", 2 * MB, seed=9)
    same, _ = zray.get(check.options(**on("nodeB")).remote(ref, "incompressible", 2 * MB,
                                                           seed=9), timeout=60)
    assert same


def test_a_pull_the_holder_never_answers_falls_back_to_the_broker(cluster):
    """Node E gives a holder no time to answer (ZRAY_PULL_TIMEOUT_S=0), as if a
    firewall stood between them: its pull from node A fails unanswered, the broker
    moves the object itself and it arrives intact; the next object between the two
    comes through the broker at once, without another try."""
    env = cluster.procs.env
    cluster.procs.env = dict(env, ZRAY_PULL_TIMEOUT_S="0")
    try:
        cluster.add_worker("nodeE")
    finally:
        cluster.procs.env = env
    nbytes = 4 * MB
    try:
        for seed in (21, 22):
            ref = make.options(**on("nodeA")).remote("incompressible", nbytes, seed=seed)
            zray.wait([ref], timeout=60, fetch_local=False)
            before = broker_stats()
            same, where = zray.get(check.options(**on("nodeE")).remote(
                ref, "incompressible", nbytes, seed=seed), timeout=90)
            after = broker_stats()
            assert same and where == cluster.node_of["nodeE"]
            assert after["relayed_blob_bytes"] >= before["relayed_blob_bytes"] + nbytes
            if seed == 21:  # tried directly first, unanswered, then moved by the broker
                assert after["pull_fallbacks"] == before["pull_fallbacks"] + 1, (before, after)
            else:  # straight through the broker: no second wait
                assert after["direct_pulls"] == before["direct_pulls"], (before, after)
        assert "cannot reach node" in cluster.log("broker")
    finally:
        p = cluster.procs.procs.pop("nodeE")
        p.send_signal(signal.SIGTERM)
        p.wait(15)
