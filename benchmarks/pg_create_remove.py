"""Placement groups created and removed per second, zray beside Ray, on this machine.

One cycle: ``placement_group([{"CPU": 1}])``, ``get(pg.ready())``,
``remove_placement_group(pg)``; each backend runs BATCHES batches of CYCLES cycles
on a local cluster of 4 CPUs (``init(num_cpus=4)``), in its own process; the
backends take turns, ROUNDS rounds, and the medians of all batches are printed.

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

CYCLES, BATCHES, ROUNDS = 300, 3, 3
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(backend: str) -> list:
    if backend == "ray":
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
    else:
        import zray as ray
        from zray.util.placement_group import placement_group, remove_placement_group
    ray.init(num_cpus=4)
    try:
        for _ in range(200):  # warm up (and let the executors the node starts settle)
            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready())
            remove_placement_group(pg)
        rates = []
        for _ in range(BATCHES):
            t0 = time.perf_counter()
            for _ in range(CYCLES):
                pg = placement_group([{"CPU": 1}])
                ray.get(pg.ready())
                remove_placement_group(pg)
            rates.append(CYCLES / (time.perf_counter() - t0))
        return rates
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--ray-python", default="/work/rayvenv/bin/python")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    pythons = {"zray": sys.executable, "ray": args.ray_python}
    rates: dict = {"zray": [], "ray": []}
    for _ in range(args.rounds):
        for backend, python in pythons.items():  # interleaved: zray, ray, zray, ...
            out = subprocess.run([python, __file__, "--child", backend], capture_output=True,
                                 text=True, timeout=600, cwd=HERE)
            if out.returncode:
                raise SystemExit(f"{backend} failed:\n{out.stderr[-3000:]}")
            rates[backend].extend(json.loads(out.stdout.strip().splitlines()[-1]))
    z, r = statistics.median(rates["zray"]), statistics.median(rates["ray"])
    print(f"placement group create + ready + remove cycles per second (median of "
          f"{len(rates['zray'])} batches of {CYCLES}): zray {z:.0f}/s, Ray {r:.0f}/s, "
          f"zray/Ray {z / r:.2f}x")


if __name__ == "__main__":
    main()
