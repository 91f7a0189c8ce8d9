"""Placement groups created and removed per second, zray beside Ray, on this machine.

Two measures, each backend on a fresh local cluster of 4 CPUs (``init(num_cpus=4)``)
in its own process per measure (Ray, after a burst of create/remove, was seen to
keep CPUs reserved and leave a later ready() hanging); the backends take turns,
ROUNDS rounds, medians printed:

* create/remove: ``placement_group([{"CPU": 1}])`` then ``remove_placement_group``,
  CYCLES times per batch (creation returns before the group is placed, in Ray as in
  zray); the batch ends when placement_group_table() shows the last group REMOVED.
* create/ready/remove: the same with ``get(pg.ready())`` in between, READY_CYCLES
  per batch (Ray runs a task in the group to answer ready(), and removing the group
  kills that task's worker process, so Ray starts a process per cycle).

    python benchmarks/pg_create_remove.py [--ray-python /work/rayvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CYCLES, READY_CYCLES, BATCHES, ROUNDS = 500, 20, 3, 3
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(backend: str, measure: str) -> list:
    if backend == "ray":
        import ray
        from ray.util.placement_group import (
            placement_group,
            placement_group_table,
            remove_placement_group,
        )
    else:
        import zray as ray
        from zray.util.placement_group import (
            placement_group,
            placement_group_table,
            remove_placement_group,
        )
    ray.init(num_cpus=4)

    def removed(pg):
        deadline = time.monotonic() + 120
        while placement_group_table(pg)["state"] != "REMOVED":
            if time.monotonic() > deadline:
                raise RuntimeError(f"not removed: {placement_group_table(pg)}")
            time.sleep(0.001)

    try:
        for _ in range(500 if measure == "create_remove" else 3):  # warm up
            pg = placement_group([{"CPU": 1}])
            if measure != "create_remove":
                ray.get(pg.ready(), timeout=120)
            remove_placement_group(pg)
        removed(pg)
        out = []
        for _ in range(BATCHES):
            t0 = time.perf_counter()
            if measure == "create_remove":
                for _ in range(CYCLES):
                    pg = placement_group([{"CPU": 1}])
                    remove_placement_group(pg)
                removed(pg)  # the last removal is done (they are done in order)
                out.append(CYCLES / (time.perf_counter() - t0))
            else:
                for _ in range(READY_CYCLES):
                    pg = placement_group([{"CPU": 1}])
                    ray.get(pg.ready(), timeout=120)
                    remove_placement_group(pg)
                removed(pg)
                out.append(READY_CYCLES / (time.perf_counter() - t0))
        return out
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--ray-python", default="/work/rayvenv/bin/python")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    pythons = {"zray": sys.executable, "ray": args.ray_python}
    rates: dict = {b: {"create_remove": [], "create_ready_remove": []} for b in pythons}
    for _ in range(args.rounds):
        for key in ("create_remove", "create_ready_remove"):  # a fresh cluster for each
            for backend, python in pythons.items():  # interleaved: zray, ray, zray, ...
                out = subprocess.run([python, __file__, "--child", backend, key],
                                     capture_output=True, text=True, timeout=900, cwd=HERE)
                if out.returncode:
                    raise SystemExit(f"{backend} failed:\n{out.stderr[-3000:]}")
                rates[backend][key].extend(json.loads(out.stdout.strip().splitlines()[-1]))
    for key, what in (("create_remove", f"create + remove ({CYCLES} per batch)"),
                      ("create_ready_remove", f"create + get(ready()) + remove "
                                              f"({READY_CYCLES} per batch)")):
        z = statistics.median(rates["zray"][key])
        r = statistics.median(rates["ray"][key])
        print(f"{what}, median of {len(rates['zray'][key])} batches: zray {z:.0f}/s, "
              f"Ray {r:.1f}/s, zray/Ray {z / r:.1f}x")


if __name__ == "__main__":
    main()
