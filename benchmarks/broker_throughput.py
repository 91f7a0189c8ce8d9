"""Broker throughput: tiny tasks from many clients onto many one-CPU worker daemons.

::

    zray broker (tcp, CURVE)  <--  M x `zray worker --num-cpus 1`
             ^
             +---- N client processes, each submitting TASKS tiny tasks in batches

Prints, per run, the tasks per second (all clients' tasks over the wall time
from the first client's start signal to the last client's last result) and the
broker process's CPU (user + system, per thread from ``/proc``) per task over
that window: in all, on its main thread, on libzmq's I/O thread(s) (``ZMQbg/IO``)
and on the rest (CURVE's ZAP thread, the gc clock, libzmq's reaper); and the
tasks per second the broker would pass on one core of its own at that CPU per
task (``1e6 / us per task``: the issue's aim is 20,000, i.e. 50 us a task).

Give several source trees with ``--tree`` to compare them side by side: the
runs alternate between the trees in ABBA order (AB, BA, AB, ...), so the
machine's load and any drift over the run hit each alike, and the summary is
the median per tree and the ratio to the first tree. The load average at each
run's start is printed with it.

    python benchmarks/broker_throughput.py --tree /work/main --tree . --rounds 3
    python benchmarks/broker_throughput.py --tree /work/main --tree . --idle 20 --workers 40

Each run starts a fresh cluster from that tree (``PYTHONPATH=<tree>``) in a
temporary dir of its own and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _procs import CliCluster  # noqa: E402

CLIENT = r"""
import json, os, sys, time
import zray

address, n, batch, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
zray.init(address=address)

@zray.remote
def tiny(i):
    return i

zray.get([tiny.remote(i) for i in range(50)])  # warm: function registered, executors up
print("READY", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
t0 = time.time()
done = 0
while done < n:
    k = min(batch, n - done)
    out = zray.get([tiny.remote(i) for i in range(k)])
    assert out == list(range(k))
    done += k
print("RESULT " + json.dumps({"start": t0, "end": time.time(), "tasks": n}), flush=True)
zray.shutdown()
"""


def _alive_nodes(env, address) -> int:
    code = ("import zray,sys; zray.init(address=sys.argv[1]); "
            "print(sum(n['Alive'] for n in zray.nodes())); zray.shutdown()")
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, cwd="/",
                         text=True, timeout=60)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def _gc_ms(env, address) -> tuple:
    """(collections, milliseconds) per generation the broker spent in its garbage
    collector so far; ([], []) if it does not report them."""
    code = ("import json,zray,sys; zray.init(address=sys.argv[1]); from zray import _runtime; "
            "s = _runtime.client.request('status'); "
            "print(json.dumps([s.get('gc_collections', []), s.get('gc_ms', [])])); zray.shutdown()")
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, cwd="/",
                         text=True, timeout=60)
    try:
        return tuple(json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return [], []


def _thread_cpu(pid: int) -> dict:
    """{thread id: (name, user + system seconds)} of process ``pid``'s threads, from
    ``/proc`` (libzmq names its I/O threads ``ZMQbg/IO/<n>``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # (the thread ended)
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _split(pid: int, before: dict, after: dict) -> dict:
    """CPU seconds between two ``_thread_cpu`` readings: main thread, libzmq's I/O
    threads, the others (a thread started in between counts from zero)."""
    out = {"main": 0.0, "zmq_io": 0.0, "other": 0.0}
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        key = "main" if tid == pid else "zmq_io" if name.startswith("ZMQbg/IO") else "other"
        out[key] += used
    return out


def run_once(tree: str, workers: int, clients: int, tasks: int, batch: int,
             profile: str = "", idle: float = 0.0, pyspy: str = "") -> dict:
    cluster = CliCluster(tree, "zbt-")
    env, address, tmp, procs, start = (cluster.env, cluster.address, cluster.tmp, cluster.procs,
                                       cluster.start)
    try:
        broker = cluster.start_broker([sys.executable, "-m", "cProfile", "-o", profile]
                                      if profile else None)
        for _ in range(workers):
            cluster.start_worker("--num-cpus", "1", *(["--prestart", "0"] if idle else []))
        deadline = time.monotonic() + 120
        while _alive_nodes(env, address) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} workers did not join: {cluster.log_tail()}")
            time.sleep(0.2)
        if idle:  # an idle cluster: the broker's CPU for heartbeats and liveness checks
            bp = psutil.Process(broker.pid)
            time.sleep(2)  # let the joins settle
            c0, w0 = bp.cpu_times(), time.monotonic()
            time.sleep(idle)
            c1, wall = bp.cpu_times(), time.monotonic() - w0
            cpu = (c1.user - c0.user) + (c1.system - c0.system)
            return {"cpu_pct": 100 * cpu / wall, "us_per_node_s": cpu / wall / workers * 1e6}
        go = os.path.join(tmp, "go")
        script = os.path.join(tmp, "client.py")
        with open(script, "w") as f:
            f.write(CLIENT)
        outs = [os.path.join(tmp, f"client{i}.out") for i in range(clients)]
        cs = []
        for path in outs:
            with open(path, "wb") as f:
                cs.append(start([sys.executable, script, address, str(tasks), str(batch), go],
                                stdout=f, stderr=subprocess.STDOUT))

        def lines(path, word):
            with open(path, errors="replace") as f:
                return [x for x in f.read().splitlines() if x.startswith(word)]

        deadline = time.monotonic() + 120
        while not all(lines(p, "READY") for p in outs):  # each prints READY once warm
            failed = [p for c, p in zip(cs, outs, strict=True) if c.poll() is not None]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(f"client not ready: {open((failed or outs)[0]).read()[-3000:]}")
            time.sleep(0.05)
        bp = psutil.Process(broker.pid)
        spies = []
        if pyspy:  # sample the broker, one client and one executor while the clients run
            execs = psutil.Process(procs[1].pid).children(recursive=True)
            for name, pid in [("broker", broker.pid), ("client", cs[0].pid)] + (
                    [("executor", execs[0].pid)] if execs else []):
                spies.append(subprocess.Popen(
                    [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--native",
                     "--threads", "--rate", "250", "--format", "raw",
                     "-o", f"{pyspy}-{name}.txt", "--pid", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)  # (py-spy attaches)
        gc0 = _gc_ms(env, address)
        c0, t0 = bp.cpu_times(), _thread_cpu(broker.pid)
        open(go, "w").close()
        results = []
        for c, path in zip(cs, outs, strict=True):
            try:
                c.wait(timeout=600)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"client hung: {open(path).read()[-3000:]}") from None
            got = lines(path, "RESULT ")
            if c.returncode != 0 or not got:
                raise RuntimeError(f"client failed (rc={c.returncode}): {open(path).read()[-3000:]}")
            results.append(json.loads(got[-1][7:]))
        c1, t1 = bp.cpu_times(), _thread_cpu(broker.pid)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        split = _split(broker.pid, t0, t1)
        total = sum(r["tasks"] for r in results)
        gc1 = _gc_ms(env, address)
        gc_us, gc_runs = -1.0, []
        if gc0[1] and gc1[1]:
            gc_us = (sum(gc1[1]) - sum(gc0[1])) * 1000 / total
            gc_runs = [f"gen{g}: {b - a} in {mb - ma:.0f} ms" for g, (a, b, ma, mb) in
                       enumerate(zip(gc0[0], gc1[0], gc0[1], gc1[1], strict=True))]
        wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        return {"tasks_per_s": total / wall, "broker_us_per_task": cpu / total * 1e6,
                "main_us_per_task": split["main"] / total * 1e6,
                "zmq_us_per_task": split["zmq_io"] / total * 1e6,
                "other_us_per_task": split["other"] / total * 1e6, "gc_us_per_task": gc_us,
                "gc_runs": gc_runs,
                "tasks": total, "wall_s": wall}
    finally:
        cluster.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", help="source tree to run (repeat to compare); "
                    "default: the one this script is in")
    ap.add_argument("--workers", type=int, default=4, help="`zray worker --num-cpus 1` daemons")
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--tasks", type=int, default=5000, help="tasks per client")
    ap.add_argument("--batch", type=int, default=500, help="tasks in flight per client")
    ap.add_argument("--rounds", type=int, default=3, help="runs per tree (median reported)")
    ap.add_argument("--idle", type=float, default=0.0, help="instead: measure the broker's "
                    "CPU over this many seconds of an idle cluster (workers --prestart 0)")
    ap.add_argument("--profile", default="", help="run the broker under cProfile, writing "
                    "PROFILE-<round>-<tree index> (CPU figures then include the profiler)")
    ap.add_argument("--pyspy", default="", help="sample the broker, a client and an executor "
                    "with py-spy (--native) while the clients run, writing PYSPY-<name>.txt "
                    "(collapsed stacks; py-spy must be installed next to this Python)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the clusters on the way out
    trees = args.tree or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    runs: dict = {t: [] for t in trees}
    for r in range(args.rounds):
        for t in (trees if r % 2 == 0 else trees[::-1]):  # ABBA: AB, BA, AB, ...
            i = trees.index(t)
            load = os.getloadavg()[0]
            prof = f"{os.path.abspath(args.profile)}-{r + 1}-{i}" if args.profile else ""
            res = run_once(t, args.workers, args.clients, args.tasks, args.batch, prof, args.idle,
                           f"{os.path.abspath(args.pyspy)}-{r + 1}-{i}" if args.pyspy else "")
            runs[t].append(res)
            if args.idle:
                print(f"round {r + 1} {t}: idle broker {res['cpu_pct']:.2f}% CPU, "
                      f"{res['us_per_node_s']:.0f} us CPU per node per second", flush=True)
                continue
            print(f"round {r + 1} {t} (load {load:.1f}): {res['tasks_per_s']:.0f} tasks/s, "
                  f"broker {res['broker_us_per_task']:.1f} us CPU/task "
                  f"(main thread {res['main_us_per_task']:.1f}, libzmq I/O "
                  f"{res['zmq_us_per_task']:.1f}, other threads {res['other_us_per_task']:.1f}; "
                  f"{1e6 / res['broker_us_per_task']:.0f} tasks/s at one core; "
                  f"gc {res['gc_us_per_task']:.1f}: {', '.join(res['gc_runs'])})",
                  flush=True)
    if args.idle:
        print(f"\nmedians of {args.rounds} ({args.workers} idle workers, {args.idle:.0f} s):")
        for t in trees:
            pct = statistics.median(x["cpu_pct"] for x in runs[t])
            us = statistics.median(x["us_per_node_s"] for x in runs[t])
            print(f"  {t}: broker {pct:.2f}% CPU, {us:.0f} us CPU per node per second")
        return 0
    base = None
    print(f"\nmedians of {args.rounds} ({args.workers} workers x 1 CPU, {args.clients} clients x "
          f"{args.tasks} tasks in batches of {args.batch}):")
    for t in trees:
        tps = statistics.median(x["tasks_per_s"] for x in runs[t])
        us = statistics.median(x["broker_us_per_task"] for x in runs[t])
        main_us = statistics.median(x["main_us_per_task"] for x in runs[t])
        zmq_us = statistics.median(x["zmq_us_per_task"] for x in runs[t])
        other_us = statistics.median(x["other_us_per_task"] for x in runs[t])
        gc_us = statistics.median(x["gc_us_per_task"] for x in runs[t])
        if base is None:
            base = (tps, us, main_us)
        print(f"  {t}: {tps:.0f} tasks/s ({tps / base[0]:.2f}x), broker {us:.1f} us CPU/task "
              f"({us / base[1]:.2f}x): main thread {main_us:.1f} us ({main_us / base[2]:.2f}x), "
              f"libzmq I/O thread {zmq_us:.1f} us, other threads {other_us:.1f} us"
              + (f"; in the garbage collector {gc_us:.1f} us" if gc_us >= 0 else "")
              + f"\n    = {1e6 / us:.0f} tasks/s through a broker on one core of its own "
              f"(main thread alone: {1e6 / main_us:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
