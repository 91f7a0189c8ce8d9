"""Does an open dashboard slow the broker? No-op task throughput with the dashboard
idle, with one page refreshing as a browser does, and with clients hammering it.

    python benchmarks/dashboard_load.py [--rounds 5] [--tasks 2000]

Starts ``zray broker``, one ``zray worker --num-cpus 2`` and ``zray dashboard`` on
loopback, connects a driver, and fills the event log first (the dashboard's task
view walks its newest entries). Then, in each round, the three modes run one
after another in a rotating order (interleaved, so drift hits all alike):

* ``idle``:    nobody asks the dashboard anything;
* ``page``:    one "browser" fetches every route a page uses once a second
               (the page refreshes every 2 s: this is twice that);
* ``hammer``:  4 threads fetch those routes back to back, as fast as they answer.

Each mode's rate is ``--tasks`` no-op tasks submitted at once and waited for.
Prints each mode's median and its ratio to ``idle``, and the broker's and the
dashboard's CPU time per 1000 tasks (psutil): the broker's tells whether the
dashboard's queries load its loop; the dashboard's is what it takes from the
machine's cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROUTES = ("/api/cluster", "/api/nodes", "/api/tasks?limit=500", "/api/actors",
          "/api/objects?top=100", "/metrics")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zray() -> list:
    exe = shutil.which("zray") or os.path.join(os.path.dirname(sys.executable), "zray")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "zray.cli"]


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


class Poller:
    def __init__(self, url: str, token: str, threads: int, period: float):
        self.url, self.threads, self.period = url, threads, period
        self.headers = {"Authorization": f"Bearer {token}"}
        self.stop = threading.Event()
        self.requests = 0
        self.workers = []

    def _run(self):
        while not self.stop.is_set():
            t0 = time.monotonic()
            for r in ROUTES:
                req = urllib.request.Request(self.url + r, headers=self.headers)
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
                self.requests += 1
            if self.period:
                self.stop.wait(max(0.0, self.period - (time.monotonic() - t0)))

    def __enter__(self):
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self.workers.append(t)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.workers:
            t.join(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=2000)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="zray-dashload-")
    env = dict(os.environ, ZRAY_TMPDIR=os.path.join(tmp, "t"))
    env.pop("ZRAY_ADDRESS", None)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []

    def start(name, args):
        log = open(os.path.join(tmp, name + ".log"), "wb")
        procs.append(subprocess.Popen(_zray() + args, stdout=log, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True))

    try:
        start("broker", ["broker", "--port", str(port)])
        start("worker", ["worker", "--address", address, "--num-cpus", "2"])
        start("dashboard", ["dashboard", "--address", address, "--port", "0"])

        def url():
            m = re.search(r"dashboard at (http://\S+)",
                          open(os.path.join(tmp, "dashboard.log")).read())
            return m and m.group(1)

        dash = _wait(url, 60, "the dashboard")
        import zray

        _wait(lambda: _try_init(zray, address), 60, "the broker")
        _wait(lambda: zray.nodes(), 60, "the worker")

        @zray.remote
        def noop():
            return None

        def rate():
            t0 = time.perf_counter()
            zray.get([noop.remote() for _ in range(a.tasks)])
            return a.tasks / (time.perf_counter() - t0)

        for _ in range(max(1, 60000 // a.tasks)):  # fill the event log (and warm up)
            rate()
        token = re.search(r"\?token=(\S+)",
                          open(os.path.join(tmp, "dashboard.log")).read()).group(1)
        modes = {"idle": lambda: Poller(dash, token, 0, 0),
                 "page": lambda: Poller(dash, token, 1, 1.0),
                 "hammer": lambda: Poller(dash, token, 4, 0)}
        import psutil

        broker, dashboard = psutil.Process(procs[0].pid), psutil.Process(procs[2].pid)

        def cpu(proc):
            t = proc.cpu_times()
            return t.user + t.system

        results = {m: [] for m in modes}
        served = {m: 0 for m in modes}
        cpu_ms = {m: ([], []) for m in modes}  # (broker, dashboard) CPU ms per 1000 tasks
        order = list(modes)
        for r in range(a.rounds):
            for m in order[r % 3:] + order[:r % 3]:
                with modes[m]() as p:
                    time.sleep(0.3 if m != "idle" else 0)  # let the pollers start
                    b0, d0 = cpu(broker), cpu(dashboard)
                    results[m].append(rate())
                    cpu_ms[m][0].append((cpu(broker) - b0) * 1e6 / a.tasks)
                    cpu_ms[m][1].append((cpu(dashboard) - d0) * 1e6 / a.tasks)
                served[m] += p.requests
        base = statistics.median(results["idle"])
        print(f"{a.tasks} no-op tasks per measurement, {a.rounds} interleaved rounds, "
              f"{os.cpu_count()} CPU(s)")
        for m in modes:
            med = statistics.median(results[m])
            print(f"  {m:7s} median {med:8.0f} tasks/s  ratio {med / base:5.2f}  "
                  f"CPU ms per 1000 tasks: broker {statistics.median(cpu_ms[m][0]):6.0f}, "
                  f"dashboard {statistics.median(cpu_ms[m][1]):6.0f}  "
                  f"(dashboard requests served: {served[m]}; runs: "
                  + ", ".join(f"{x:.0f}" for x in results[m]) + ")")
        zray.shutdown()
        return 0
    except BaseException:
        for name in ("broker", "worker", "dashboard"):
            try:
                text = open(os.path.join(tmp, name + ".log"), errors="replace").read()
            except OSError:
                continue
            print(f"--- {name} log (tail) ---\n{text[-3000:]}", file=sys.stderr)
        raise
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def _try_init(zray, address):
    try:
        zray.init(address=address)
        return True
    except ConnectionError:
        return False


if __name__ == "__main__":
    sys.exit(main())
