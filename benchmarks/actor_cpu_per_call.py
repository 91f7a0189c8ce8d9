#!/usr/bin/env python3
"""Actor calls: calls/s and the CPU they cost (driver + broker + node + executors), for
several zray interpreters, interleaved in one run.

On a loaded machine calls/s swing with the other load; the CPU time a call costs all
zray processes together (utime + stime from /proc, summed over the driver's process
tree) swings far less, so it is the figure to compare there.

    python benchmarks/actor_cpu_per_call.py --python main=/work/main/.venv/bin/python \\
        --python branch=.venv/bin/python --rounds 3

Cases: ``sync`` (get of one call to a plain actor), ``batch`` (1,000 calls in flight
to a plain actor, then get), ``threaded`` (the same to an actor with max_concurrency=16,
compare_ray's 1_1_actor_calls_concurrent), ``async`` (the same to an async actor),
``async_sync`` (one call at a time to an async actor). Each round starts a fresh
process per interpreter (its own local cluster, ``init(num_cpus=2)``); medians over
rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ("sync", "batch", "threaded", "async", "async_sync")


def child(cases: list, seconds: float) -> None:
    import psutil

    import zray as ray

    ray.init(num_cpus=2)

    @ray.remote
    class Actor:
        def small_value(self):
            return b"ok"

    @ray.remote
    class AsyncActor:
        async def small_value(self):
            return b"ok"

    def tree_cpu() -> dict:
        me = psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            out[p.pid] = t.user + t.system
        return out

    results = {}
    for case in cases:
        cls = AsyncActor if case.startswith("async") else Actor
        opts = {"max_concurrency": 16} if case == "threaded" else {}
        a = cls.options(**opts).remote()
        if case in ("sync", "async_sync"):
            def fn(a=a):
                ray.get(a.small_value.remote())
            n = 1
        else:
            def fn(a=a):
                ray.get([a.small_value.remote() for _ in range(1000)])
            n = 1000
        for _ in range(3):  # warm up
            fn()
        calls = 0
        c0, t0 = tree_cpu(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            calls += n
        wall = time.perf_counter() - t0
        c1 = tree_cpu()
        cpu = sum(v - c0.get(pid, 0.0) for pid, v in c1.items())
        results[case] = {"rate": calls / wall, "cpu_us": 1e6 * cpu / calls}
        ray.kill(a)
    ray.shutdown()
    print(json.dumps(results))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", action="append", default=[],
                   help="LABEL=INTERPRETER (repeat); default: this one as 'this'")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per case per round")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    cases = [c for c in ns.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r} (known: {', '.join(CASES)})")
    if ns.child:
        child(cases, ns.seconds)
        return 0
    who = [w.split("=", 1) for w in ns.python] or [["this", sys.executable]]
    values = {label: {c: [] for c in cases} for label, _ in who}
    here = os.path.abspath(__file__)
    for rnd in range(ns.rounds):
        for label, python in who:
            out = subprocess.run([python, here, "--child", "--cases", ",".join(cases),
                                  "--seconds", str(ns.seconds)], capture_output=True,
                                 text=True, timeout=120 + 20 * len(cases) * ns.seconds)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode or not lines:
                print(f"[round {rnd + 1}] {label}: failed\n{out.stderr[-2000:]}",
                      file=sys.stderr)
                continue
            res = json.loads(lines[-1])
            for c in cases:
                values[label][c].append(res[c])
            print(f"[round {rnd + 1}] {label}: " + ", ".join(
                f"{c} {res[c]['rate']:.0f}/s {res[c]['cpu_us']:.0f}us" for c in cases),
                file=sys.stderr)
    first = who[0][0]
    print(f"\n{'case':12s}" + "".join(f" {label + ' /s':>14s} {label + ' us':>10s}"
                                      for label, _ in who) + "   cpu vs " + first)
    for c in cases:
        row = f"{c:12s}"
        base = None
        ratios = []
        for label, _ in who:
            v = values[label][c]
            if not v:
                row += f" {'-':>14s} {'-':>10s}"
                continue
            rate = statistics.median(x["rate"] for x in v)
            cpu = statistics.median(x["cpu_us"] for x in v)
            row += f" {rate:14.0f} {cpu:10.1f}"
            if base is None:
                base = cpu
            else:
                ratios.append(f"{label} {cpu / base:.2f}x")
        print(row + "   " + ", ".join(ratios))
    print(f"\nmedians of {ns.rounds} rounds; us = CPU of all zray processes per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
