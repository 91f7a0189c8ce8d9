"""Placement groups as a Ray program uses them, on one node: the same script runs on
zray and, with ``ZRAY_TEST_BACKEND=ray``, on Ray (the semantics are Ray's)."""

import os
import textwrap

import pytest

BACKEND = os.environ.get("ZRAY_TEST_BACKEND", "zray")

BODY = """
import time
from ray.util.placement_group import (get_current_placement_group, get_placement_group,
                                      placement_group, placement_group_table,
                                      remove_placement_group)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK", name="pair")
assert ray.get(pg.ready(), timeout=60) == pg
assert pg.wait(10) is True
ready, _ = ray.wait([pg.ready()], timeout=10)
assert len(ready) == 1
row = placement_group_table(pg)
assert row["state"] == "CREATED" and row["strategy"] == "STRICT_PACK", row
assert row["name"] == "pair" and row["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}, row
assert pg.bundle_specs == [{"CPU": 1.0}, {"CPU": 1.0}] and pg.bundle_count == 2
assert get_placement_group("pair") == pg
assert get_current_placement_group() is None
assert ray.available_resources()["CPU"] == 2.0

@ray.remote(num_cpus=1)
class Actor:
    def group(self):
        return get_current_placement_group()

@ray.remote(num_cpus=1)
def group_id():
    return ray.get_runtime_context().get_placement_group_id()

a = Actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote()
assert ray.get(a.group.remote(), timeout=60) == pg
assert ray.get(group_id.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
    pg, 1)).remote(), timeout=60) == pg.id.hex()
try:
    group_id.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 5)).remote()
    raise AssertionError("bundle index 5 of 2 accepted")
except ValueError:
    pass
try:
    group_id.options(num_cpus=2, scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg)).remote()
    raise AssertionError("a task bigger than every bundle accepted")
except ValueError:
    pass
try:
    placement_group([{"CPU": 1}], strategy="NEAR")
    raise AssertionError("a bad strategy accepted")
except ValueError:
    pass

remove_placement_group(pg)
try:
    ray.get(a.group.remote(), timeout=60)
    raise AssertionError("the actor of a removed group still answers")
except ray.exceptions.RayActorError:
    pass
deadline = time.monotonic() + 30
while ray.available_resources().get("CPU") != 4.0:
    assert time.monotonic() < deadline, ray.available_resources()
    time.sleep(0.05)
assert placement_group_table(pg)["state"] == "REMOVED"

pending = placement_group([{"CPU": 8}])
assert pending.wait(1) is False
assert placement_group_table(pending)["state"] == "PENDING"
remove_placement_group(pending)
print("OK")
"""


@pytest.mark.timeout(150)
def test_placement_group_program_runs_as_on_ray(run_driver):
    src = f"import {BACKEND} as ray\nray.init(num_cpus=4)\n" + textwrap.dedent(BODY)
    if BACKEND == "zray":
        src = src.replace("from ray.", "from zray.")
    out = run_driver(src, timeout=140)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "OK" in out.stdout
