"""Benchmark runner: one backend (ray or zray) in this process only.

Run by compare_ray.py, one fresh interpreter per backend (and per repeat for
the startup cases):

    PYTHON benchmarks/_runner.py --backend ray --check
    PYTHON benchmarks/_runner.py --backend zray --startup [--hold]
    PYTHON benchmarks/_runner.py --backend ray --cases single_client_tasks_async,...

The backend module is imported as `ray` exactly as a user program would do
(`import zray as ray`).  Results go to stdout as one JSON object per line,
each prefixed with _cases.MARK; everything else on stdout/stderr is noise.

The workloads are those of `zray microbenchmark`, in benchmarks/workloads.py,
which _cases loads by path (zray is not importable under Ray's interpreter).
They are defined inside functions and that module is not registered in
sys.modules, so both runtimes ship them to workers by value (cloudpickle),
as they would a user script's functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from _cases import MARK, PROC_PATTERNS, TAG_ENV, mb, measure_memory

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)


def emit(**obj):
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def short_error(exc):
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return "%s: %s" % (type(exc).__name__, first[:300]) if first else type(exc).__name__


def prepare_import(backend):
    """Make the repo's zray importable (for the driver and, via PYTHONPATH,
    for whatever processes zray starts), even when it is not pip-installed."""
    if backend == "zray" and REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
        pp = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = REPO_ROOT + (os.pathsep + pp if pp else "")
    if backend == "ray":
        # No network in benchmark sandboxes; avoids the usage-stats prompt/thread.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def do_init(ray, backend, num_cpus):
    """init(num_cpus=N); for Ray also quiet the dashboard and logs if accepted.
    zray is called exactly as a user would: init(num_cpus=N)."""
    if backend == "ray":
        import logging

        try:
            return ray.init(num_cpus=num_cpus, include_dashboard=False,
                            logging_level=logging.ERROR)
        except TypeError:
            return ray.init(num_cpus=num_cpus)
    return ray.init(num_cpus=num_cpus)


def check_api(ray, backend):
    missing = [a for a in ("init", "remote", "get", "put", "wait", "shutdown")
               if not hasattr(ray, a)]
    if missing:
        where = getattr(ray, "__file__", None) or list(getattr(ray, "__path__", []))
        raise ImportError("%s imported from %s but lacks %s (runtime not written yet?)"
                          % (backend, where, ", ".join(missing)))


# --------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------

def mode_check(backend):
    import importlib

    try:
        ray = importlib.import_module(backend)
        check_api(ray, backend)
    except BaseException as exc:  # noqa: B036 - report anything, incl. SystemExit
        emit(event="check", ok=False, error=short_error(exc))
        return 1
    emit(event="check", ok=True, version=str(getattr(ray, "__version__", "?")),
         file=str(getattr(ray, "__file__", "?")), python=sys.version.split()[0],
         executable=sys.executable)
    return 0


def mode_startup(backend, args):
    import importlib

    try:
        t0 = time.perf_counter()
        ray = importlib.import_module(backend)
        t1 = time.perf_counter()
        check_api(ray, backend)
        do_init(ray, backend, args.num_cpus)
        t2 = time.perf_counter()

        @ray.remote
        def f():
            return 1

        assert ray.get(f.remote()) == 1
        t3 = time.perf_counter()
    except BaseException as exc:  # noqa: B036
        emit(event="fatal", error=short_error(exc), trace=traceback.format_exc()[-2000:])
        return 1
    emit(event="startup", pid=os.getpid(), import_s=t1 - t0, init_s=t2 - t1,
         first_task_s=t3 - t2, startup_s=t3 - t0)
    if args.hold:
        # The orchestrator measures memory while we sit idle, then tells us
        # to go on ("go"), or asks us to measure ourselves ("measure").
        time.sleep(args.settle)
        emit(event="ready", pid=os.getpid())
        line = sys.stdin.readline().strip()
        if line == "measure":
            try:
                since = float(os.environ.get("ZRAY_BENCH_SINCE", "0"))
                mem = measure_memory(os.getpid(), since, os.environ.get(TAG_ENV, ""),
                                     PROC_PATTERNS[backend], exclude=(os.getppid(),))
                emit(event="memory", **mem)
            except Exception as exc:
                emit(event="memory", error=short_error(exc))
    t4 = time.perf_counter()
    ray.shutdown()
    emit(event="done", shutdown_s=time.perf_counter() - t4)
    return 0


def mode_cases(backend, args):
    import importlib

    names = [n for n in args.cases.split(",") if n]
    try:
        ray = importlib.import_module(backend)
        check_api(ray, backend)
        t = time.perf_counter()
        do_init(ray, backend, args.num_cpus)
        init_s = time.perf_counter() - t
    except BaseException as exc:  # noqa: B036
        emit(event="fatal", error=short_error(exc), trace=traceback.format_exc()[-2000:])
        return 1
    registry = mb.build_cases(ray, large_mb=args.large_mb)
    # Canary: one tiny task, so that a runtime that cannot run tasks at all
    # fails (or hangs) once here instead of once per case.
    try:
        @ray.remote
        def canary():
            return 1

        assert ray.get(canary.remote()) == 1
    except BaseException as exc:  # noqa: B036
        emit(event="fatal", error="first tiny task failed: " + short_error(exc),
             trace=traceback.format_exc()[-2000:])
        return 1
    emit(event="init_done", init_s=init_s)
    for name in names:
        emit(event="start", case=name)
        if name not in registry:
            emit(event="error", case=name, error="unknown case")
            continue
        try:
            rates, setup_s = mb.run_case(
                registry, name, args.repeat, args.duration, args.warmup,
                on_first_call=lambda n=name: emit(event="warm", case=n))
            emit(event="result", case=name, values=rates, setup_s=setup_s)
        except Exception as exc:
            emit(event="error", case=name, error=short_error(exc),
                 trace=traceback.format_exc()[-2000:])
    try:
        ray.shutdown()
    except Exception:
        pass
    emit(event="finished")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("ray", "zray"), required=True)
    p.add_argument("--check", action="store_true", help="only check importability")
    p.add_argument("--startup", action="store_true", help="measure startup (fresh process)")
    p.add_argument("--hold", action="store_true",
                   help="with --startup: wait on stdin after the first task (memory)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="with --hold: seconds to sit idle before reporting ready")
    p.add_argument("--cases", default="", help="comma-separated steady-state cases")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--duration", type=float, default=1.0, help="seconds per trial")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per case")
    p.add_argument("--large-mb", type=int, default=800)
    args = p.parse_args(argv)

    prepare_import(args.backend)
    if args.check:
        return mode_check(args.backend)
    if args.startup:
        return mode_startup(args.backend, args)
    return mode_cases(args.backend, args)


if __name__ == "__main__":
    sys.exit(main())
