#!/usr/bin/env python3
"""Two zray versions and Ray on the same steady cases, interleaved in one run.

Each round runs every selected case once (one timed trial) for Ray, the
"before" zray and the "after" zray, each in a fresh runner process
(benchmarks/compare_ray.py's ``run_steady``); rounds repeat ``--repeat``
times, so the three are measured side by side under the same load. Reports
medians and the ratios after/Ray, before/Ray and after/before.

    python benchmarks/compare_versions.py --filter actor --repeat 3 \\
        --before-python /work/main/.venv/bin/python --after-python .venv/bin/python
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compare_ray  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before-python", required=True)
    p.add_argument("--before-repo", required=True,
                   help="the checkout the before-python's zray comes from (its runner is used)")
    p.add_argument("--after-python", default=sys.executable)
    p.add_argument("--ray-python", default=compare_ray.DEFAULT_RAY_PYTHON)
    p.add_argument("--filter", default="")
    p.add_argument("--repeat", type=int, default=3)
    ns, rest = p.parse_known_args(argv)
    args = compare_ray.parse_args(rest + ["--repeat", "1"])
    cases = [c for c in compare_ray.select_cases(ns.filter) if c["phase"] == "steady"]
    names = [c["name"] for c in cases]
    here_root = compare_ray.REPO_ROOT
    roots = {"ray": here_root, "before": os.path.abspath(ns.before_repo), "after": here_root}
    who = [("ray", "ray", ns.ray_python), ("before", "zray", ns.before_python),
           ("after", "zray", ns.after_python)]
    values = {w: {n: [] for n in names} for w, _, _ in who}
    for rnd in range(ns.repeat):
        for label, backend, python in who:
            compare_ray.log("[round %d/%d] %s" % (rnd + 1, ns.repeat, label))
            # the runner puts its own checkout first on sys.path: use that version's
            compare_ray.REPO_ROOT = roots[label]
            compare_ray.RUNNER = os.path.join(roots[label], "benchmarks", "_runner.py")
            res = compare_ray.run_steady(python, backend, names, copy.copy(args))
            for n in names:
                values[label][n] += res.get(n, {}).get("values", [])
    print("\n%-40s %10s %10s %10s %9s %9s %9s" % ("case", "ray", "before", "after",
                                                  "before/R", "after/R", "after/bef"))
    for c in cases:
        n = c["name"]
        med = {w: statistics.median(values[w][n]) if values[w][n] else None for w in values}
        higher = c["better"] == "higher"

        def ratio(a, b, med=med, higher=higher):
            if med[a] is None or med[b] is None or not med[b]:
                return "-"
            r = med[a] / med[b] if higher else med[b] / med[a]
            return "%.2fx" % r

        print("%-40s %10s %10s %10s %9s %9s %9s" % (
            n, *("%.0f" % med[w] if med[w] is not None else "err" for w in ("ray", "before", "after")),
            ratio("before", "ray"), ratio("after", "ray"), ratio("after", "before")))
    print("\nmedians of %d rounds (one timed trial of %gs each, fresh processes per round)"
          % (ns.repeat, args.duration))
    return 0


if __name__ == "__main__":
    sys.exit(main())
