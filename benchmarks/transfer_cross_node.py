"""Cross-node transfer: a 200 MB array made on node A, consumed by a task on node B.

::

    zray broker (tcp, CURVE)  <--  `zray worker --num-cpus 1 --resources {"nodeA": 1}`
                              <--  `zray worker --num-cpus 1 --resources {"nodeB": 1}`
    driver: ref = make.remote(kind) on A; wait(ref)
            t0; get(consume.remote(ref)) on B (returns x.nbytes); MB/s = size / (now - t0)

Two arrays per run: *compressible* (``np.arange`` of int64: lz4 pays) and
*incompressible* (random int64). The time includes one tiny task on B (a few
ms); a warm-up task runs there first so no executor starts inside the window.
Besides MB/s it reports the broker process's CPU seconds over the transfer
(all its threads, ``/proc/<pid>/stat``): whether the bulk went through it.

Give several source trees with ``--tree`` to compare them side by side: runs
alternate between the trees (ABAB...), and the summary is the median per tree
and the ratio to the first tree.

    python benchmarks/transfer_cross_node.py --tree /work/main --tree . --rounds 3

Each run starts a fresh cluster from that tree (``PYTHONPATH=<tree>``) with a
key file of its own in a temporary dir, and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _procs import CliCluster  # noqa: E402

DRIVER = r"""
import json, os, sys, time
import numpy as np
import zray

address, mb, bpid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def cpu():  # the broker process's CPU seconds (all its threads)
    with open(f"/proc/{bpid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

zray.init(address=address)

@zray.remote(resources={"nodeA": 0.01})
def make(kind, n):
    if kind == "compressible":
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(7).integers(0, 2**62, n, dtype=np.int64)

@zray.remote(resources={"nodeB": 0.01})
def consume(x):
    return x.nbytes

zray.get(consume.remote(np.zeros(1)))  # warm: an executor on B, the function registered
out = {}
for kind in ("compressible", "incompressible"):
    ref = make.remote(kind, mb * 2**20 // 8)
    zray.wait([ref], timeout=600)
    c0 = cpu()
    t0 = time.perf_counter()
    nbytes = zray.get(consume.remote(ref), timeout=600)
    dt = time.perf_counter() - t0
    out[kind] = {"mb_s": nbytes / 1e6 / dt, "broker_cpu_s": cpu() - c0}
    del ref
print("RESULT " + json.dumps(out), flush=True)
zray.shutdown()
"""


def run_once(tree: str, mb: int) -> dict:
    with CliCluster(tree, "zxn-") as c:
        broker = c.start_broker()
        for node in ("nodeA", "nodeB"):
            c.start_worker("--num-cpus", "1", "--resources", json.dumps({node: 1}))
        env, address, tmp = c.env, c.address, c.tmp
        script = os.path.join(tmp, "driver.py")
        with open(script, "w") as f:
            f.write(DRIVER)
        out = subprocess.run([sys.executable, script, address, str(mb), str(broker.pid)], env=env,
                             cwd=tmp, capture_output=True, text=True, timeout=900)
        got = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not got:
            raise RuntimeError(f"driver failed (rc={out.returncode}):\n{out.stdout[-2000:]}"
                               f"\n{out.stderr[-3000:]}\n--- cluster ---\n{c.log_tail()}")
        return json.loads(got[-1][7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", help="source tree to run (repeat to compare); "
                    "default: the one this script is in")
    ap.add_argument("--mb", type=int, default=200, help="array size in MiB")
    ap.add_argument("--rounds", type=int, default=3, help="runs per tree (median reported)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the clusters on the way out
    trees = args.tree or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    kinds = ("compressible", "incompressible")
    runs: dict = {t: [] for t in trees}
    for r in range(args.rounds):
        for t in trees:
            for attempt in range(3):  # a loaded machine can fail a run; say so, run it again
                try:
                    res = run_once(t, args.mb)
                    break
                except RuntimeError as e:
                    if attempt == 2:
                        raise
                    why = [x for x in str(e).splitlines() if x.strip()][1:2]
                    print(f"round {r + 1} {t}: run failed ({why}), running it again", flush=True)
            runs[t].append(res)
            print(f"round {r + 1} {t}: " + ", ".join(
                f"{k} {res[k]['mb_s']:.0f} MB/s (broker CPU {res[k]['broker_cpu_s']:.2f} s)"
                for k in kinds), flush=True)
    print(f"\nmedians of {args.rounds} ({args.mb} MiB arrays, node A -> node B, CURVE on):")
    base = None
    for t in trees:
        med = {k: statistics.median(x[k]["mb_s"] for x in runs[t]) for k in kinds}
        bcpu = {k: statistics.median(x[k]["broker_cpu_s"] for x in runs[t]) for k in kinds}
        if base is None:
            base = med
        print(f"  {t}: " + ", ".join(
            f"{k} {med[k]:.0f} MB/s ({med[k] / base[k]:.2f}x, broker CPU {bcpu[k]:.2f} s)"
            for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
