"""Placement groups on a real cluster of `zray worker` processes.

    zray broker --host 127.0.0.1 --port PORT
    zray worker --address ... --num-cpus 2 --resources '{"w0": 1}' --labels zone=a   (x3)

The driver (this test process) creates groups with each strategy and checks,
with ``get_runtime_context().get_node_id()``, where their bundles and members
ran; removal kills members and gives resources back; a group that cannot fit
waits until a node joins; a node's death moves its bundles elsewhere.
"""

import subprocess
import time
import warnings

import pytest
from _cluster import CliCluster, cli_cluster
from conftest import poll_until

import zray
from zray import exceptions
from zray.util.placement_group import (
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from zray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

pytestmark = pytest.mark.timeout(180)


class Cluster(CliCluster):
    def add_worker(self, name, cpus=2, zone="a", gpus=0):
        return super().add_worker(name, cpus=cpus, gpus=gpus, labels={"zone": zone})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cli_cluster(tmp_path_factory.mktemp("pgcluster"), Cluster,
                     env={"ZRAY_NODE_TIMEOUT_S": "2"}) as c:  # node death noticed quickly
        for name in ("w0", "w1", "w2"):
            c.add_worker(name)
        yield c


@zray.remote(num_cpus=1)
def where():
    return zray.get_runtime_context().get_node_id()


def _in(pg, index=-1, capture=None):
    return PlacementGroupSchedulingStrategy(pg, index, capture)


def _bundle_nodes(pg):
    row = placement_group_table(pg)
    return [row["bundles_to_node_id"].get(i) for i in range(len(row["bundles"]))]


def _cpus_back(total=6.0):
    poll_until(lambda: zray.available_resources().get("CPU") == total, 30,
               what=f"all {total} CPUs free again")


@pytest.mark.parametrize("strategy", ["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"])
def test_each_strategy_places_bundles_and_members_run_there(cluster, strategy):
    pg = placement_group([{"CPU": 0.5}] * 3, strategy=strategy)
    assert zray.get(pg.ready(), timeout=60) == pg
    assert pg.wait(10) is True
    nodes = _bundle_nodes(pg)
    assert all(nodes), nodes
    if strategy in ("PACK", "STRICT_PACK"):
        assert len(set(nodes)) == 1, nodes  # 1.5 CPUs fit on one node
    else:
        assert len(set(nodes)) == 3, nodes  # three nodes with room: one bundle each
    ran = zray.get([where.options(num_cpus=0.5, scheduling_strategy=_in(pg, i)).remote()
                    for i in range(3)],
                   timeout=60)
    assert ran == nodes
    row = placement_group_table(pg)
    assert row["state"] == "CREATED" and row["strategy"] == strategy
    remove_placement_group(pg)
    assert placement_group_table(pg)["state"] == "REMOVED"
    _cpus_back()


def test_strict_pack_group_larger_than_any_node_waits_until_one_joins(cluster, capfd):
    pg = placement_group([{"CPU": 2}, {"CPU": 1}], strategy="STRICT_PACK", name="big")
    assert pg.wait(1) is False  # every node has 2 CPUs: no node holds 3
    row = placement_group_table(pg)
    assert row["state"] == "PENDING" and row["infeasible"], row
    err = poll_until(lambda: capfd.readouterr().err, 30, what="the driver's warning")
    assert "big" in err and "infeasible" in err, err
    assert get_placement_group("big") == pg
    ready = pg.ready()
    node = cluster.add_worker("w3", cpus=4)
    assert zray.get(ready, timeout=60) == pg
    assert _bundle_nodes(pg) == [node, node]
    assert zray.get(where.options(scheduling_strategy=_in(pg)).remote(), timeout=60) == node
    remove_placement_group(pg)
    with pytest.raises(ValueError, match="big"):
        get_placement_group("big")
    cluster.kill_worker("w3")
    poll_until(lambda: not any(n["Alive"] and n["NodeID"] == node for n in zray.nodes()), 30,
               what="w3 to be declared dead")
    _cpus_back()


def test_child_tasks_captured_and_current_group(cluster):
    pg = placement_group([{"CPU": 2}], strategy="STRICT_PACK")
    zray.get(pg.ready(), timeout=60)
    (node,) = _bundle_nodes(pg)

    @zray.remote(num_cpus=1)
    def parent():
        cur = get_current_placement_group()
        return (cur, zray.get_runtime_context().get_placement_group_id(),
                zray.get([where.remote() for _ in range(4)]))

    cur, pg_hex, children = zray.get(
        parent.options(scheduling_strategy=_in(pg, capture=True)).remote(), timeout=60)
    assert cur == pg and pg_hex == pg.id.hex()
    assert children == [node] * 4
    # Without capture, children go anywhere (here: pinned to another node by a resource).
    other = [n for n, i in cluster.node_of.items() if i != node and n in ("w0", "w1", "w2")][0]

    @zray.remote(num_cpus=1)
    def free_parent():
        return get_current_placement_group(), zray.get(where.options(
            resources={other: 0.1}).remote())

    cur, child = zray.get(free_parent.options(scheduling_strategy=_in(pg)).remote(), timeout=60)
    assert cur == pg and child != node
    assert get_current_placement_group() is None  # a driver is in no group
    remove_placement_group(pg)
    _cpus_back()
    # A parent waiting in get() lends its bundle's CPU to the children it captured.
    small = placement_group([{"CPU": 1}])
    zray.get(small.ready(), timeout=60)
    cur, _, children = zray.get(
        parent.options(scheduling_strategy=_in(small, 0, capture=True)).remote(), timeout=60)
    assert cur == small and set(children) == set(_bundle_nodes(small))
    remove_placement_group(small)
    _cpus_back()


def test_gpu_bundles_give_their_members_gpu_ids(cluster, tmp_path):
    node = cluster.add_worker("wgpu", cpus=2, gpus=2)
    try:
        pg = placement_group([{"GPU": 1, "wgpu": 0.1}, {"GPU": 1}], strategy="STRICT_PACK")
        zray.get(pg.ready(), timeout=60)
        assert _bundle_nodes(pg) == [node, node]

        @zray.remote(num_gpus=1, num_cpus=0)
        def gpus(release):
            import os
            while not os.path.exists(release):  # both hold their GPU at once
                time.sleep(0.02)
            return zray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

        release = str(tmp_path / "release")
        refs = [gpus.options(scheduling_strategy=_in(pg, i)).remote(release) for i in range(2)]
        poll_until(lambda: zray.available_resources().get(f"GPU_group_{pg.id.hex()}", 0) == 0,
                   60, what="both members to hold their bundle's GPU")
        open(release, "w").close()
        got = zray.get(refs, timeout=60)
        ids = [g[0] for g in got]
        assert all(len(i) == 1 for i in ids) and ids[0] != ids[1], got
        assert [g[1] for g in got] == [str(i[0]) for i in ids], got
        remove_placement_group(pg)
    finally:
        cluster.kill_worker("wgpu")
        poll_until(lambda: not any(n["Alive"] and n["NodeID"] == node for n in zray.nodes()),
                   30, what="wgpu to be declared dead")


def test_remove_kills_tasks_and_actors_and_frees_resources(cluster):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="SPREAD")
    zray.get(pg.ready(), timeout=60)

    @zray.remote
    class Holder:
        def node(self):
            return zray.get_runtime_context().get_node_id()

    @zray.remote(num_cpus=1)
    def sleeper():
        time.sleep(300)

    actor = Holder.options(num_cpus=1, scheduling_strategy=_in(pg, 0)).remote()
    assert zray.get(actor.node.remote(), timeout=60) == _bundle_nodes(pg)[0]
    running = sleeper.options(scheduling_strategy=_in(pg, 1)).remote()
    queued = sleeper.options(scheduling_strategy=_in(pg, 1)).remote()  # waits for bundle 1
    poll_until(lambda: zray.available_resources().get(
        f"CPU_group_1_{pg.id.hex()}", 0) == 0, 30, what="the sleeper to start")
    remove_placement_group(pg)
    for ref in (running, queued):
        with pytest.raises(exceptions.TaskPlacementGroupRemoved):
            zray.get(ref, timeout=60)
    with pytest.raises(exceptions.ActorDiedError, match="placement group"):
        zray.get(actor.node.remote(), timeout=60)
    _cpus_back()
    assert not any("_group_" in k for k in zray.available_resources())
    # Tasks sent to a removed group fail at once, naming it.
    with pytest.raises(exceptions.TaskUnschedulableError, match="removed"):
        zray.get(where.options(scheduling_strategy=_in(pg)).remote(), timeout=60)


def test_node_death_reschedules_its_bundles(cluster):
    cluster.add_worker("w4", cpus=2, zone="b")
    pg = placement_group([{"w4": 0.5, "CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    zray.get(pg.ready(), timeout=60)
    nodes = _bundle_nodes(pg)
    assert nodes[0] == cluster.node_of["w4"]
    cluster.kill_worker("w4")
    poll_until(lambda: placement_group_table(pg)["state"] == "RESCHEDULING", 60,
               what="the group to lose its bundle")
    # Bundle 0 needs w4's resource: it waits until a node with it joins again.
    node = cluster.add_worker("w4", cpus=2, zone="b")
    poll_until(lambda: placement_group_table(pg)["state"] == "CREATED", 60,
               what="the group to be placed again")
    assert _bundle_nodes(pg) == [node, nodes[1]]
    assert zray.get(where.options(scheduling_strategy=_in(pg, 0)).remote(), timeout=60) == node
    remove_placement_group(pg)
    cluster.kill_worker("w4")


def test_deprecated_placement_group_options_and_bad_input(cluster):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    zray.get(pg.ready(), timeout=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ran = zray.get(where.options(placement_group=pg, placement_group_bundle_index=1)
                       .remote(), timeout=60)
    assert ran == _bundle_nodes(pg)[1]
    assert any(issubclass(w.category, DeprecationWarning) and "placement_group" in
               str(w.message) for w in caught), [str(w.message) for w in caught]
    with pytest.raises(ValueError, match="bundle index 2"):
        where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 2)).remote()
    with pytest.raises(ValueError, match="cannot fit"):
        where.options(num_cpus=2, scheduling_strategy=_in(pg)).remote()
    with pytest.raises(ValueError, match="strategy"):
        placement_group([{"CPU": 1}], strategy="TIGHT")
    with pytest.raises(ValueError, match="empty"):
        placement_group([])
    with pytest.raises(ValueError, match="0 values"):
        placement_group([{"CPU": 0}])
    with pytest.raises(ValueError, match="lifetime"):
        placement_group([{"CPU": 1}], lifetime="forever")
    with pytest.raises(ValueError, match="bundle_label_selector"):
        placement_group([{"CPU": 1}], bundle_label_selector=[{"zone": "a"}])
    named = placement_group([{"CPU": 1}], name="dup")
    with pytest.raises(ValueError, match="already exists"):
        placement_group([{"CPU": 1}], name="dup")
    table = placement_group_table()
    assert pg.id.hex() in table and named.id.hex() in table
    remove_placement_group(named)
    remove_placement_group(pg)
    _cpus_back()


def test_cli_status_lists_groups(cluster):
    pg = placement_group([{"CPU": 64}], name="huge")
    try:
        from test_cli_cluster import _zray_cmd

        def listed():
            out = subprocess.run(_zray_cmd() + ["status", "--address", cluster.address],
                                 capture_output=True, text=True, timeout=30,
                                 env=cluster.procs.env)
            return out.stdout if "huge" in out.stdout and "infeasible" in out.stdout.lower() \
                else None

        poll_until(listed, 30, interval=0.5, what="zray status to list the pending group")
    finally:
        remove_placement_group(pg)


def test_groups_die_with_their_driver_unless_detached(cluster, tmp_path):
    import sys

    from conftest import driver_env

    script = tmp_path / "creator.py"
    script.write_text(
        "import zray\n"
        "from zray.util.placement_group import placement_group\n"
        f"zray.init(address={cluster.address!r})\n"
        "a = placement_group([{'CPU': 1}], name='mine')\n"
        "b = placement_group([{'CPU': 1}], name='kept', lifetime='detached')\n"
        "zray.get([a.ready(), b.ready()], timeout=60)\n"
        "@zray.remote(num_cpus=0)\n"
        "def make():\n"
        "    p = placement_group([{'CPU': 1}], name='by_task')\n"
        "    return zray.get(p.ready(), timeout=60) is not None\n"
        "assert zray.get(make.remote(), timeout=60)\n"
        "from zray.util.placement_group import get_placement_group, placement_group_table\n"
        "print(placement_group_table(get_placement_group('by_task'))['state'])\n"
        "print('CREATED', flush=True)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=driver_env(**{
                             k: v for k, v in cluster.procs.env.items()
                             if k.startswith("ZRAY_")}))
    # a group a task made outlives the task (it belongs to the task's job)...
    assert out.stdout.split() == ["CREATED", "CREATED"], out.stdout + out.stderr

    def states():
        rows = {r["name"]: r["state"] for r in placement_group_table().values()
                if r["name"] in ("mine", "kept", "by_task")}
        return rows if rows.get("mine") == rows.get("by_task") == "REMOVED" else None

    # ... and ends with the job's driver, as the driver's own does; a detached one stays
    assert poll_until(states, 60, what="the driver's groups to be removed") == {
        "mine": "REMOVED", "by_task": "REMOVED", "kept": "CREATED"}
    kept = [r for r in placement_group_table().values() if r["name"] == "kept"][0]
    from zray.util.placement_group import PlacementGroup
    remove_placement_group(PlacementGroup(kept["placement_group_id"]))
    _cpus_back()
