"""Idle cost: the broker's CPU while many node agents do nothing but heartbeat.

::

    zray broker (tcp, CURVE)  <--NODE_HELLO, then HEARTBEAT every HEARTBEAT_S--  N fake nodes
                                                                                 (one process)

Real ``zray worker`` processes are too heavy to start 250 of on a small machine,
so this load generator speaks the node side of the protocol itself, through
``zray._protocol`` of the tree under test: one DEALER per node (identity
``N<node id>``, CURVE with the cluster key), a NODE_HELLO with a worker's info
(no CPUs, ``prestart`` 0: the broker starts nothing there), then a HEARTBEAT every
HEARTBEAT_S seconds per node, the nodes' phases spread over the second as real
nodes' are; it drains what the broker sends (WELCOMEs, heartbeat answers) and
answers a WELCOME{rehello} with a new NODE_HELLO, as a node does.

Prints the broker's CPU (user + system, psutil, every thread) over ``--idle``
seconds once every node has joined, as a percentage of one core and in us per node
per second. Several ``--tree``s are run alternately (ABAB...), medians per tree:

    python benchmarks/idle_nodes.py --tree /work/main --tree . --nodes 250 --idle 30 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _procs import CliCluster  # noqa: E402

NODES = r"""
import os, random, sys, time
import zmq
from zray import _protocol as P
from zray._security import secure_client

address, n, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = zmq.Context()
nodes = []
poller = zmq.Poller()
for i in range(n):
    nid = os.urandom(P.ID_LEN)
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, P.node_ident(nid))
    s.setsockopt(zmq.LINGER, 0)
    secure_client(s, address, wait=30)
    s.connect(address)
    poller.register(s, zmq.POLLIN)
    nodes.append((nid, s))
info = {"resources": {"memory": 1e9}, "gpu_ids": [], "hostname": "fake", "pid": os.getpid(),
        "labels": {}, "address": "127.0.0.1", "prestart": 0, "store_limit": 0, "log_dir": ""}
hello = {nid: P.encode(P.NodeHello(P.VERSION, nid, info)) for nid, _ in nodes}
for nid, s in nodes:
    s.send(hello[nid])
beat = P.encode(P.Heartbeat())
# each node beats every HEARTBEAT_S, the phases spread over the interval
due = [time.monotonic() + P.HEARTBEAT_S * random.random() for _ in nodes]
by_sock = {s: nid for nid, s in nodes}
welcomed = set()
printed = False
while not os.path.exists(go):
    now = time.monotonic()
    for i, (nid, s) in enumerate(nodes):
        if now >= due[i]:
            s.send(beat)
            due[i] += P.HEARTBEAT_S
    wait = max(0.0, min(due) - time.monotonic())
    for s, _ in poller.poll(int(wait * 1000) + 1):
        while True:
            try:
                parts = s.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            m = P.decode_from_broker(parts[0])
            if m.TYPE == P.Msg.WELCOME:
                if "rehello" in m.info:
                    s.send(hello[by_sock[s]])
                else:
                    welcomed.add(by_sock[s])
    if not printed and len(welcomed) == n:
        print("JOINED", flush=True)
        printed = True
ctx.destroy(linger=0)
"""


def run_once(tree: str, nodes: int, idle: float, pyspy: str = "") -> dict:
    with CliCluster(tree, "zidle-", log_name="broker.log") as c:
        broker = c.start_broker()
        address, tmp, start = c.address, c.tmp, c.start
        go = os.path.join(tmp, "stop")
        out = os.path.join(tmp, "nodes.out")
        with open(out, "wb") as f:
            gen = start([sys.executable, "-c", NODES, address, str(nodes), go], stdout=f,
                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            with open(out, errors="replace") as f:
                text = f.read()
            if "JOINED" in text:
                break
            if gen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fake nodes did not join: {text[-3000:]}")
            time.sleep(0.1)
        bp = psutil.Process(broker.pid)
        time.sleep(2)  # let the joins settle
        spy = None
        if pyspy:  # sample the broker's threads (py-spy next to this Python)
            spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"),
                                    "record", "--native", "--threads", "--rate", "250",
                                    "--format", "raw", "-o", pyspy, "--pid", str(broker.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c0, w0 = bp.cpu_times(), time.monotonic()
        t0 = {t.id: t.user_time + t.system_time for t in bp.threads()}
        time.sleep(idle)
        c1, wall = bp.cpu_times(), time.monotonic() - w0
        main = sum(t.user_time + t.system_time - t0[t.id] for t in bp.threads()
                   if t.id == broker.pid and t.id in t0)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        if gen.poll() is not None:
            raise RuntimeError("the fake nodes exited early")
        open(go, "w").close()
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        return {"cpu_pct": 100 * cpu / wall, "us_per_node_s": cpu / wall / nodes * 1e6,
                "main_pct": 100 * main / wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", help="source tree to run (repeat to compare); "
                    "default: the one this script is in")
    ap.add_argument("--nodes", type=int, default=250, help="fake node agents")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    ap.add_argument("--rounds", type=int, default=3, help="runs per tree (median reported)")
    ap.add_argument("--pyspy", default="", help="sample the broker with py-spy, writing "
                    "PYSPY-<round>-<tree index>.txt (collapsed stacks)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the clusters on the way out
    trees = args.tree or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    runs: dict = {t: [] for t in trees}
    for r in range(args.rounds):
        for i, t in enumerate(trees):
            res = run_once(t, args.nodes, args.idle,
                           f"{os.path.abspath(args.pyspy)}-{r + 1}-{i}.txt" if args.pyspy else "")
            runs[t].append(res)
            print(f"round {r + 1} {t}: idle broker {res['cpu_pct']:.2f}% CPU, "
                  f"{res['us_per_node_s']:.1f} us CPU per node per second (main thread "
                  f"{res['main_pct']:.2f}%)", flush=True)
    print(f"\nmedians of {args.rounds} ({args.nodes} idle nodes, {args.idle:.0f} s):")
    base = None
    for t in trees:
        pct = statistics.median(x["cpu_pct"] for x in runs[t])
        us = statistics.median(x["us_per_node_s"] for x in runs[t])
        main = statistics.median(x["main_pct"] for x in runs[t])
        base = base or pct
        print(f"  {t}: broker {pct:.2f}% CPU ({pct / base:.2f}x), {us:.1f} us CPU per node "
              f"per second; main thread {main:.2f}%, libzmq/other threads {pct - main:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
