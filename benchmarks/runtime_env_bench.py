"""Runtime environments, zray beside Ray: the first and the repeated task of an environment.

    python benchmarks/runtime_env_bench.py [--trials 3] [--ray-python /work/rayvenv/bin/python]
                                           [--ray-extra-path DIR_WITH_VIRTUALENV]

Cases (task-level runtime_env, on a local cluster of 2 CPUs that each trial starts):

* ``working_dir``: a 10 MB folder (ten 1 MB files of random bytes and a module the
  task imports), given to ``init`` (Ray takes local folders only at the job level):
  ``init`` packs and uploads it, the first task sets it up on the node;
* ``pip``: ``["six==1.16.0"]`` on the task, a small pure-Python package from the
  package index.

For each, the time of ``init`` (with the job's environment), of ``get(task.remote())``
for the first task (set up, run) and for a second one (reuses the set-up
environment). Every trial is a
fresh driver process with a fresh cluster (a fresh node cache), and the systems
alternate trial by trial (zray, Ray, zray, Ray, ...) so that both see the same
machine load; the table gives medians and the ratio Ray/zray (>1: zray faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

DRIVER = r"""
import json, os, sys, time
BACKEND, CASE, FOLDER = sys.argv[1], sys.argv[2], sys.argv[3]
if BACKEND == "ray":
    import ray
    kw = {"include_dashboard": False}
else:
    import zray as ray
    kw = {}
# Ray takes local folders only at the job level (init); pip also per task.
job_env = {"working_dir": FOLDER} if CASE == "working_dir" else None
task_env = {"pip": ["six==1.16.0"]} if CASE == "pip" else None
t = time.perf_counter()
ray.init(num_cpus=2, log_to_driver=False, runtime_env=job_env, **kw)
init_s = time.perf_counter() - t

@ray.remote
def task():
    if CASE == "pip":
        import six
        return six.__version__
    import bigmod
    return bigmod.VALUE

f = task.options(runtime_env=task_env) if task_env else task
t = time.perf_counter()
ray.get(f.remote(), timeout=600)
first = time.perf_counter() - t
t = time.perf_counter()
ray.get(f.remote(), timeout=600)
again = time.perf_counter() - t
print("RESULT " + json.dumps({"init": init_s, "first": first, "again": again}))
ray.shutdown()
"""


def make_folder(root: str) -> str:
    folder = os.path.join(root, "wd10mb")
    os.makedirs(folder, exist_ok=True)
    for i in range(10):
        with open(os.path.join(folder, f"data{i}.bin"), "wb") as f:
            f.write(os.urandom(2**20))
    with open(os.path.join(folder, "bigmod.py"), "w") as f:
        f.write("VALUE = 42\n")
    return folder


def run_one(python: str, backend: str, case: str, folder: str, script: str,
            extra_path: str = "") -> dict:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    env.pop("ZRAY_ADDRESS", None)
    env.pop("RAY_ADDRESS", None)
    env["CASE"] = case
    p = subprocess.run([python, script, backend, case, folder], capture_output=True, text=True,
                       timeout=900, env=env, cwd=os.path.dirname(script))
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{backend} {case} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--ray-python", default="/work/rayvenv/bin/python")
    ap.add_argument("--ray-extra-path", default="",
                    help="put on Ray's PYTHONPATH (Ray's pip runtime_env needs virtualenv, e.g. "
                         "from `pip install --target DIR virtualenv`)")
    ap.add_argument("--cases", default="working_dir,pip")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(tmp)
        script = os.path.join(tmp, "driver.py")
        with open(script, "w") as f:
            f.write(DRIVER)
        results: dict = {}
        for case in args.cases.split(","):
            for trial in range(args.trials):
                for backend, python in (("zray", sys.executable), ("ray", args.ray_python)):
                    r = run_one(python, backend, case, folder, script,
                                args.ray_extra_path if backend == "ray" else "")
                    results.setdefault((case, backend), []).append(r)
                    print(f"{case:12s} {backend:5s} trial {trial}: init {r['init']:.3f}s "
                          f"first {r['first']:.3f}s again {r['again']:.4f}s", flush=True)
    rows = []
    print("\n| case | Ray | zray | Ray/zray |\n|---|---|---|---|")
    for case in args.cases.split(","):
        for which in ("init", "first", "again"):
            z = statistics.median(r[which] for r in results[(case, "zray")])
            r = statistics.median(r[which] for r in results[(case, "ray")])
            label = f"{case}, " + {"init": "init()", "first": "first task",
                                   "again": "repeated task"}[which]
            print(f"| {label} | {r:.3f} s | {z:.3f} s | {r / z:.1f}x |")
            rows.append({"case": label, "ray_s": r, "zray_s": z, "ratio": r / z})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"trials": args.trials, "rows": rows,
                       "raw": {f"{c}/{b}": v for (c, b), v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
