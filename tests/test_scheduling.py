"""Scheduling strategies on a real cluster of `zray worker` processes.

    zray broker; zray worker --num-cpus 4 --labels zone=a (w0, w1), zone=b (w2)

Which node ran what is read from ``get_runtime_context().get_node_id()`` (or,
while tasks hold their CPUs, from each node's used CPUs): DEFAULT packs below
the 0.5 spread threshold and spreads above it; SPREAD uses every node; a task
follows its 100 MB argument; hard and soft node affinity; node labels
(NodeLabelSchedulingStrategy, label_selector, fallback_strategy);
accelerator_type; actors that need nothing land on random nodes; infeasible work
warns once, is listed by `zray status`, and runs when a node that fits joins.
"""

import os
import subprocess

import numpy as np
import pytest
from _cluster import cli_cluster
from conftest import poll_until
from test_cli_cluster import _zray_cmd
from test_placement_groups import Cluster

import zray
from zray import exceptions
from zray.util.scheduling_strategies import (
    DoesNotExist,
    Exists,
    In,
    NodeAffinitySchedulingStrategy,
    NodeLabelSchedulingStrategy,
    NotIn,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cli_cluster(tmp_path_factory.mktemp("schedcluster"), Cluster, clean_stop=False,
                     env={"ZRAY_NODE_TIMEOUT_S": "2"}) as c:
        for name, zone in (("w0", "a"), ("w1", "a"), ("w2", "b")):
            c.add_worker(name, cpus=4, zone=zone)
        yield c


@zray.remote(num_cpus=1)
def where():
    return zray.get_runtime_context().get_node_id()


@zray.remote(num_cpus=1)
def hold(path):
    """Keep a CPU until ``path`` exists (the test's release), then say where it ran."""
    import time

    while not os.path.exists(path):
        time.sleep(0.02)
    return zray.get_runtime_context().get_node_id()


def _used():
    """CPUs in use on each node, by node id."""
    return {n["NodeID"]: n["Resources"]["CPU"] - n["Available"].get("CPU", 0)
            for n in zray.nodes() if n["Alive"]}


def _wait_used(expected_sorted, what):
    last = {}

    def reached():
        last["used"] = u = _used()
        return u if sorted(u.values()) == expected_sorted else None

    try:
        return poll_until(reached, 120, interval=0.05, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; CPUs used by node: {last.get('used')}") from None


def test_default_packs_below_the_threshold_then_spreads(cluster, tmp_path):
    _wait_used([0, 0, 0], "an idle cluster")
    release = str(tmp_path / "release")
    try:
        refs = [hold.remote(release) for _ in range(2)]
        used = _wait_used([0, 0, 2], "two tasks on one node (packed: 0.5 of 4 CPUs)")
        first = max(used, key=used.get)
        refs += [hold.remote(release) for _ in range(4)]
        _wait_used([2, 2, 2], "each node filled to the threshold in turn")
        refs += [hold.remote(release) for _ in range(3)]
        _wait_used([3, 3, 3], "above the threshold: the least used node each time")
    finally:
        open(release, "w").close()
    ran = zray.get(refs, timeout=60)
    assert ran[:2] == [first, first]
    assert len(set(ran)) == 3


def test_spread_uses_every_node(cluster, tmp_path):
    _wait_used([0, 0, 0], "an idle cluster")
    release = str(tmp_path / "release")
    try:
        refs = [hold.options(scheduling_strategy="SPREAD").remote(release) for _ in range(3)]
        _wait_used([1, 1, 1], "one task on each node")
    finally:
        open(release, "w").close()
    assert set(zray.get(refs, timeout=60)) == {cluster.node_of[w] for w in ("w0", "w1", "w2")}


def test_task_follows_its_100mb_argument(cluster):
    @zray.remote(resources={"w2": 0.1})
    def make():
        return np.ones(100 * 1024 * 1024, dtype=np.uint8)

    @zray.remote
    def consume(a):
        return int(a[:10].sum()), zray.get_runtime_context().get_node_id()

    big = make.remote()
    zray.wait([big], timeout=60)
    for _ in range(3):
        assert zray.get(consume.remote(big), timeout=60) == (10, cluster.node_of["w2"])


def test_node_affinity_hard_and_soft(cluster):
    target = cluster.node_of["w1"]
    hard = NodeAffinitySchedulingStrategy(target, soft=False)
    assert set(zray.get([where.options(scheduling_strategy=hard).remote()
                         for _ in range(4)], timeout=60)) == {target}
    dead = "ab" * 8  # a node id no node has
    with pytest.raises(exceptions.TaskUnschedulableError, match=dead):
        zray.get(where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            dead, soft=False)).remote(), timeout=60)
    soft = NodeAffinitySchedulingStrategy(dead, soft=True)
    assert zray.get(where.options(scheduling_strategy=soft).remote(), timeout=60) in set(
        cluster.node_of.values())
    # soft, to a live node with room: that node
    assert zray.get(where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        target, soft=True)).remote(), timeout=60) == target


def test_node_labels(cluster):
    a = {cluster.node_of["w0"], cluster.node_of["w1"]}
    b = cluster.node_of["w2"]

    def run(strategy, n=4):
        return set(zray.get([where.options(scheduling_strategy=strategy).remote()
                             for _ in range(n)], timeout=60))

    assert run(NodeLabelSchedulingStrategy({"zone": In("b")})) == {b}
    assert run(NodeLabelSchedulingStrategy({"zone": NotIn("b")}), 8) <= a
    assert run(NodeLabelSchedulingStrategy({"zone": Exists()}), 8) <= a | {b}
    assert run(NodeLabelSchedulingStrategy({"zone": In("a", "b")},
                                           soft={"zone": In("b")})) == {b}
    nowhere = where.options(scheduling_strategy=NodeLabelSchedulingStrategy(
        {"gpu": Exists()})).remote()
    ready, _ = zray.wait([nowhere], timeout=1)
    assert not ready  # no node has a gpu label: it waits
    zray.cancel(nowhere)
    assert run(NodeLabelSchedulingStrategy({"gpu": DoesNotExist()}), 8) <= a | {b}
    with pytest.raises(ValueError, match="cannot both be empty"):
        NodeLabelSchedulingStrategy({})
    with pytest.raises(ValueError, match="In"):
        NodeLabelSchedulingStrategy({"zone": "a"})
    # label_selector with a fallback: no node in zone c, so zone b
    ran = zray.get(where.options(label_selector={"zone": "c"}, fallback_strategy=[
        {"label_selector": {"zone": "b"}}]).remote(), timeout=60)
    assert ran == b
    with pytest.raises(ValueError, match="fallback_strategy"):
        where.options(fallback_strategy=[{"num_cpus": 1}]).remote()


def test_zero_resource_actors_land_on_random_nodes(cluster):
    @zray.remote(num_cpus=0)
    class Light:
        def node(self):
            return zray.get_runtime_context().get_node_id()

    actors = [Light.remote() for _ in range(12)]
    nodes = zray.get([a.node.remote() for a in actors], timeout=120)
    assert len(set(nodes)) >= 2, nodes  # all 12 on one of 3 nodes: p = 3/3**12
    for a in actors:
        zray.kill(a)


def test_infeasible_waits_warns_once_and_runs_when_a_node_fits(cluster, capfd):
    refs = [where.options(resources={"special": 1}).remote() for _ in range(3)]
    ready, _ = zray.wait(refs, timeout=1)
    assert not ready

    def warned():
        return capfd.readouterr().err

    err = poll_until(warned, 30, what="the driver's infeasible warning")
    assert "special" in err and "infeasible" in err, err

    def listed():
        out = subprocess.run(_zray_cmd() + ["status", "--address", cluster.address],
                             capture_output=True, text=True, timeout=30, env=cluster.procs.env)
        return out.stdout if "special" in out.stdout else None

    status = poll_until(listed, 30, interval=0.5, what="zray status to list the demand")
    assert "infeasible" in status and "3 task(s)" in status, status
    name = "w_special"
    cluster.procs.start(name, ["worker", "--address", cluster.address, "--num-cpus", "1",
                               "--resources", '{"special": 1}'])
    ran = zray.get(refs, timeout=120)
    assert len(set(ran)) == 1 and ran[0] not in cluster.node_of.values()
    assert warned().count("special") == 0  # one warning, not one per task or pass
    cluster.kill_worker(name)


def test_accelerator_type_is_a_resource(cluster):
    name = "w_a100"
    cluster.procs.start(name, ["worker", "--address", cluster.address, "--num-cpus", "1",
                               "--resources", '{"accelerator_type:A100": 1}'])
    try:
        ran = zray.get(where.options(accelerator_type="A100").remote(), timeout=120)
        node = [n for n in zray.nodes() if n["Alive"]
                and n["Resources"].get("accelerator_type:A100")][0]["NodeID"]
        assert ran == node
    finally:
        cluster.kill_worker(name)
