"""The broker's per-task work without the network: decode + engine + encode, in one process.

::

    SUBMIT headers (packed once) --decode--> TaskEngine.submit --schedule()--> EXEC (Outbox)
    DONE headers --decode--> TaskEngine.done --> OBJ to the owner (Outbox, flushed per turn)

A real ``brokerd.broker.Broker`` on an ``ipc://`` socket of its own, with
``--nodes`` nodes of one CPU, each with one executor (joined through the engine's
own calls: NODE_HELLO, EXEC_SPAWNED, HELLO, READY) and one driver. Each turn
hands the broker's handlers ``--burst`` SUBMITs and then the DONEs of the tasks it
started, as its loop would after draining its socket, and flushes the outbox
(the peers are not connected: libzmq drops what the broker sends them, so the
socket's send cost is counted but no I/O thread work is). What is left out:
receiving (libzmq, CURVE) and the poll; what is in: every Python line of the
task's path through the broker. Prints the main thread's CPU per task (medians
over ``--rounds``) and, with ``--profile``, the top functions (cProfile). The
DONE headers are packed before the clock starts (packing them is the executor's
work, not the broker's).

    python benchmarks/engine_hotpath.py --tasks 20000
    python benchmarks/engine_hotpath.py --tree /work/main   # another tree's broker

Two trees compared: run it for each in turn (``--tree``), several times, and
compare the medians.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time


def _tree(argv) -> str:
    """The tree whose brokerd and zray are measured: ``--tree PATH``, else this one."""
    for i, a in enumerate(argv):
        if a == "--tree" and i + 1 < len(argv):
            return os.path.abspath(argv[i + 1])
        if a.startswith("--tree="):
            return os.path.abspath(a.split("=", 1)[1])
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, _tree(sys.argv))

import zmq  # noqa: E402

from brokerd.broker import Broker  # noqa: E402
from brokerd.gctime import tune  # noqa: E402
from zray import _protocol as P  # noqa: E402
from zray._serialization import serialize  # noqa: E402


def _Frame(b: bytes) -> zmq.Frame:
    """What recv_parts hands the handlers."""
    return zmq.Frame(b)


def _cluster(nodes: int):
    tmp = tempfile.mkdtemp(prefix="zeng-")
    os.environ.setdefault("ZRAY_INSECURE", "1")
    b = Broker(f"ipc://{tmp}/b.sock", tmp)
    b.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # nobody is connected: drop, do not raise
    e = b.engine
    execs = []
    for _ in range(nodes):
        nid = os.urandom(P.ID_LEN)
        b.on_node_hello(nid, P.NodeHello(P.VERSION, nid, {"resources": {"CPU": P.UNIT},
                                                          "prestart": 0}), [])
        cid, token = os.urandom(P.ID_LEN), os.urandom(16)
        e.executor_spawned(nid, cid, token)
        e.client_joined(cid, P.Hello(P.VERSION, "executor", nid, 1, b"", token))
        e.executor_ready(cid)
        execs.append(cid)
    driver = os.urandom(P.ID_LEN)
    e.client_joined(driver, P.Hello(P.VERSION, "driver", b"", 1, b"job1", b""))
    fid = os.urandom(16)
    e.objects.register_fn(fid, b"fn-blob", [])
    return b, driver, fid


def run(tasks: int, burst: int, nodes: int, profile: bool = False, finish: int = 0) -> float:
    tune()  # (as Broker.serve does)
    b, driver, fid = _cluster(nodes)
    e = b.engine
    arg = serialize(((1,), {}))[0]
    value = serialize(1)[0]
    subs = []
    for i in range(tasks):
        tid = driver + i.to_bytes(4, "little")
        spec = P.TaskSpec(tid, P.TASK, fid, "tiny", 1, {"CPU": P.UNIT}, [], [], {}, b"",
                          driver, driver, b"job1", b"")
        subs.append((tid, _Frame(P.encode(P.Submit(spec))), [_Frame(a) for a in arg]))
    done_frames = [_Frame(v) for v in value]
    dones = {tid: _Frame(P.encode(P.Done(tid, [[P.VALUE, len(done_frames), None, 2]], [],
                                         False, [], "")))
             for tid, _h, _f in subs}  # (the executors' work: packed before the clock)
    decode = P.decode
    prof = cProfile.Profile() if profile else None
    t0 = time.thread_time()
    if prof:
        prof.enable()
    pos = 0
    turn = 0
    while pos < tasks or e.tasks:
        for _tid, header, frames in subs[pos:pos + burst]:
            b.header = header
            b.on_submit(driver, decode(header.buffer), frames)
        pos += burst
        while True:  # run what was started, as the executors would, until the burst is done
            b.engine.moves.now = time.time()
            if e.placement.dirty or (e.nodes.freed and e.placement.queues):
                e.schedule()
            b.out.flush()
            running = [(ex.cid, ex.task.task_id) for ex in e.executors.values()
                       if ex.task is not None]
            if not running:
                if pos >= tasks and e.tasks:
                    raise RuntimeError(f"{len(e.tasks)} tasks never started")
                break
            if finish:  # DONEs trickle: the others stay busy and get tasks sent ahead
                turn += 1
                running = [running[(turn + i) % len(running)]
                           for i in range(min(finish, len(running)))]
            for cid, tid in running:
                h = dones[tid]
                b.header = h
                e.done(cid, decode(h.buffer), done_frames)
    if prof:
        prof.disable()
    us = (time.thread_time() - t0) / tasks * 1e6
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    b.sock.close(0)
    b.ctx.term()
    shutil.rmtree(b.session_dir, ignore_errors=True)  # (the socket's scratch dir)
    return us


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--burst", type=int, default=500, help="SUBMITs per turn")
    ap.add_argument("--nodes", type=int, default=4, help="nodes of one CPU and one executor")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="one more run under cProfile")
    ap.add_argument("--finish", type=int, default=0,
                    help="DONEs per turn (0: every running task's): fewer leave the other "
                         "executors busy, so the pass sends tasks ahead (the pipelined path)")
    ap.add_argument("--tree", default=None, help="measure the brokerd of this source tree")
    args = ap.parse_args(argv)
    runs = [run(args.tasks, args.burst, args.nodes, finish=args.finish)
            for _ in range(args.rounds)]
    import brokerd

    print(f"{os.path.dirname(os.path.dirname(brokerd.__file__))}: "
          f"broker main thread, per task (no sockets' receive side): median "
          f"{statistics.median(runs):.1f} us CPU over {args.rounds} runs "
          f"({', '.join(f'{r:.1f}' for r in runs)})")
    if args.profile:
        run(args.tasks, args.burst, args.nodes, profile=True, finish=args.finish)
    return 0


if __name__ == "__main__":
    sys.exit(main())
