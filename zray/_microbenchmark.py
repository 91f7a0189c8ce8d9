"""``zray microbenchmark``: the cases of ``ray microbenchmark``, run on zray.

Every case of Ray's ``ray/_private/ray_perf.py`` (placement groups excepted:
zray has none) runs on an embedded local cluster, ``init(num_cpus=2)``, with
Ray's workload shapes; batch sizes are scaled down (see ``N_CALLS``) so that
one call of a case stays well under a one-second trial on a small machine.
Two rows are added: ``startup time`` and ``idle cluster memory``, both taken
from a fresh interpreter.  Each row is printed as Ray prints it::

    single client tasks async per second 2644.0 +- 61.3

the mean and (population) standard deviation over ``--repeat`` trials.

This module is also the case catalogue of ``benchmarks/compare_ray.py``,
whose runner loads this file *by path* under Ray's interpreter, where zray is
not importable.  Hence:

* nothing here imports zray (or numpy) at module level: ``main`` imports
  zray when it runs, and every workload takes the Ray-like module as its
  ``ray`` argument;
* remote functions and actor classes are defined inside functions, and use
  only their closure (``ray`` and one another) and builtins, never this
  module's globals, so both runtimes ship them to workers by value.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

# Ray submits 5,000 calls per client (10,000 tasks per actor in "multi client
# tasks async"); 1,000 keeps one call of those cases well under a trial on a
# 2-core machine while keeping the shape (one client, many in-flight calls).
N_CALLS = 1000
# Ray's "single client put gigabytes" array: 100 Mi int64 = 800 MiB.
LARGE_MB = 800
# Ray's "multi client put gigabytes" puts 10 x 10 arrays of 80 MiB (8 GB per
# call) from 10 tasks; the arrays are scaled to 8 MiB (800 MB per call).
MULTI_PUT_MB = 8
# Ray's microbenchmark row that zray cannot run.
UNSUPPORTED = ("placement group create/removal",)

# --------------------------------------------------------------------------
# catalogue
#
# name: key used by benchmarks/compare_ray.py (table rows, JSON files);
# title: the row printed by `zray microbenchmark` (None: compare_ray only);
# ray_name: the matching `ray microbenchmark` row, where there is one;
# unit, better ("higher" for rates, "lower" for times and memory);
# phase: "startup" (a fresh process per repeat) or "steady" (one init()).
# --------------------------------------------------------------------------


def _case(name, title, ray_name, unit, better, phase, desc):
    return dict(name=name, title=title, ray_name=ray_name, unit=unit, better=better,
                phase=phase, desc=desc)


CASES = [
    # -- fresh-process cases -------------------------------------------------
    _case("startup", "startup time", None, "s", "lower", "startup",
          "import + init(num_cpus=2) + first tiny task result, fresh process"),
    _case("startup_init_only", None, None, "s", "lower", "startup",
          "init(num_cpus=2) alone, fresh process (same runs as 'startup')"),
    _case("idle_memory_mb", "idle cluster memory", None, "MB", "lower", "startup",
          "summed USS (RSS if USS unavailable) of driver tree + runtime processes "
          "after init() and one tiny task"),
    # -- object store ----------------------------------------------------------
    _case("single_client_get_calls", "single client get calls (Plasma Store)",
          "single client get calls (Plasma Store)", "gets/s", "higher", "steady",
          "ray.get of one small put ref, repeated"),
    _case("single_client_put_calls", "single client put calls (Plasma Store)",
          "single client put calls (Plasma Store)", "puts/s", "higher", "steady",
          "ray.put(0), repeated"),
    _case("multi_client_put_calls", "multi client put calls (Plasma Store)",
          "multi client put calls (Plasma Store)", "puts/s", "higher", "steady",
          "small puts made inside tasks: 10 tasks x 100 ray.put(0), gathered"),
    _case("put_gigabytes", "single client put gigabytes", "single client put gigabytes",
          "GB/s", "higher", "steady",
          "ray.put of a large int64 numpy array (800 MiB, or --large-mb)"),
    _case("get_gigabytes", None, None, "GB/s", "higher", "steady",
          "ray.get of a put large int64 numpy array (--large-mb); Ray returns a "
          "zero-copy view of its shared-memory store, so this is not a copy rate"),
    _case("single_client_tasks_and_get_batch", "single client tasks and get batch",
          "single client tasks and get batch", "batches/s", "higher", "steady",
          "one batch = 1,000 tiny tasks gathered in one get (Ray reports batches/s)"),
    _case("multi_client_put_gigabytes", "multi client put gigabytes",
          "multi client put gigabytes", "GB/s", "higher", "steady",
          "10 tasks each ray.put 10 int64 arrays of %d MiB (Ray: 80 MiB), gathered"
          % MULTI_PUT_MB),
    _case("get_object_containing_10k_refs", "single client get object containing 10k refs",
          "single client get object containing 10k refs", "gets/s", "higher", "steady",
          "ray.get of a task result that is a list of 10,000 refs (ray.put(1) each)"),
    _case("single_client_wait_1k_refs", None, None, "waits/s", "higher", "steady",
          "submit 1,000 tiny tasks, one ray.wait(refs, num_returns=1000)"),
    _case("single_client_wait_1k_refs_one_by_one", "single client wait 1k refs",
          "single client wait 1k refs", "ops/s", "higher", "steady",
          "Ray's shape: submit 1,000 tiny tasks, then 1,000 x ray.wait(not_ready)"),
    # -- tasks -----------------------------------------------------------------
    _case("single_client_tasks_sync", "single client tasks sync", "single client tasks sync",
          "tasks/s", "higher", "steady", "submit 1 tiny task, get it, repeat"),
    _case("single_client_tasks_async", "single client tasks async",
          "single client tasks async", "tasks/s", "higher", "steady",
          "submit 1,000 tiny tasks then get them all"),
    _case("multi_client_tasks_async", "multi client tasks async", "multi client tasks async",
          "tasks/s", "higher", "steady",
          "4 actors each submit %d tiny tasks and get them (Ray: 10,000)" % N_CALLS),
    # -- actors ----------------------------------------------------------------
    _case("1_1_actor_calls_sync", "1:1 actor calls sync", "1:1 actor calls sync",
          "calls/s", "higher", "steady", "one call on one actor, get, repeat"),
    _case("1_1_actor_calls_async", "1:1 actor calls async", "1:1 actor calls async",
          "calls/s", "higher", "steady", "1,000 calls on one actor, then get them all"),
    _case("1_1_actor_calls_concurrent", "1:1 actor calls concurrent",
          "1:1 actor calls concurrent", "calls/s", "higher", "steady",
          "as 1_1_actor_calls_async on an actor with .options(max_concurrency=16)"),
    _case("1_n_actor_calls_async", "1:n actor calls async", "1:n actor calls async",
          "calls/s", "higher", "steady",
          "a client actor makes %d calls on each of N server actors and gets them "
          "(Ray: 5,000)" % N_CALLS),
    _case("n_n_actor_calls_async", "n:n actor calls async", "n:n actor calls async",
          "calls/s", "higher", "steady",
          "4 tasks each make %d calls spread over N actors (handles passed as arg)"
          % N_CALLS),
    _case("n_n_actor_calls_with_arg_async", "n:n actor calls with arg async",
          "n:n actor calls with arg async", "calls/s", "higher", "steady",
          "N client actors each make %d calls with a put ref as arg on their own "
          "server actor" % N_CALLS),
    _case("1_1_async_actor_calls_sync", "1:1 async-actor calls sync",
          "1:1 async-actor calls sync", "calls/s", "higher", "steady",
          "one call on an asyncio actor (async def method), get, repeat"),
    _case("1_1_async_actor_calls_async", "1:1 async-actor calls async",
          "1:1 async-actor calls async", "calls/s", "higher", "steady",
          "1,000 calls on an asyncio actor, then get them all"),
    _case("1_1_async_actor_calls_with_args_async", "1:1 async-actor calls with args async",
          "1:1 async-actor calls with args async", "calls/s", "higher", "steady",
          "1,000 calls with an int arg on an asyncio actor, then get them all"),
    _case("1_n_async_actor_calls_async", "1:n async-actor calls async",
          "1:n async-actor calls async", "calls/s", "higher", "steady",
          "a client actor makes %d calls on each of N asyncio actors (Ray: 5,000)"
          % N_CALLS),
    _case("n_n_async_actor_calls_async", "n:n async-actor calls async",
          "n:n async-actor calls async", "calls/s", "higher", "steady",
          "4 tasks each make %d calls spread over N asyncio actors (Ray: 5,000)"
          % N_CALLS),
]

CASE_BY_NAME = {c["name"]: c for c in CASES}


def default_n_actors():
    """Ray uses cpu_count // 2 server actors (1 on 2 cores); at least 2 here,
    so that the 1:n and n:n cases do involve several actors."""
    return max(2, (os.cpu_count() or 2) // 2)


# --------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------

def build_cases(ray, *, n_calls=N_CALLS, large_mb=LARGE_MB, multi_put_mb=MULTI_PUT_MB,
                n_actors=None):
    """name -> setup() for every steady case; `ray` is the runtime module
    (ray, or zray imported as ray).  setup() returns (fn, multiplier,
    cleanup); the rate reported is multiplier * calls / seconds."""
    n_actors = n_actors or default_n_actors()
    m = 4  # clients in "multi client tasks async" and the n:n cases, as in Ray

    # Remote functions and actor classes are defined lazily, on first use by
    # a case, so that a runtime that cannot define (say) asyncio actors fails
    # only the cases that need them.
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

    def define_do_put():
        nbytes = multi_put_mb * 1024 * 1024

        @ray.remote
        def do_put():
            try:
                import numpy as np
            except ImportError:
                np = None
            for _ in range(10):
                ray.put(np.zeros(nbytes // 8, dtype=np.int64) if np is not None
                        else bytes(nbytes))
        return do_put, nbytes

    def define_create_object_containing_ref():
        @ray.remote
        def create_object_containing_ref():
            return [ray.put(1) for _ in range(10000)]
        return create_object_containing_ref

    def define_actor():
        small_value = d("small_value")

        @ray.remote(num_cpus=0)
        class Actor:
            def small_value(self):
                return b"ok"

            def small_value_arg(self, x):
                return b"ok"

            def small_value_batch(self, n):
                ray.get([small_value.remote() for _ in range(n)])
        return Actor

    def define_async_actor():
        @ray.remote
        class AsyncActor:
            async def small_value(self):
                return b"ok"

            async def small_value_with_arg(self, x):
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

            def small_value_batch_arg(self, n):
                x = ray.put(0)
                results = []
                for s in self.servers:
                    results.extend([s.small_value_arg.remote(x) for _ in range(n)])
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
        "do_put": define_do_put,
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
        nbytes = large_mb * 1024 * 1024
        try:
            import numpy as np
        except ImportError:
            return bytes(nbytes), nbytes
        return np.zeros(nbytes // 8, dtype=np.int64), nbytes

    def batch_of(call):
        """fn() that submits n_calls of call() and gets them all."""
        def fn():
            ray.get([call() for _ in range(n_calls)])
        return fn

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
        arr, nbytes = large_array()

        def fn():
            ray.put(arr)
        return fn, nbytes / 1e9, noop

    def get_gigabytes():
        arr, nbytes = large_array()
        ref = ray.put(arr)
        del arr

        def fn():
            out = ray.get(ref)
            del out
        return fn, nbytes / 1e9, noop

    def multi_client_put_gigabytes():
        do_put, nbytes = d("do_put")

        def fn():
            ray.get([do_put.remote() for _ in range(10)])
        return fn, 10 * 10 * nbytes / 1e9, noop

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
        return batch_of(small_value.remote), n_calls, noop

    def single_client_tasks_and_get_batch():
        small_value = d("small_value")
        return batch_of(small_value.remote), 1, noop

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
            # as Ray: fetch_local once per object is enough
            fetch_local = True
            for _ in range(1000):
                _ready, not_ready = ray.wait(not_ready, fetch_local=fetch_local)
                fetch_local = False
        return fn, 1, noop

    def multi_client_tasks_async():
        Actor = d("Actor")
        actors = [Actor.remote() for _ in range(m)]

        def fn():
            ray.get([a.small_value_batch.remote(n_calls) for a in actors])
        return fn, n_calls * m, kill_all(*actors)

    # ---- actors ----
    def actor_1_1_sync():
        a = d("Actor").remote()
        return (lambda: ray.get(a.small_value.remote())), 1, kill_all(a)

    def actor_1_1_async():
        a = d("Actor").remote()
        return batch_of(a.small_value.remote), n_calls, kill_all(a)

    def actor_1_1_concurrent():
        a = d("Actor").options(max_concurrency=16).remote()
        return batch_of(a.small_value.remote), n_calls, kill_all(a)

    def one_to_n(actor_class):
        Client = d("Client")
        servers = [actor_class.remote() for _ in range(n_actors)]
        client = Client.remote(servers)

        def fn():
            ray.get(client.small_value_batch.remote(n_calls))
        return fn, n_calls * n_actors, kill_all(client, *servers)

    def n_to_n(actor_class):
        work = d("work")
        actors = [actor_class.remote() for _ in range(n_actors)]

        def fn():
            ray.get([work.remote(actors, n_calls) for _ in range(m)])
        return fn, m * n_calls, kill_all(*actors)

    def actor_1_n_async():
        return one_to_n(d("Actor"))

    def actor_n_n_async():
        return n_to_n(d("Actor"))

    def actor_n_n_with_arg_async():
        Actor, Client = d("Actor"), d("Client")
        servers = [Actor.remote() for _ in range(n_actors)]
        clients = [Client.remote(s) for s in servers]

        def fn():
            ray.get([c.small_value_batch_arg.remote(n_calls) for c in clients])
        return fn, n_calls * len(clients), kill_all(*clients, *servers)

    def async_actor_1_1_sync():
        a = d("AsyncActor").remote()
        return (lambda: ray.get(a.small_value.remote())), 1, kill_all(a)

    def async_actor_1_1_async():
        a = d("AsyncActor").remote()
        return batch_of(a.small_value.remote), n_calls, kill_all(a)

    def async_actor_1_1_with_args_async():
        a = d("AsyncActor").remote()

        def fn():
            ray.get([a.small_value_with_arg.remote(i) for i in range(n_calls)])
        return fn, n_calls, kill_all(a)

    def async_actor_1_n_async():
        return one_to_n(d("AsyncActor"))

    def async_actor_n_n_async():
        return n_to_n(d("AsyncActor"))

    return {
        "single_client_get_calls": single_client_get_calls,
        "single_client_put_calls": single_client_put_calls,
        "multi_client_put_calls": multi_client_put_calls,
        "put_gigabytes": put_gigabytes,
        "get_gigabytes": get_gigabytes,
        "single_client_tasks_and_get_batch": single_client_tasks_and_get_batch,
        "multi_client_put_gigabytes": multi_client_put_gigabytes,
        "get_object_containing_10k_refs": get_object_containing_10k_refs,
        "single_client_wait_1k_refs": single_client_wait_1k_refs,
        "single_client_wait_1k_refs_one_by_one": single_client_wait_1k_refs_one_by_one,
        "single_client_tasks_sync": single_client_tasks_sync,
        "single_client_tasks_async": single_client_tasks_async,
        "multi_client_tasks_async": multi_client_tasks_async,
        "1_1_actor_calls_sync": actor_1_1_sync,
        "1_1_actor_calls_async": actor_1_1_async,
        "1_1_actor_calls_concurrent": actor_1_1_concurrent,
        "1_n_actor_calls_async": actor_1_n_async,
        "n_n_actor_calls_async": actor_n_n_async,
        "n_n_actor_calls_with_arg_async": actor_n_n_with_arg_async,
        "1_1_async_actor_calls_sync": async_actor_1_1_sync,
        "1_1_async_actor_calls_async": async_actor_1_1_async,
        "1_1_async_actor_calls_with_args_async": async_actor_1_1_with_args_async,
        "1_n_async_actor_calls_async": async_actor_1_n_async,
        "n_n_async_actor_calls_async": async_actor_n_n_async,
    }


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------

def timeit(fn, multiplier, repeat, duration, warmup, on_first_call=None):
    """Warm up (at least one call; includes e.g. actor start), then `repeat`
    trials of >= `duration` seconds each.  Returns the per-trial rates."""
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


def run_case(registry, name, repeat, duration, warmup, on_first_call=None):
    """Set up case `name` from `registry` (build_cases), time it, clean up.
    Returns (rates, setup_seconds); exceptions propagate, after cleanup."""
    cleanup = None
    try:
        t = time.perf_counter()
        fn, multiplier, cleanup = registry[name]()
        setup_s = time.perf_counter() - t
        rates = timeit(fn, multiplier, repeat, duration, warmup, on_first_call)
        return rates, setup_s
    finally:
        fn = None
        if cleanup is not None:
            try:
                cleanup()
            except Exception:
                pass
        gc.collect()


def mean_sd(values):
    """Mean and population standard deviation, as Ray's timeit (np.std)."""
    return statistics.fmean(values), statistics.pstdev(values)


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
    print(line, flush=True)


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

    fresh = [c for c in wanted if c["phase"] == "startup"]
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
        finally:
            zray.shutdown()

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
