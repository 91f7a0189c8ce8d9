"""Ray parity of what runs inside executors (issue 9): ``sys.exit()`` in tasks and actors,
GPU ids in actors, numpy arguments, generators, async actor constructors.

Every test drives real processes on a module-scoped local cluster (4 CPUs, 2 logical
GPUs). The expected behaviour is Ray 2.60's: ``ZRAY_TEST_BACKEND=ray`` runs this module
on Ray; the few checks of zray internals (the store mapping behind an argument) are
skipped there. Waiting is a ``get``/``wait`` with a timeout or a poll with a deadline.
"""

import asyncio
import mmap
import os
import socket
import sys
import threading
import time

import numpy as np
import pytest
from backend import BACKEND, local_cluster, pickle_by_value, ray

# Ship what this module defines by value, as if it were a driver script (see test_actors).
pickle_by_value(__name__)

RayActorError = ray.exceptions.RayActorError
ActorDiedError = ray.exceptions.ActorDiedError
ActorUnavailableError = ray.exceptions.ActorUnavailableError
WorkerCrashedError = ray.exceptions.WorkerCrashedError
RayTaskError = ray.exceptions.RayTaskError


cluster = local_cluster(num_cpus=4, num_gpus=2)


def _wait_for_file(path: str, limit: float = 30.0) -> None:
    """Inside a task: poll until the test creates ``path`` (workload, not a sync sleep)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


# ------------------------------------------------------------------ 1. sys.exit()

def _exit(code):
    if code == "none":
        sys.exit()
    sys.exit(code)


@ray.remote
class Exiter:
    def pid(self):
        return os.getpid()

    def exit(self, code):
        _exit(code)


@ray.remote(max_concurrency=2)
class ThreadedExiter:
    def pid(self):
        return os.getpid()

    def exit(self, code):
        _exit(code)


@ray.remote
class AsyncExiter:
    async def pid(self):
        return os.getpid()

    async def exit(self, code):
        await asyncio.sleep(0)
        _exit(code)


EXITERS = {"sync": Exiter, "threaded": ThreadedExiter, "async": AsyncExiter}


def _skip_async_on_ray(mode):
    if mode == "async" and BACKEND == "ray":
        # Checked: in Ray 2.60 the exiting call of an async actor never returns, and
        # neither does any later call. zray ends the actor as in the other modes.
        pytest.skip("Ray 2.60 hangs on sys.exit() in an async actor")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", sorted(EXITERS))
@pytest.mark.parametrize("code", ["none", 0, 3])
def test_sys_exit_in_an_actor_method_ends_the_actor(cluster, mode, code):
    _skip_async_on_ray(mode)
    a = EXITERS[mode].remote()
    ray.get(a.pid.remote(), timeout=60)
    with pytest.raises(ActorDiedError):
        ray.get(a.exit.remote(code), timeout=60)
    with pytest.raises(ActorDiedError):
        ray.get(a.pid.remote(), timeout=60)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", sorted(EXITERS))
def test_sys_exit_restarts_an_actor_that_may_restart(cluster, mode):
    # Ray: sys.exit() (code None) or a non-zero code is a system error: max_restarts
    # applies; the exiting call is "unavailable" (it may or may not have run).
    _skip_async_on_ray(mode)
    a = EXITERS[mode].options(max_restarts=1).remote()
    first = ray.get(a.pid.remote(), timeout=60)
    with pytest.raises(ActorUnavailableError):
        ray.get(a.exit.remote("none"), timeout=60)
    second = ray.get(a.pid.remote(), timeout=60)
    assert second != first
    # the restart was its last: the next exit is final
    with pytest.raises(ActorDiedError):
        ray.get(a.exit.remote(7), timeout=60)
    with pytest.raises(ActorDiedError):
        ray.get(a.pid.remote(), timeout=60)


@pytest.mark.timeout(120)
def test_sys_exit_zero_is_intentional_and_not_restarted(cluster):
    a = Exiter.options(max_restarts=3).remote()
    ray.get(a.pid.remote(), timeout=60)
    with pytest.raises(ActorDiedError):
        ray.get(a.exit.remote(0), timeout=60)
    with pytest.raises(ActorDiedError):
        ray.get(a.pid.remote(), timeout=60)


@ray.remote
def exiting_task(code, marker_dir):
    with open(os.path.join(marker_dir, f"{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    _exit(code)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", ["none", 0, 2])
def test_sys_exit_in_a_task_is_a_worker_crash(cluster, tmp_path, code):
    with pytest.raises(WorkerCrashedError) as info:
        ray.get(exiting_task.options(max_retries=0).remote(code, str(tmp_path)), timeout=60)
    assert not isinstance(info.value, RayTaskError)  # not an error raised by the task
    assert len(os.listdir(tmp_path)) == 1


@pytest.mark.timeout(120)
def test_sys_exit_in_a_task_is_retried_like_a_crash(cluster, tmp_path):
    with pytest.raises(WorkerCrashedError):
        ray.get(exiting_task.options(max_retries=2).remote("none", str(tmp_path)), timeout=90)
    assert len(os.listdir(tmp_path)) == 3  # the first run and two retries


# ---------------------------------------------------------- 2. GPU ids in actors

def _gpu_view():
    ids = ray.get_gpu_ids()
    ctx = ray.get_runtime_context()
    acc = ctx.get_accelerator_ids().get("GPU") if hasattr(ctx, "get_accelerator_ids") else None
    return ids, os.environ.get("CUDA_VISIBLE_DEVICES"), acc


@ray.remote(num_gpus=1)
class GpuActor:
    def __init__(self):
        self.at_init = _gpu_view()

    def view(self):
        return self.at_init, _gpu_view()


@ray.remote(num_gpus=1, max_concurrency=2)
class ThreadedGpuActor:
    def __init__(self):
        self.at_init = _gpu_view()

    def view(self):
        return self.at_init, _gpu_view()


@ray.remote(num_gpus=1)
class AsyncGpuActor:
    def __init__(self):
        self.at_init = _gpu_view()

    async def view(self):
        return self.at_init, _gpu_view()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cls", [GpuActor, ThreadedGpuActor, AsyncGpuActor],
                         ids=["sync", "threaded", "async"])
def test_get_gpu_ids_in_a_gpu_actor(cluster, cls):
    a = cls.remote()
    for _ in range(3):  # every call, not only the first
        at_init, now = ray.get(a.view.remote(), timeout=60)
        assert at_init == now
        ids, cvd, acc = now
        assert len(ids) == 1 and ids[0] in (0, 1), ids
        assert cvd == str(ids[0])
        if acc is not None:
            assert acc == [str(ids[0])]
    ray.kill(a)


# ------------------------------------------------------------ 3. numpy arguments

SMALL = 10  # elements: inline in the task's message
LARGE = 200_000  # 1.6 MB: through the node's object store


def _array_info(a):
    """(writeable, owns its data, refuses a write, backed by an mmap)"""
    try:
        a[0] = 1
        refused = False
    except ValueError:
        refused = True
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    mapped = isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)
    return bool(a.flags.writeable), bool(a.flags.owndata), refused, mapped


@ray.remote
def arg_info(a, more=(), k=None):
    return [_array_info(x) for x in (a, *more, *([] if k is None else [k]))]


@ray.remote
class ArgActor:
    def info(self, a):
        return _array_info(a)


@pytest.mark.timeout(90)
def test_numpy_arguments_are_read_only_views_as_in_ray(cluster):
    small, large = np.zeros(SMALL), np.zeros(LARGE)
    cases = {
        "small": arg_info.remote(small),
        "large": arg_info.remote(large),
        "mixed": arg_info.remote(small, [large, small], k=large),
        "small ref": arg_info.remote(ray.put(small)),
        "large ref": arg_info.remote(ray.put(large)),
    }
    for name, ref in cases.items():
        for writeable, owndata, refused, _ in ray.get(ref, timeout=60):
            assert (writeable, owndata, refused) == (False, False, True), name
    a = ArgActor.remote()
    for x in (small, large):
        writeable, owndata, refused, _ = ray.get(a.info.remote(x), timeout=60)
        assert (writeable, owndata, refused) == (False, False, True)
    # the caller's arrays are untouched, and results are read-only too
    assert small.flags.writeable and large.flags.writeable
    got = ray.get(ray.put(small))
    assert not got.flags.writeable


@pytest.mark.timeout(90)
@pytest.mark.skipif(BACKEND != "zray", reason="zray's store internals")
def test_large_numpy_argument_is_a_view_of_the_store_mapping(cluster):
    large = np.arange(LARGE, dtype=np.float64)
    for mapped in (arg_info.remote(large), arg_info.remote(np.zeros(SMALL), k=large)):
        assert ray.get(mapped, timeout=60)[-1][3] is True  # no copy: the mmap itself
    assert ray.get(arg_info.remote(np.zeros(SMALL)), timeout=60)[0][3] is False  # inline


# ------------------------------------------------------------------ 4. generators

@ray.remote
def count(n, fail=False):
    for i in range(n):
        yield i
    if fail:
        raise ValueError("generator failed")


@ray.remote
def gated(gate):
    yield "first"
    _wait_for_file(gate)
    yield "second"


@ray.remote(max_retries=0)
def crashing_generator(gate):
    yield 1
    _wait_for_file(gate)  # the caller has item 1 (a message not yet sent dies with us)
    os._exit(1)


@ray.remote
class Streamer:
    def gen(self, n):
        for i in range(n):
            yield i * 10


@ray.remote(max_concurrency=2)
class ThreadedStreamer:
    def gen(self, n):
        for i in range(n):
            yield i * 10


@ray.remote
class AsyncStreamer:
    async def gen(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i * 10

    def sync_gen(self, n):
        for i in range(n):
            yield i * 10


@pytest.mark.timeout(90)
def test_generator_functions_and_methods_stream_by_default(cluster):
    gen = count.remote(3)
    assert isinstance(gen, ray.ObjectRefGenerator)
    assert ray.get(list(gen), timeout=60) == [0, 1, 2]
    for cls in (Streamer, ThreadedStreamer, AsyncStreamer):
        gen = cls.remote().gen.remote(3)
        assert isinstance(gen, ray.ObjectRefGenerator), cls
        assert ray.get(list(gen), timeout=60) == [0, 10, 20], cls
    gen = AsyncStreamer.remote().sync_gen.remote(2)
    assert ray.get(list(gen), timeout=60) == [0, 10]
    # an explicit count still collects the generator into that many returns
    assert ray.get(count.options(num_returns=2).remote(2), timeout=60) == [0, 1]


@pytest.mark.timeout(90)
def test_async_for_over_a_generator_ends_after_the_last_item(cluster):
    async def consume(gen):
        return [await ref async for ref in gen]

    async def both():
        return await asyncio.wait_for(asyncio.gather(
            consume(count.remote(3)), consume(AsyncStreamer.remote().gen.remote(2))), 60)

    assert asyncio.run(both()) == [[0, 1, 2], [0, 10]]


@pytest.mark.timeout(90)
def test_generator_wait_next_ready_completed_is_finished(cluster, tmp_path):
    gate = str(tmp_path / "gate")
    gen = gated.remote(gate)
    ready, _ = ray.wait([gen], timeout=60)
    assert ready == [gen] and gen.next_ready() and not gen.is_finished()
    assert ray.get(next(gen), timeout=60) == "first"
    # the second item waits for the gate: neither it nor the task is ready
    ready, not_ready = ray.wait([gen], timeout=0.3)
    assert ready == [] and not_ready == [gen]
    assert not gen.next_ready()
    assert ray.wait([gen.completed()], timeout=0.1)[0] == []
    open(gate, "w").close()
    ready, _ = ray.wait([gen], timeout=60)
    assert ready == [gen]
    assert ray.get(next(gen), timeout=60) == "second"
    assert ray.get(gen.completed(), timeout=60) is None
    ready, _ = ray.wait([gen], timeout=60)  # ended: next() returns at once
    assert ready == [gen]
    with pytest.raises(StopIteration):
        next(gen)
    assert gen.is_finished() and not gen.next_ready()
    # a mix of refs and generators, in order
    ref, gen2 = ray.put(1), count.remote(1)
    ready, not_ready = ray.wait([gen2, ref], num_returns=2, timeout=60)
    assert ready == [gen2, ref] and not_ready == []


@pytest.mark.timeout(90)
def test_generator_errors_close_and_pickling(cluster, tmp_path):
    gen = count.remote(2, fail=True)
    out = []
    for ref in gen:
        try:
            out.append(ray.get(ref, timeout=60))
        except ValueError as e:  # raised by the generator: its last item
            assert isinstance(e, RayTaskError)
            out.append("error")
    assert out == [0, 1, "error"]
    assert gen.is_finished()
    assert ray.get(gen.completed(), timeout=60) is None  # the task itself returned
    for name in ("close", "send", "throw"):
        with pytest.raises(NotImplementedError):
            getattr(gen, name)(*([] if name == "close" else [None]))
    with pytest.raises(TypeError):
        ray.cloudpickle.dumps(gen)

    # a crash is the last item, and completed() raises it
    gate = str(tmp_path / "gate")
    gen = crashing_generator.remote(gate)
    assert ray.get(next(gen), timeout=60) == 1
    open(gate, "w").close()
    rest = list(gen)
    assert len(rest) == 1
    with pytest.raises(WorkerCrashedError):
        ray.get(rest[0], timeout=60)
    with pytest.raises(WorkerCrashedError):
        ray.get(gen.completed(), timeout=60)


@ray.remote(num_returns="dynamic")
def dynamic(n, fail=False):
    for i in range(n):
        yield np.full(LARGE if i == 0 else 3, i)
    if fail:
        raise KeyError("dynamic failed")


@ray.remote
class DynamicActor:
    @ray.method(num_returns="dynamic")
    def gen(self, n):
        for i in range(n):
            yield i


@pytest.mark.timeout(90)
def test_dynamic_num_returns_gives_one_ref_to_a_generator_of_refs(cluster):
    ref = dynamic.remote(3)
    assert isinstance(ref, ray.ObjectRef)
    value = ray.get(ref, timeout=60)
    assert isinstance(value, ray.DynamicObjectRefGenerator) and len(value) == 3
    arrays = ray.get(list(value), timeout=60)
    assert [a.shape for a in arrays] == [(LARGE,), (3,), (3,)]
    assert [int(a[0]) for a in arrays] == [0, 1, 2]

    refs = list(ray.get(dynamic.remote(1, fail=True), timeout=60))
    assert len(refs) == 2
    assert int(ray.get(refs[0], timeout=60)[0]) == 0
    with pytest.raises(KeyError):
        ray.get(refs[1], timeout=60)

    value = ray.get(DynamicActor.remote().gen.remote(2), timeout=60)
    assert isinstance(value, ray.DynamicObjectRefGenerator)
    assert ray.get(list(value), timeout=60) == [0, 1]


# --------------------------------------------------------------- 5. async actors

async def _answer(reader, writer):
    line = await reader.readline()
    writer.write(b"hello " + line)
    await writer.drain()
    writer.close()


@ray.remote
class AsyncInitServer:
    async def __init__(self, greeting):
        self.greeting = greeting
        self.server = await asyncio.start_server(_answer, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def where(self):
        return self.port, self.greeting, threading.current_thread() is threading.main_thread()


@ray.remote
class SyncInitServer:
    def __init__(self):
        self.started = asyncio.Event()
        self.port = None
        asyncio.get_event_loop().create_task(self.serve())

    async def serve(self):
        self.server = await asyncio.start_server(_answer, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.started.set()

    async def where(self):
        await asyncio.wait_for(self.started.wait(), 30)
        return self.port


def _ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"zray\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
        return data


@pytest.mark.timeout(90)
def test_async_actor_init_starts_a_server_the_driver_can_reach(cluster):
    a = AsyncInitServer.remote("hi")
    port, greeting, on_main = ray.get(a.where.remote(), timeout=60)
    assert greeting == "hi" and not on_main
    assert _ask(port) == b"hello zray\n"
    b = SyncInitServer.remote()
    assert _ask(ray.get(b.where.remote(), timeout=60)) == b"hello zray\n"
    ray.kill(a)
    ray.kill(b)
