"""Benchmark runner: one backend (ray or zray) in this process only.

Run by compare_ray.py, one fresh interpreter per backend (and per repeat for
the startup cases):

    PYTHON benchmarks/_runner.py --backend ray --check
    PYTHON benchmarks/_runner.py --backend zray --startup [--hold]
    PYTHON benchmarks/_runner.py --backend ray --cases single_client_tasks_async,...

The backend module is imported as `ray` exactly as a user program would do
(`import zray as ray`).  Results go to stdout as one JSON object per line,
each prefixed with _cases.MARK; everything else on stdout/stderr is noise.

Workloads are defined inside functions of this __main__ module so that both
runtimes ship them to workers by value (cloudpickle), as they would a user
script's functions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

from _cases import MARK, PROC_PATTERNS, TAG_ENV, measure_memory

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
# workloads
# --------------------------------------------------------------------------

def build_cases(ray, opts):
    """name -> setup(); setup() returns (fn, multiplier, cleanup).
    The rate reported is multiplier * calls / seconds."""
    n_actors = max(2, (os.cpu_count() or 2) // 2)  # Ray uses cpu_count//2 (=1 here)
    n_calls = 1000  # Ray uses 5,000 per client; scaled for a 2-core machine

    # Remote functions and actor classes are defined lazily, on first use by
    # a case, so that a backend that cannot yet define (say) actor classes
    # fails only the cases that need them.
    def define_small_value():
        @ray.remote
        def small_value():
            return b"ok"
        return small_value

    def define_do_put_small():
        @ray.remote
        def do_put_small():
            for _ in range(100):
                ray.put(0)
        return do_put_small

    def define_create_object_containing_ref():
        @ray.remote
        def create_object_containing_ref():
            return [ray.put(1) for _ in range(10000)]
        return create_object_containing_ref

    def define_actor():
        @ray.remote(num_cpus=0)
        class Actor:
            def small_value(self):
                return b"ok"

            def small_value_arg(self, x):
                return b"ok"
        return Actor

    def define_async_actor():
        @ray.remote
        class AsyncActor:
            async def small_value(self):
                return b"ok"
        return AsyncActor

    def define_client():
        @ray.remote(num_cpus=0)
        class Client:
            def __init__(self, servers):
                self.servers = servers if isinstance(servers, list) else [servers]

            def small_value_batch(self, n):
                results = []
                for s in self.servers:
                    results.extend([s.small_value.remote() for _ in range(n)])
                ray.get(results)
        return Client

    def define_work():
        @ray.remote
        def work(actors, n):
            k = len(actors)
            ray.get([actors[i % k].small_value.remote() for i in range(n)])
        return work

    makers = {
        "small_value": define_small_value,
        "do_put_small": define_do_put_small,
        "create_object_containing_ref": define_create_object_containing_ref,
        "Actor": define_actor,
        "AsyncActor": define_async_actor,
        "Client": define_client,
        "work": define_work,
    }
    defined = {}

    def d(name):
        if name not in defined:
            defined[name] = makers[name]()
        return defined[name]

    def kill_all(*handles):
        def cleanup():
            for h in handles:
                try:
                    ray.kill(h)
                except Exception:
                    pass
        return cleanup

    def noop():
        return None

    def large_array():
        import numpy as np
        return np.zeros(opts.large_mb * 1024 * 1024 // 8, dtype=np.int64)

    # ---- object store ----
    def single_client_get_calls():
        value = ray.put(0)
        return (lambda: ray.get(value)), 1, noop

    def single_client_put_calls():
        return (lambda: ray.put(0)), 1, noop

    def multi_client_put_calls():
        do_put_small = d("do_put_small")

        def fn():
            ray.get([do_put_small.remote() for _ in range(10)])
        return fn, 1000, noop

    def put_gigabytes():
        arr = large_array()

        def fn():
            ray.put(arr)
        return fn, arr.nbytes / 1e9, noop

    def get_gigabytes():
        arr = large_array()
        nbytes = arr.nbytes
        ref = ray.put(arr)
        del arr

        def fn():
            out = ray.get(ref)
            del out
        return fn, nbytes / 1e9, noop

    def get_object_containing_10k_refs():
        create_object_containing_ref = d("create_object_containing_ref")
        obj = create_object_containing_ref.remote()
        ray.wait([obj])

        def fn():
            ray.get(obj)
        return fn, 1, noop

    # ---- tasks ----
    def single_client_tasks_sync():
        small_value = d("small_value")
        return (lambda: ray.get(small_value.remote())), 1, noop

    def single_client_tasks_async():
        small_value = d("small_value")

        def fn():
            ray.get([small_value.remote() for _ in range(1000)])
        return fn, 1000, noop

    def single_client_tasks_and_get_batch():
        small_value = d("small_value")

        def fn():
            ray.get([small_value.remote() for _ in range(1000)])
        return fn, 1, noop

    def single_client_wait_1k_refs():
        small_value = d("small_value")

        def fn():
            refs = [small_value.remote() for _ in range(1000)]
            ready, _ = ray.wait(refs, num_returns=1000)
            assert len(ready) == 1000
        return fn, 1, noop

    def single_client_wait_1k_refs_one_by_one():
        small_value = d("small_value")

        def fn():
            not_ready = [small_value.remote() for _ in range(1000)]
            for _ in range(1000):
                _ready, not_ready = ray.wait(not_ready)
        return fn, 1, noop

    # ---- actors ----
    def actor_1_1_sync():
        Actor = d("Actor")
        a = Actor.remote()
        return (lambda: ray.get(a.small_value.remote())), 1, kill_all(a)

    def actor_1_1_async():
        Actor = d("Actor")
        a = Actor.remote()

        def fn():
            ray.get([a.small_value.remote() for _ in range(1000)])
        return fn, 1000, kill_all(a)

    def actor_1_1_concurrent():
        Actor = d("Actor")
        a = Actor.options(max_concurrency=16).remote()

        def fn():
            ray.get([a.small_value.remote() for _ in range(1000)])
        return fn, 1000, kill_all(a)

    def actor_1_n_async():
        Actor = d("Actor")
        Client = d("Client")
        servers = [Actor.remote() for _ in range(n_actors)]
        client = Client.remote(servers)

        def fn():
            ray.get(client.small_value_batch.remote(n_calls))
        return fn, n_calls * n_actors, kill_all(client, *servers)

    def actor_n_n_async():
        Actor = d("Actor")
        work = d("work")
        m = 4
        actors = [Actor.remote() for _ in range(n_actors)]

        def fn():
            ray.get([work.remote(actors, n_calls) for _ in range(m)])
        return fn, m * n_calls, kill_all(*actors)

    def async_actor_1_1_sync():
        AsyncActor = d("AsyncActor")
        a = AsyncActor.remote()
        return (lambda: ray.get(a.small_value.remote())), 1, kill_all(a)

    def async_actor_1_1_async():
        AsyncActor = d("AsyncActor")
        a = AsyncActor.remote()

        def fn():
            ray.get([a.small_value.remote() for _ in range(1000)])
        return fn, 1000, kill_all(a)

    return {
        "single_client_get_calls": single_client_get_calls,
        "single_client_put_calls": single_client_put_calls,
        "multi_client_put_calls": multi_client_put_calls,
        "put_gigabytes": put_gigabytes,
        "get_gigabytes": get_gigabytes,
        "get_object_containing_10k_refs": get_object_containing_10k_refs,
        "single_client_tasks_sync": single_client_tasks_sync,
        "single_client_tasks_async": single_client_tasks_async,
        "single_client_tasks_and_get_batch": single_client_tasks_and_get_batch,
        "single_client_wait_1k_refs": single_client_wait_1k_refs,
        "single_client_wait_1k_refs_one_by_one": single_client_wait_1k_refs_one_by_one,
        "1_1_actor_calls_sync": actor_1_1_sync,
        "1_1_actor_calls_async": actor_1_1_async,
        "1_1_actor_calls_concurrent": actor_1_1_concurrent,
        "1_n_actor_calls_async": actor_1_n_async,
        "n_n_actor_calls_async": actor_n_n_async,
        "1_1_async_actor_calls_sync": async_actor_1_1_sync,
        "1_1_async_actor_calls_async": async_actor_1_1_async,
    }


def timeit(fn, multiplier, repeat, duration, warmup, on_first_call=None):
    """Warm up (at least one call; includes e.g. actor start), then `repeat`
    trials of >= `duration` seconds each.  Returns per-trial rates."""
    start = time.perf_counter()
    fn()
    if on_first_call is not None:
        on_first_call()
    while time.perf_counter() - start < warmup:
        fn()
    rates = []
    for _ in range(repeat):
        count = 0
        start = time.perf_counter()
        while True:
            fn()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= duration:
                break
        rates.append(multiplier * count / elapsed)
    return rates


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
    registry = build_cases(ray, args)
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
        cleanup = None
        try:
            t = time.perf_counter()
            fn, multiplier, cleanup = registry[name]()
            setup_s = time.perf_counter() - t
            rates = timeit(fn, multiplier, args.repeat, args.duration, args.warmup,
                           on_first_call=lambda n=name: emit(event="warm", case=n))
            emit(event="result", case=name, values=rates, setup_s=setup_s)
        except Exception as exc:
            emit(event="error", case=name, error=short_error(exc),
                 trace=traceback.format_exc()[-2000:])
        finally:
            fn = None
            if cleanup is not None:
                try:
                    cleanup()
                except Exception:
                    pass
            gc.collect()
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
