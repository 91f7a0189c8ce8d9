"""1:1 sync actor calls from a driver to an actor on another host, direct vs through the broker.

::

    zray broker (tcp, CURVE)  <--  ZRAY_HOST_ID=hostB zray worker --resources {"nodeB": 1}
    driver (ZRAY_HOST_ID=hostD): a = Actor on nodeB; warm up; then for SECONDS:
        ray.get(a.f.remote(i)) one at a time; calls/s = calls / elapsed

Modes (each run a fresh cluster, runs interleaved mode by mode, round by round):

- ``tcp-direct``: the driver and the actor on different "hosts" (``ZRAY_HOST_ID``):
  calls go to the actor executor's tcp listener, CURVE (zray/_xhost.py)
- ``broker``: the same, with ``ZRAY_DIRECT_ACTOR_CALLS=0`` everywhere: every call
  goes driver -> broker -> executor -> broker -> driver, CURVE on every hop
- ``ipc-direct`` (``--ipc``): the same host, for reference: ipc, no CURVE

The summary is the median per mode and its ratio to ``broker``.

    python benchmarks/direct_cross_host.py --rounds 3 --seconds 5
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

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
import json, sys, time
import zray

address, seconds = sys.argv[1], float(sys.argv[2])
zray.init(address=address)

@zray.remote(resources={"nodeB": 0.01})
class A:
    def f(self, i):
        return i

a = A.remote()
for i in range(300):  # warm: the executor, the route (the first calls take the broker path)
    assert zray.get(a.f.remote(i), timeout=60) == i
direct = zray._runtime.client.direct
route = direct.routes.get(a._actor_id) if direct is not None else None
path = route.address.split(":")[0] if route is not None and route.state == "alive" else "broker"
n = 0
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds:
    for _ in range(100):
        zray.get(a.f.remote(n))
        n += 1
dt = time.perf_counter() - t0
print("RESULT " + json.dumps({"calls_s": n / dt, "path": path}), flush=True)
zray.shutdown()
"""


def run_once(mode: str, seconds: float) -> dict:
    extra = {"ZRAY_DIRECT_ACTOR_CALLS": "0"} if mode == "broker" else {}
    with CliCluster(TREE, "zdx-", env=extra, drop=("ZRAY_HOST_ID", "ZRAY_DIRECT_ACTOR_CALLS")) as c:
        env, address, tmp = c.env, c.address, c.tmp
        c.start_broker()
        wenv = dict(env, ZRAY_HOST_ID="hostB") if mode != "ipc-direct" else env
        c.start_worker("--num-cpus", "1", "--resources", json.dumps({"nodeB": 1}), env=wenv)
        script = os.path.join(tmp, "driver.py")
        with open(script, "w") as f:
            f.write(DRIVER)
        denv = dict(env, ZRAY_HOST_ID="hostD") if mode != "ipc-direct" else env
        out = subprocess.run([sys.executable, script, address, str(seconds)], env=denv, cwd=tmp,
                             capture_output=True, text=True, timeout=600)
        got = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not got:
            raise RuntimeError(f"driver failed (rc={out.returncode}):\n{out.stdout[-2000:]}"
                               f"\n{out.stderr[-3000:]}\n--- cluster ---\n{c.log_tail()}")
        return json.loads(got[-1][7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="runs per mode (median reported)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed calls per run")
    ap.add_argument("--ipc", action="store_true", help="also the same-host (ipc) direct path")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the clusters on the way out
    modes = ["broker", "tcp-direct"] + (["ipc-direct"] if args.ipc else [])
    runs: dict = {m: [] for m in modes}
    expected = {"broker": "broker", "tcp-direct": "tcp", "ipc-direct": "ipc"}
    for r in range(args.rounds):
        for m in modes:
            res = run_once(m, args.seconds)
            if res["path"] != expected[m]:
                raise RuntimeError(f"{m}: the calls took the {res['path']} path")
            runs[m].append(res["calls_s"])
            print(f"round {r + 1} {m}: {res['calls_s']:.0f} calls/s", flush=True)
    print(f"\nmedians of {args.rounds} (1:1 sync calls, driver -> actor on node B, CURVE on):")
    base = statistics.median(runs["broker"])
    for m in modes:
        med = statistics.median(runs[m])
        print(f"  {m}: {med:.0f} calls/s ({med / base:.2f}x broker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
