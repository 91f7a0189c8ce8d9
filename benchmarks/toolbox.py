#!/usr/bin/env python3
"""The ``ray.util`` toolbox and the DAG API, zray against Ray, side by side.

Each round runs one fresh process per backend, alternating (zray, ray, zray, ray,
...), so that both see the same machine load; each process starts a 2-CPU local
cluster, warms every case up once, then times it once. The table gives the median
rate over the rounds and the ratio zray/Ray (> 1: zray is faster).

    python benchmarks/toolbox.py                         # 3 rounds
    python benchmarks/toolbox.py --rounds 5 --ray-python /work/rayvenv/bin/python

Cases:
  queue_put_get     items/s: 300 put_nowait then 300 get_nowait on a Queue
  queue_blocking    items/s: a task puts 300 items, the driver gets them (blocking)
  actor_pool_map    items/s: ActorPool of 2 actors, map over 300 values
  mp_pool_map       items/s: multiprocessing Pool(2).map over 5,000 values (chunked)
  mp_pool_imap      items/s: Pool(2).imap over 300 values (chunksize 1)
  dag_execute       executions/s: a 2-task chain with an InputNode, execute + get, 100x
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ["queue_put_get", "queue_blocking", "actor_pool_map", "mp_pool_map", "mp_pool_imap",
         "dag_execute"]


def _square(x):
    return x * x


def _child(backend: str) -> None:
    import importlib

    ray = importlib.import_module(backend)
    util = importlib.import_module(backend + ".util")
    rq = importlib.import_module(backend + ".util.queue")
    mp = importlib.import_module(backend + ".util.multiprocessing")
    dag = importlib.import_module(backend + ".dag")
    if backend == "ray":
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=2)

    @ray.remote
    class Doubler:
        def double(self, v):
            return 2 * v

    @ray.remote
    def produce(q, n):
        for i in range(n):
            q.put(i)

    @ray.remote
    def inc(x):
        return x + 1

    q = rq.Queue()
    actors = [Doubler.remote() for _ in range(2)]
    pool = mp.Pool(processes=2)
    with dag.InputNode() as inp:
        chain = inc.bind(inc.bind(inp))

    def queue_put_get():
        for i in range(300):
            q.put_nowait(i)
        for _ in range(300):
            q.get_nowait()
        return 300

    def queue_blocking():
        ref = produce.remote(q, 300)
        for _ in range(300):
            q.get(timeout=60)
        ray.get(ref)
        return 300

    def actor_pool_map():
        ap = util.ActorPool(actors)
        return len(list(ap.map(lambda a, v: a.double.remote(v), range(300))))

    def mp_pool_map():
        return len(pool.map(_square, range(5000)))

    def mp_pool_imap():
        return len(list(pool.imap(_square, range(300))))

    def dag_execute():
        for i in range(100):
            ray.get(chain.execute(i))
        return 100

    out = {}
    for name in CASES:
        fn = locals()[name]
        fn()  # warm-up
        t0 = time.perf_counter()
        n = fn()
        out[name] = n / (time.perf_counter() - t0)
    pool.terminate()
    ray.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ray-python", default="/work/rayvenv/bin/python")
    ap.add_argument("--json", help="write the per-round results here")
    args = ap.parse_args()
    here = os.path.abspath(__file__)
    runs: dict = {"zray": [], "ray": []}
    for r in range(args.rounds):
        for backend, python in (("zray", sys.executable), ("ray", args.ray_python)):
            proc = subprocess.run([python, here, "--child", backend], capture_output=True,
                                  text=True, timeout=600)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{backend} round {r} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[backend].append(json.loads(line[0][7:]))
    print(f"{'case':<16} {'Ray':>10} {'zray':>10} {'ratio':>7}   (medians of "
          f"{len(runs['ray'])} / {len(runs['zray'])} interleaved rounds, per second)")
    for case in CASES:
        med = {b: statistics.median(x[case] for x in runs[b]) if runs[b] else float("nan")
               for b in runs}
        print(f"{case:<16} {med['ray']:>10.0f} {med['zray']:>10.0f} "
              f"{med['zray'] / med['ray']:>6.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        main()
