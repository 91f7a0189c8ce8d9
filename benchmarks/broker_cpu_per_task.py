"""Broker CPU per no-op task: 20,000 no-op tasks in batches of 1,000 on a local
cluster, the broker process's user+system CPU (psutil) over the run, per task, and
how much of it was the broker's main thread (the rest: libzmq's I/O thread).

    python benchmarks/broker_cpu_per_task.py            # the zray this imports
    PYTHONPATH=/path/to/other/tree python benchmarks/broker_cpu_per_task.py

Run it for two trees alternately on an otherwise quiet machine to compare them.
"""

import sys
import time

import psutil

import zray

N, BATCH = 20_000, 1_000


@zray.remote
def noop():
    return None


def _threads(proc) -> dict:
    """{thread id: user + system seconds} of ``proc``'s threads (its main thread's id is
    its pid; the others are libzmq's I/O thread and the broker's helpers)."""
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def main() -> None:
    zray.init(num_cpus=2)
    try:
        broker = next(p for p in psutil.Process().children(recursive=True)
                      if "brokerd" in " ".join(p.cmdline()))
        zray.get([noop.remote() for _ in range(BATCH)])  # warm: processes, function
        c0, t0, th0 = broker.cpu_times(), time.perf_counter(), _threads(broker)
        for _ in range(N // BATCH):
            zray.get([noop.remote() for _ in range(BATCH)])
        c1, wall, th1 = broker.cpu_times(), time.perf_counter(), _threads(broker)
        wall -= t0
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        main = th1.get(broker.pid, 0.0) - th0.get(broker.pid, 0.0)
        print(f"{zray.__file__}: broker {cpu / N * 1e6:.1f} us CPU/task "
              f"(main thread {main / N * 1e6:.1f}, others {(cpu - main) / N * 1e6:.1f}), "
              f"{N / wall:.0f} tasks/s", flush=True)
    finally:
        zray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
