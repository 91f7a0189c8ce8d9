"""Placement groups survive a broker restart (issue 10 item 7).

A real cluster started with the CLI (``zray broker --state-dir`` and
``zray worker`` processes), this test process as its driver; the broker is
killed with SIGKILL and started again on the same port with the same state
directory. What the user sees:

* a detached named group is found by name at once, placement_group_table shows
  it CREATED with the same bundle -> node mapping, the detached actor in it
  answers (same process), a new task sent into the group runs on its bundle's
  node, and removing the group afterwards gives the resources back;
* bundles on a worker that does not come back within the grace period are
  placed again on another node; a group whose (non-detached) creator did not
  come back is removed; a pg.ready() ref the driver held across the restart
  resolves once the group is placed.
"""

import os
import time

import pytest
from _restart_cluster import restartable_cluster
from conftest import poll_until

import zray
from zray.util.placement_group import (
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from zray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

pytestmark = pytest.mark.timeout(240)


@zray.remote
def where():
    return zray.get_runtime_context().get_node_id()


@zray.remote
class Keeper:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n

    def pid(self):
        return os.getpid()


def _in(pg, i=-1):
    return PlacementGroupSchedulingStrategy(placement_group=pg,
                                            placement_group_bundle_index=i)


def _bundle_nodes(pg):
    m = placement_group_table(pg)["bundles_to_node_id"]
    return [m.get(i) for i in range(len(pg.bundle_specs))]


def test_detached_group_and_its_actor_survive_a_broker_restart(tmp_path):
    with restartable_cluster(tmp_path) as c:
        c.start(worker=3)
        total_before = zray.cluster_resources()
        assert total_before["CPU"] == 3
        pg = placement_group([{"CPU": 2}], strategy="STRICT_PACK", name="durable",
                             lifetime="detached")
        assert zray.get(pg.ready(), timeout=60) == pg
        nodes = _bundle_nodes(pg)
        assert nodes[0] is not None
        keeper = Keeper.options(name="pg_keeper", lifetime="detached", num_cpus=1,
                                scheduling_strategy=_in(pg, 0)).remote()
        assert zray.get(keeper.incr.remote(), timeout=60) == 1
        actor_pid = zray.get(keeper.pid.remote(), timeout=60)
        assert zray.available_resources().get("CPU", 0) == 1  # 2 held by the group

        c.restart_broker()
        restarted = time.monotonic()
        # Found by name at once (the broker read it from its state dir).
        assert get_placement_group("durable") == pg
        row = placement_group_table(pg)
        assert row["state"] == "CREATED" and row["is_detached"], row
        assert _bundle_nodes(pg) == nodes
        # Its actor kept its process and state.
        assert zray.get(keeper.incr.remote(), timeout=90) == 2
        assert zray.get(keeper.pid.remote(), timeout=30) == actor_pid
        again = zray.get_actor("pg_keeper")
        assert zray.get(again.incr.remote(), timeout=30) == 3
        # New members run on the bundle's node, in what the group holds.
        assert zray.get(where.options(num_cpus=1, scheduling_strategy=_in(pg, 0))
                        .remote(), timeout=60) == nodes[0]
        assert zray.get(where.options(num_cpus=1, scheduling_strategy=_in(pg))
                        .remote(), timeout=60) == nodes[0]
        poll_until(lambda: zray.available_resources().get("CPU", 0) == 1, 60,
                   what="the group to hold its 2 CPUs again (1 free)")
        assert zray.cluster_resources().get(f"CPU_group_{pg.id.hex()}") == 2
        print(f"the group's bundle was held again and used "
              f"{time.monotonic() - restarted:.1f}s after the new broker listened")

        remove_placement_group(pg)
        assert placement_group_table(pg)["state"] == "REMOVED"
        with pytest.raises(zray.exceptions.ActorDiedError, match="placement group"):
            zray.get(keeper.incr.remote(), timeout=60)
        poll_until(lambda: zray.available_resources().get("CPU", 0) == 3, 60,
                   what="the group's CPUs to come back")
        assert zray.cluster_resources() == total_before
        assert not any("_group_" in k for k in zray.available_resources())
        assert get_placement_group_or_none("durable") is None


def get_placement_group_or_none(name):
    try:
        return get_placement_group(name)
    except ValueError:
        return None


ORPHAN_DRIVER = """
import sys, time
import zray
from zray.util.placement_group import placement_group

zray.init(address=sys.argv[1])
pg = placement_group([{"CPU": 1}], name="orphan_pg")
zray.get(pg.ready(), timeout=60)
print("ready", flush=True)
time.sleep(600)
"""


def test_restart_reschedules_bundles_of_a_lost_node_and_drops_orphaned_groups(tmp_path):
    """Worker A (holding a group's bundle) and another job's driver die while the broker
    is down; a pending group's pg.ready() ref is held by this driver across the restart.
    After the grace period the bundle is placed on worker B, the orphan's group is gone,
    and the pending group is placed (its ready ref resolves) when a node with room joins."""
    with restartable_cluster(tmp_path, env={"ZRAY_RESTART_GRACE_S": "4"}) as c:
        procs, address = c.procs, c.address
        c.start(workerA=2)
        moved = placement_group([{"CPU": 1}], name="moved", lifetime="detached")
        zray.get(moved.ready(), timeout=60)
        [node_a] = _bundle_nodes(moved)
        waiting = placement_group([{"CPU": 1, "big": 1}], name="waiting")
        waiting_ready = waiting.ready()  # no node has "big" yet
        orphan = c.start_driver(ORPHAN_DRIVER, "orphan")
        assert _state_of("orphan_pg") == ["CREATED"]
        assert placement_group_table(waiting)["state"] == "PENDING"

        c.kill_broker()
        c.kill(orphan)
        c.kill("workerA")
        procs.start("workerB", ["worker", "--address", address, "--num-cpus", "2",
                                "--resources", '{"big": 1}'])
        c.start_broker("broker2")

        def placed_elsewhere():
            nodes = _bundle_nodes(moved)
            row = placement_group_table(moved)
            return row["state"] == "CREATED" and nodes[0] not in (None, node_a) and nodes

        [node_b] = poll_until(placed_elsewhere, 90, interval=0.2,
                              what="the lost bundle to be placed on worker B")
        assert zray.get(where.options(scheduling_strategy=_in(moved, 0)).remote(),
                        timeout=60) == node_b
        # The pending group's ready ref, made before the restart, resolves.
        assert zray.get(waiting_ready, timeout=90) == waiting
        assert _bundle_nodes(waiting) == [node_b]
        poll_until(lambda: _state_of("orphan_pg") == ["REMOVED"], 60, interval=0.2,
                   what="the orphan driver's group to be removed")
        remove_placement_group(moved)
        remove_placement_group(waiting)
        poll_until(lambda: zray.available_resources().get("CPU", 0) == 2, 60,
                   what="worker B's CPUs to come back")


def _state_of(name):
    """The states of the groups named ``name`` (in any namespace)."""
    return [row["state"] for row in placement_group_table().values() if row["name"] == name]


def test_group_records_in_the_state_dir_are_checked_when_restored(tmp_path):
    """A broker started on a state dir holding a group record of a node that is not
    there any more places that group again (on the worker that joins); an unreadable
    record is skipped, not fatal."""
    from brokerd.durable import DurableStore
    from zray import _protocol as P

    good, bad = b"g" * 18, b"b" * 18
    store = DurableStore(str(tmp_path / "state"))  # (the cluster's state dir)
    store.put("pgroups", good, {
        "bundles": [{"CPU": P.UNIT}], "strategy": "PACK", "name": "from_disk",
        "namespace": "restored", "lifetime": "detached", "owner": b"o" * P.ID_LEN,
        "job": b"j" * 4, "state": "CREATED", "nodes": [b"n" * P.ID_LEN], "created_at": 1.0})
    store.put("pgroups", bad, {"bundles": "not a list", "strategy": "PACK", "state": "CREATED",
                               "nodes": [], "owner": b"", "job": b""})
    store.close()
    with restartable_cluster(tmp_path) as c:
        procs, address = c.procs, c.address
        c.start_broker()
        procs.start("worker", ["worker", "--address", address, "--num-cpus", "2"])

        def connected():
            procs.check_running()
            try:
                zray.init(address=address, namespace="restored")
                return True
            except ConnectionError:
                return False

        poll_until(connected, 60, interval=0.2, what="the driver to connect to the broker")
        pg = get_placement_group("from_disk")
        assert pg.id.binary() == good
        node = poll_until(lambda: [n["NodeID"] for n in zray.nodes() if n["Alive"]], 60,
                          interval=0.1, what="the worker to join")[0]
        assert zray.get(pg.ready(), timeout=60) == pg
        assert _bundle_nodes(pg) == [node]
        assert placement_group_table(pg)["state"] == "CREATED"
        assert bad.hex() not in placement_group_table()
        assert zray.get(where.options(scheduling_strategy=_in(pg, 0)).remote(),
                        timeout=60) == node
        remove_placement_group(pg)
        poll_until(lambda: zray.available_resources().get("CPU", 0) == 2, 60,
                   what="the worker's CPUs to come back")
        assert "skipping an unreadable placement group record" in (
            tmp_path / "broker.log").read_text(errors="replace")
