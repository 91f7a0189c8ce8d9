"""The microbenchmark's cases: their catalogue, their workloads and how they are timed.

Shared by ``zray microbenchmark`` (benchmarks/microbenchmark.py) and by
``benchmarks/compare_ray.py``, whose runner loads this file *by path* under
Ray's interpreter, where zray (and this package) is not importable.  Hence:

* nothing here imports zray, ray or numpy at module level, nor any other file
  of this package: every workload takes the Ray-like module as its ``ray``
  argument;
* remote functions and actor classes are defined inside functions, and use
  only their closure (``ray``, sizes, one another) and builtins, never this
  module's globals, so both runtimes ship them to workers by value.

::

    build_cases(ray) -> {case name: setup()}        one entry per steady case
    run_case(cases, name, ...): setup() -> (fn, multiplier, cleanup)
                                timeit(fn): warm up, then `repeat` timed trials
                                cleanup()
"""

from __future__ import annotations

import gc
import os
import statistics
import time

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
#
# Each case is a setup(): it starts what the case needs (actors, a put object)
# and returns (fn, multiplier, cleanup); the rate reported is multiplier *
# calls of fn / seconds.  The setups run in the driver only.
# --------------------------------------------------------------------------

def build_cases(ray, *, n_calls=N_CALLS, large_mb=LARGE_MB, multi_put_mb=MULTI_PUT_MB,
                n_actors=None):
    """name -> setup() for every steady case; `ray` is the runtime module
    (ray, or zray imported as ray)."""
    bench = _Bench(ray, n_calls, large_mb, multi_put_mb, n_actors or default_n_actors())
    cases = {}
    for group in (_object_cases, _large_object_cases, _task_cases, _actor_cases,
                  _async_actor_cases):
        cases.update(group(bench))
    return cases


class _Bench:
    """What the setups share: the runtime module, the sizes, and the remote
    functions and actor classes, each defined on first use (``remote(name)``)
    so that a runtime that cannot define (say) asyncio actors fails only the
    cases that need them."""

    clients = 4  # in "multi client tasks async" and the n:n cases, as in Ray

    def __init__(self, ray, n_calls, large_mb, multi_put_mb, n_actors):
        self.ray = ray
        self.n_calls = n_calls
        self.large_mb = large_mb
        self.n_actors = n_actors
        self._makers = {**_define_functions(ray, multi_put_mb),
                        **_define_actors(ray, self.remote)}
        self._defined = {}

    def remote(self, name):
        if name not in self._defined:
            self._defined[name] = self._makers[name]()
        return self._defined[name]

    def batch_of(self, call):
        """fn() that submits n_calls of call() and gets them all."""
        def fn():
            self.ray.get([call() for _ in range(self.n_calls)])
        return fn

    def kill_all(self, *handles):
        """cleanup() that kills the given actors."""
        def cleanup():
            for h in handles:
                try:
                    self.ray.kill(h)
                except Exception:
                    pass
        return cleanup

    def large_array(self):
        """(array, nbytes): an int64 numpy array of large_mb MiB (bytes without numpy)."""
        nbytes = self.large_mb * 1024 * 1024
        try:
            import numpy as np
        except ImportError:
            return bytes(nbytes), nbytes
        return np.zeros(nbytes // 8, dtype=np.int64), nbytes


def _noop():
    return None


def _define_functions(ray, multi_put_mb):
    """name -> maker of each remote function the cases use."""
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

    def define_work():
        @ray.remote
        def work(actors, n):
            k = len(actors)
            ray.get([actors[i % k].small_value.remote() for i in range(n)])
        return work

    return {"small_value": define_small_value, "do_put_small": define_do_put_small,
            "do_put": define_do_put, "work": define_work,
            "create_object_containing_ref": define_create_object_containing_ref}


def _define_actors(ray, remote):
    """name -> maker of each actor class the cases use; remote(name) gives the
    remote functions they call."""
    def define_actor():
        small_value = remote("small_value")

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

    return {"Actor": define_actor, "AsyncActor": define_async_actor, "Client": define_client}


def _object_cases(b):
    """Small objects: put and get from the driver and from tasks."""
    ray = b.ray

    def single_client_get_calls():
        value = ray.put(0)
        return (lambda: ray.get(value)), 1, _noop

    def single_client_put_calls():
        return (lambda: ray.put(0)), 1, _noop

    def multi_client_put_calls():
        do_put_small = b.remote("do_put_small")

        def fn():
            ray.get([do_put_small.remote() for _ in range(10)])
        return fn, 1000, _noop

    def get_object_containing_10k_refs():
        create_object_containing_ref = b.remote("create_object_containing_ref")
        obj = create_object_containing_ref.remote()
        ray.wait([obj])

        def fn():
            ray.get(obj)
        return fn, 1, _noop

    return {"single_client_get_calls": single_client_get_calls,
            "single_client_put_calls": single_client_put_calls,
            "multi_client_put_calls": multi_client_put_calls,
            "get_object_containing_10k_refs": get_object_containing_10k_refs}


def _large_object_cases(b):
    """Large numpy arrays: put and get rates in GB/s."""
    ray = b.ray

    def put_gigabytes():
        arr, nbytes = b.large_array()

        def fn():
            ray.put(arr)
        return fn, nbytes / 1e9, _noop

    def get_gigabytes():
        arr, nbytes = b.large_array()
        ref = ray.put(arr)
        del arr

        def fn():
            out = ray.get(ref)
            del out
        return fn, nbytes / 1e9, _noop

    def multi_client_put_gigabytes():
        do_put, nbytes = b.remote("do_put")

        def fn():
            ray.get([do_put.remote() for _ in range(10)])
        return fn, 10 * 10 * nbytes / 1e9, _noop

    return {"put_gigabytes": put_gigabytes, "get_gigabytes": get_gigabytes,
            "multi_client_put_gigabytes": multi_client_put_gigabytes}


def _task_cases(b):
    """Tiny tasks: submitted and gathered one by one, in batches, with wait."""
    ray, n_calls = b.ray, b.n_calls

    def single_client_tasks_sync():
        small_value = b.remote("small_value")
        return (lambda: ray.get(small_value.remote())), 1, _noop

    def single_client_tasks_async():
        return b.batch_of(b.remote("small_value").remote), n_calls, _noop

    def single_client_tasks_and_get_batch():
        return b.batch_of(b.remote("small_value").remote), 1, _noop

    def single_client_wait_1k_refs():
        small_value = b.remote("small_value")

        def fn():
            refs = [small_value.remote() for _ in range(1000)]
            ready, _ = ray.wait(refs, num_returns=1000)
            assert len(ready) == 1000
        return fn, 1, _noop

    def single_client_wait_1k_refs_one_by_one():
        small_value = b.remote("small_value")

        def fn():
            not_ready = [small_value.remote() for _ in range(1000)]
            # as Ray: fetch_local once per object is enough
            fetch_local = True
            for _ in range(1000):
                _ready, not_ready = ray.wait(not_ready, fetch_local=fetch_local)
                fetch_local = False
        return fn, 1, _noop

    def multi_client_tasks_async():
        actors = [b.remote("Actor").remote() for _ in range(b.clients)]

        def fn():
            ray.get([a.small_value_batch.remote(n_calls) for a in actors])
        return fn, n_calls * b.clients, b.kill_all(*actors)

    return {"single_client_tasks_sync": single_client_tasks_sync,
            "single_client_tasks_async": single_client_tasks_async,
            "single_client_tasks_and_get_batch": single_client_tasks_and_get_batch,
            "single_client_wait_1k_refs": single_client_wait_1k_refs,
            "single_client_wait_1k_refs_one_by_one": single_client_wait_1k_refs_one_by_one,
            "multi_client_tasks_async": multi_client_tasks_async}


def _one_to_n(b, actor_class):
    """One client actor calls each of n_actors servers n_calls times."""
    servers = [actor_class.remote() for _ in range(b.n_actors)]
    client = b.remote("Client").remote(servers)

    def fn():
        b.ray.get(client.small_value_batch.remote(b.n_calls))
    return fn, b.n_calls * b.n_actors, b.kill_all(client, *servers)


def _n_to_n(b, actor_class):
    """`clients` tasks each make n_calls calls spread over n_actors actors."""
    work = b.remote("work")
    actors = [actor_class.remote() for _ in range(b.n_actors)]

    def fn():
        b.ray.get([work.remote(actors, b.n_calls) for _ in range(b.clients)])
    return fn, b.clients * b.n_calls, b.kill_all(*actors)


def _actor_cases(b):
    """Calls on sync actors: 1:1, 1:n, n:n."""
    ray, n_calls = b.ray, b.n_calls

    def actor_1_1_sync():
        a = b.remote("Actor").remote()
        return (lambda: ray.get(a.small_value.remote())), 1, b.kill_all(a)

    def actor_1_1_async():
        a = b.remote("Actor").remote()
        return b.batch_of(a.small_value.remote), n_calls, b.kill_all(a)

    def actor_1_1_concurrent():
        a = b.remote("Actor").options(max_concurrency=16).remote()
        return b.batch_of(a.small_value.remote), n_calls, b.kill_all(a)

    def actor_n_n_with_arg_async():
        Actor, Client = b.remote("Actor"), b.remote("Client")
        servers = [Actor.remote() for _ in range(b.n_actors)]
        clients = [Client.remote(s) for s in servers]

        def fn():
            ray.get([c.small_value_batch_arg.remote(n_calls) for c in clients])
        return fn, n_calls * len(clients), b.kill_all(*clients, *servers)

    return {"1_1_actor_calls_sync": actor_1_1_sync,
            "1_1_actor_calls_async": actor_1_1_async,
            "1_1_actor_calls_concurrent": actor_1_1_concurrent,
            "1_n_actor_calls_async": lambda: _one_to_n(b, b.remote("Actor")),
            "n_n_actor_calls_async": lambda: _n_to_n(b, b.remote("Actor")),
            "n_n_actor_calls_with_arg_async": actor_n_n_with_arg_async}


def _async_actor_cases(b):
    """Calls on asyncio actors (async def methods): 1:1, 1:n, n:n."""
    ray, n_calls = b.ray, b.n_calls

    def async_actor_1_1_sync():
        a = b.remote("AsyncActor").remote()
        return (lambda: ray.get(a.small_value.remote())), 1, b.kill_all(a)

    def async_actor_1_1_async():
        a = b.remote("AsyncActor").remote()
        return b.batch_of(a.small_value.remote), n_calls, b.kill_all(a)

    def async_actor_1_1_with_args_async():
        a = b.remote("AsyncActor").remote()

        def fn():
            ray.get([a.small_value_with_arg.remote(i) for i in range(n_calls)])
        return fn, n_calls, b.kill_all(a)

    return {"1_1_async_actor_calls_sync": async_actor_1_1_sync,
            "1_1_async_actor_calls_async": async_actor_1_1_async,
            "1_1_async_actor_calls_with_args_async": async_actor_1_1_with_args_async,
            "1_n_async_actor_calls_async": lambda: _one_to_n(b, b.remote("AsyncActor")),
            "n_n_async_actor_calls_async": lambda: _n_to_n(b, b.remote("AsyncActor"))}

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

