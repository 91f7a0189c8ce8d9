"""Which process should listen for direct calls from other hosts: the actor's executor, or
its node agent forwarding to the executor over ipc? The transport cost of each, alone.

::

    executor:  ROUTER on ipc:// and on tcp:// (CURVE server): echoes each message
    agent:     ROUTER on tcp:// (CURVE server) <-- zmq_proxy (libzmq's, in C) --> DEALER
               to the executor's ipc://
    client:    DEALER, CURVE client; N sync round trips of a 200-byte message
      executor: client --tcp, CURVE--> executor --> client
      agent:    client --tcp, CURVE--> agent --ipc--> executor --> agent --> client

Three processes, as on a node (the agent is a process of its own). libzmq's own
proxy is the cheapest forwarding an agent could do (a Python agent loop costs
more), so the ``agent`` figure is an upper bound for that design. Runs
alternate (executor, agent, executor, ...); medians of ``--rounds``.

    python benchmarks/direct_hop_cost.py --rounds 3 --calls 20000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import zmq


def _curve_server(sock, keys):
    sock.curve_server = True
    sock.curve_secretkey = keys["ssec"]
    sock.curve_publickey = keys["spub"]


def _keys():
    return {k: os.environ[f"HOP_{k.upper()}"].encode() for k in ("spub", "ssec", "cpub", "csec")}


def executor(ipc: str, port_file: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(ipc)  # (NULL mechanism: bound before the CURVE options)
    _curve_server(s, _keys())
    port = s.bind_to_random_port("tcp://127.0.0.1")
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(port_file + ".tmp", port_file)
    while True:
        s.send_multipart(s.recv_multipart(copy=False), copy=False)


def agent(ipc: str, port_file: str) -> None:
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    _curve_server(front, _keys())
    port = front.bind_to_random_port("tcp://127.0.0.1")
    back = ctx.socket(zmq.DEALER)
    back.connect(ipc)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(port_file + ".tmp", port_file)
    zmq.proxy(front, back)


def _wait_port(path: str) -> int:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.05)
    with open(path) as f:
        return int(f.read())


def client(port: int, calls: int) -> float:
    keys = _keys()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = (keys["spub"], keys["cpub"],
                                                               keys["csec"])
    s.connect(f"tcp://127.0.0.1:{port}")
    msg = b"x" * 200
    for _ in range(500):  # warm: the handshake
        s.send(msg)
        s.recv()
    t0 = time.perf_counter()
    for _ in range(calls):
        s.send(msg)
        s.recv()
    dt = time.perf_counter() - t0
    s.close(0)
    ctx.term()
    return calls / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args(argv)
    spub, ssec = zmq.curve_keypair()
    cpub, csec = zmq.curve_keypair()
    env = dict(os.environ, HOP_SPUB=spub.decode(), HOP_SSEC=ssec.decode(),
               HOP_CPUB=cpub.decode(), HOP_CSEC=csec.decode())
    os.environ.update(env)
    tmp = tempfile.mkdtemp(prefix="zhop-")  # 0700
    ipc = f"ipc://{tmp}/e"
    me = os.path.abspath(__file__)
    procs = []
    try:
        procs.append(subprocess.Popen([sys.executable, me, "--role", "executor", ipc,
                                       f"{tmp}/e.port"], env=env))
        procs.append(subprocess.Popen([sys.executable, me, "--role", "agent", ipc,
                                       f"{tmp}/a.port"], env=env))
        ports = {"executor": _wait_port(f"{tmp}/e.port"), "agent": _wait_port(f"{tmp}/a.port")}
        runs: dict = {k: [] for k in ports}
        for r in range(args.rounds):
            for k, port in ports.items():
                rate = client(port, args.calls)
                runs[k].append(rate)
                print(f"round {r + 1} {k}: {rate:.0f} round trips/s", flush=True)
        base = statistics.median(runs["executor"])
        print(f"\nmedians of {args.rounds} (sync round trips, 200 B, tcp + CURVE):")
        for k in ports:
            med = statistics.median(runs[k])
            print(f"  {k}: {med:.0f}/s ({med / base:.2f}x executor)")
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        {"executor": executor, "agent": agent}[sys.argv[2]](sys.argv[3], sys.argv[4])
    else:
        sys.exit(main())
