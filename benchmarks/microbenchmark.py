"""``zray microbenchmark``: the cases of ``ray microbenchmark``, run on zray.

Every case of Ray's ``ray/_private/ray_perf.py`` (placement groups excepted:
zray has none) runs on an embedded local cluster, ``init(num_cpus=2)``, with
Ray's workload shapes; batch sizes are scaled down (see ``workloads.N_CALLS``)
so that one call of a case stays well under a one-second trial on a small
machine.  Two rows are added: ``startup time`` and ``idle cluster memory``,
both taken from a fresh interpreter.  Each row is printed as Ray prints it::

    single client tasks async per second 2644.0 +- 61.3

the mean and (population) standard deviation over ``--repeat`` trials.

The cases themselves (catalogue and workloads) are in benchmarks/workloads.py,
shared with ``benchmarks/compare_ray.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

from benchmarks.workloads import CASES, UNSUPPORTED, build_cases, mean_sd, run_case

# --------------------------------------------------------------------------
# startup time and idle memory: one fresh interpreter per repeat
# --------------------------------------------------------------------------

_PROBE_MARK = "@@ZRAYPROBE@@ "

# Run with `python -c`: times import + init + first task, reports, then waits
# for a line on stdin (the parent measures memory meanwhile) and shuts down.
_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import zray
zray.init(num_cpus=%(num_cpus)d)
t1 = time.perf_counter()

@zray.remote
def f():
    return 1

assert zray.get(f.remote()) == 1
t2 = time.perf_counter()
sys.stdout.write(%(mark)r + json.dumps({"startup_s": t2 - t0, "init_s": t1 - t0}) + "\n")
sys.stdout.flush()
sys.stdin.readline()
zray.shutdown()
"""


def _tree_memory(pid):
    """Summed USS of a process and its descendants (RSS if some USS cannot
    be read), in MB (1e6 bytes): (MB, metric, number of processes)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    uss = rss = n = 0
    metric = "USS"
    for p in procs:
        try:
            info = p.memory_info()
            try:
                u = p.memory_full_info().uss
            except (psutil.AccessDenied, AttributeError, NotImplementedError):
                u, metric = None, "RSS"
        except psutil.Error:
            continue
        rss += info.rss
        uss += u if u is not None else info.rss
        n += 1
    return (uss if metric == "USS" else rss) / 1e6, metric, n


def _readline(stream, timeout):
    """stream.readline() with a timeout; None on timeout."""
    box = []
    t = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else None


def probe_startup(num_cpus=2, settle=1.0, timeout=120.0):
    """One fresh interpreter: import zray, init, one tiny task.  Returns
    {"startup_s", "init_s", "memory_mb", "metric", "processes"}; raises
    RuntimeError on failure."""
    env = dict(os.environ)
    for key in ("ZRAY_ADDRESS", "RAY_ADDRESS"):  # a private cluster, always
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE % {"num_cpus": num_cpus, "mark": _PROBE_MARK}],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        result = None
        while result is None:
            line = _readline(proc.stdout, max(0.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError("no first task result after %g s" % timeout)
            if not line:
                err = proc.stderr.read().strip().splitlines()
                raise RuntimeError("probe exited with code %s: %s"
                                   % (proc.wait(), err[-1] if err else "no output"))
            if line.startswith(_PROBE_MARK):
                result = json.loads(line[len(_PROBE_MARK):])
        time.sleep(settle)  # let the runtime go idle
        result["memory_mb"], result["metric"], result["processes"] = _tree_memory(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        return result
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass


# --------------------------------------------------------------------------
# `zray microbenchmark`
# --------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised in the main thread by SIGALRM when a case runs too long (a
    BaseException, so that the runtime's `except Exception` lets it pass)."""


def _alarm(seconds):
    """Arm (or, with 0, disarm) the per-case timeout where SIGALRM exists."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        return

    def on_alarm(signum, frame):
        raise CaseTimeout()

    signal.signal(signal.SIGALRM, on_alarm if seconds else signal.SIG_DFL)
    signal.alarm(int(seconds))


def _fmt(x):
    return str(round(x, 2))


def _emit(line):
    from zray.experimental.tqdm_ray import safe_print  # written above the progress bar

    safe_print(line, flush=True)


def _short(exc):
    text = " ".join(str(exc).split())
    return "%s: %s" % (type(exc).__name__, text[:200]) if text else type(exc).__name__


def main(filter_="", repeat=3, *, num_cpus=2, duration=1.0, warmup=0.5, settle=1.0,
         case_timeout=180.0):
    """Run the microbenchmark; rows whose title contains `filter_` only.
    Returns 0, or 1 if some case failed or none matched."""
    filter_ = filter_ or ""
    repeat = int(repeat)
    if repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 1
    wanted = [c for c in CASES if c["title"] and filter_ in c["title"]]
    unsupported = [t for t in UNSUPPORTED if filter_ in t]
    if not wanted and not unsupported:
        print("no case matches --filter %r" % filter_, file=sys.stderr)
        return 1
    print("zray microbenchmark: init(num_cpus=%d) on %d CPU(s); mean +- stdev over %d "
          "trial(s) of >= %g s (startup rows: %d fresh process(es))"
          % (num_cpus, os.cpu_count() or 0, repeat, duration, repeat), file=sys.stderr)
    status = 0
    from zray.experimental.tqdm_ray import tqdm

    fresh = [c for c in wanted if c["phase"] == "startup"]
    progress = tqdm(total=len(wanted), desc="microbenchmark", unit="case", flush_interval_s=0)
    if fresh:
        runs, error = [], None
        for _ in range(repeat):
            try:
                runs.append(probe_startup(num_cpus, settle, timeout=case_timeout))
            except Exception as exc:
                error = _short(exc)
                break
        for c in fresh:
            if not runs:
                _emit("%s error: %s" % (c["title"], error))
                status = 1
            elif c["name"] == "startup":
                mean, sd = mean_sd([r["startup_s"] for r in runs])
                _emit("%s %s +- %s s" % (c["title"], _fmt(mean), _fmt(sd)))
            else:
                mean, sd = mean_sd([r["memory_mb"] for r in runs])
                last = runs[-1]
                _emit("%s %s +- %s MB (summed %s, %d processes)"
                      % (c["title"], _fmt(mean), _fmt(sd), last["metric"], last["processes"]))
            progress.update(1)

    steady = [c for c in wanted if c["phase"] == "steady"]
    if steady:
        import zray

        zray.init(address="local", num_cpus=num_cpus)
        try:
            registry = build_cases(zray)
            for c in steady:
                try:
                    _alarm(case_timeout)
                    try:
                        rates, _ = run_case(registry, c["name"], repeat, duration, warmup)
                    finally:
                        _alarm(0)
                    mean, sd = mean_sd(rates)
                    _emit("%s per second %s +- %s" % (c["title"], _fmt(mean), _fmt(sd)))
                except CaseTimeout:
                    _emit("%s error: timed out after %g s" % (c["title"], case_timeout))
                    status = 1
                except Exception as exc:
                    _emit("%s error: %s" % (c["title"], _short(exc)))
                    if os.environ.get("ZRAY_BENCH_TRACE"):
                        traceback.print_exc()
                    status = 1
                progress.update(1)
        finally:
            zray.shutdown()
    progress.close()

    for title in unsupported:
        _emit("%s not supported (zray has no placement groups)" % title)
    return status


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filter", default="")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    sys.exit(main(a.filter, a.repeat))
