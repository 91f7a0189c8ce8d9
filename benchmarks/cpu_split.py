"""Where a tiny task's CPU goes: per-process CPU µs per task of N no-op tasks.

``zray.init(num_cpus=2)``, N tiny tasks (``return 1``) in batches of BATCH, then
each process of the cluster (driver, broker, node agent, executors) is charged
its user+system CPU (psutil) over the timed run, per task of the run. The
executors are summed: with the tasks split between them, that sum is also what
one executor spends per task it runs itself.

One run of one interpreter (``--child``) prints one JSON line. Without
``--child`` it runs every ``--python`` given, interleaved (a, b, a, b, ...),
``--repeat`` times each, and reports medians side by side and the ratios of the
later interpreters' medians to the first one's::

    python benchmarks/cpu_split.py --python /work/main/.venv/bin/python \\
        --python .venv/bin/python --repeat 3
    python benchmarks/cpu_split.py --python .venv/bin/python::ZRAY_EXEC_WINDOW=1 \\
        --python .venv/bin/python   # one interpreter, two settings

The interpreters import whatever zray they have installed (the children run in
/tmp, so a checkout in the working directory is never picked up by accident).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

N, BATCH = 20_000, 1_000


def _role(p) -> str:
    cmd = " ".join(p.cmdline())
    if "brokerd" in cmd:
        return "broker"
    if "workerd.executor" in cmd or "executor" in cmd:
        return "executor"
    if "workerd" in cmd:
        return "node"
    return p.name()


def child(n: int, batch: int) -> dict:
    import psutil

    import zray as ray

    ray.init(num_cpus=2)
    try:
        @ray.remote
        def f():
            return 1

        ray.get([f.remote() for _ in range(2000)])  # warm: processes, function
        me = psutil.Process()
        procs = [me] + me.children(recursive=True)

        def cpu() -> dict:
            out = {}
            for p in procs:
                try:
                    t = p.cpu_times()
                    out[p.pid] = ("driver" if p is me else _role(p), t.user + t.system)
                except psutil.Error:
                    pass
            return out

        a = cpu()
        t0 = time.perf_counter()
        for _ in range(n // batch):
            ray.get([f.remote() for _ in range(batch)])
        dt = time.perf_counter() - t0
        b = cpu()
        per: dict = {}
        busy_execs = 0
        for pid, (role, t) in b.items():
            if pid not in a:
                continue
            d = t - a[pid][1]
            per[role] = per.get(role, 0.0) + d / n * 1e6
            if role == "executor" and d > 0.05:
                busy_execs += 1
        out = {"python": sys.executable, "zray": ray.__file__, "tasks_per_s": n / dt}
        out.update({f"{k}_us": v for k, v in per.items()})
        out["busy_executors"] = busy_execs
        return out
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", action="append",
                    help="interpreter (repeatable); PATH::VAR=VALUE,... sets its environment")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("-n", type=int, default=N)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.batch)), flush=True)
        return 0
    pythons = args.python or [sys.executable]
    runs: dict = {p: [] for p in pythons}
    for r in range(args.repeat):
        for py in pythons:
            exe, _, env_text = py.partition("::")
            env = dict(os.environ)
            env.update(kv.split("=", 1) for kv in env_text.split(",") if kv)
            cmd = [exe, os.path.abspath(__file__), "--child", "-n", str(args.n),
                   "--batch", str(args.batch)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", timeout=600,
                                 env=env)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            row = json.loads(res.stdout.strip().splitlines()[-1])
            runs[py].append(row)
            print(f"round {r + 1} {row['zray']} {env_text}: {row['tasks_per_s']:.0f} tasks/s",
                  flush=True)
    keys = ["tasks_per_s", "driver_us", "broker_us", "node_us", "executor_us"]
    med = {py: {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
           for py, rows in runs.items()}
    for i, py in enumerate(pythons):
        print(f"[{i}] {py}")
    print(f"median of {args.repeat:<4d}" + "".join(f"{k:>14s}" for k in keys))
    base = med[pythons[0]]
    for i, py in enumerate(pythons):
        print(f"[{i}]{'':10s}" + "".join(f"{med[py][k]:14.1f}" for k in keys))
        if i:
            print(f"[{i}]/[0]{'':8s}" + "".join(
                f"{med[py][k] / base[k] if base[k] else 0:14.2f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
