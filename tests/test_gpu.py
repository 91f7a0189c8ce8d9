"""Real GPUs: what a ``num_gpus`` task or actor sees on a machine with NVIDIA GPUs.

These tests need an NVIDIA GPU and PyTorch with CUDA, so they are marked ``gpu`` and left
out of the default run (setup.cfg); on a GPU machine run them with

    python -m pytest -m gpu tests/test_gpu.py

Run that way on a machine without a GPU they fail (they never skip): asking for the GPU
tests where there is no GPU is a mistake worth hearing about.

What they check, all against real processes: the embedded cluster finds the machine's GPUs
and its accelerator type; a task or actor that asks for a GPU gets ``CUDA_VISIBLE_DEVICES``
set to its GPU, ``zray.get_gpu_ids()`` agrees, and CUDA inside it sees exactly that device
and computes on it; fractional requests share one device at the same time; a task that asks
for no GPU gets no GPU ids and an unchanged ``CUDA_VISIBLE_DEVICES`` (as Ray 2.x); a request
beyond the machine waits; a CUDA tensor comes back to the driver intact; and on a two-node
CLI cluster a GPU task goes to the node with the GPU.
"""

import json
import os
import time

import pytest
from conftest import poll_until

import zray

pytestmark = pytest.mark.gpu

def _machine_gpus() -> int:
    """The machine's GPUs as zray's node agent counts them (no CUDA_VISIBLE_DEVICES)."""
    from zray._procutil import detect_gpus

    saved = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        return len(detect_gpus())
    finally:
        if saved is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


@pytest.fixture(scope="module")
def torch():
    if _machine_gpus() == 0:
        pytest.fail("the gpu tests need an NVIDIA GPU (zray finds none on this machine)")
    try:
        import torch as _torch
    except ImportError:
        pytest.fail("the gpu tests need PyTorch with CUDA")
    if not _torch.cuda.is_available():
        pytest.fail("PyTorch here cannot use CUDA")
    return _torch


@pytest.fixture(scope="module")
def gpu_cluster(torch):
    """The embedded cluster with what it detects: no num_gpus given."""
    if zray.is_initialized():
        zray.shutdown()
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    zray.init(num_cpus=4)
    try:
        yield zray
    finally:
        zray.shutdown()


@pytest.mark.timeout(60)
def test_embedded_cluster_detects_the_machines_gpus(gpu_cluster, torch):
    res = zray.cluster_resources()
    assert res.get("GPU") == _machine_gpus() == torch.cuda.device_count(), res
    kinds = [k for k in res if k.startswith("accelerator_type:")]
    name = torch.cuda.get_device_name(0)
    assert len(kinds) == 1 and kinds[0].split(":", 1)[1] in name.replace(" ", "-"), (kinds, name)


@pytest.mark.timeout(120)
def test_gpu_task_sees_and_uses_its_gpu(gpu_cluster, torch):
    @zray.remote(num_gpus=1)
    def on_gpu(n):
        import torch as t
        a = t.arange(n * n, dtype=t.float32, device="cuda").reshape(n, n)
        total = float((a @ t.eye(n, device="cuda")).sum().item())
        return {"ids": zray.get_gpu_ids(), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "count": t.cuda.device_count(), "name": t.cuda.get_device_name(0),
                "total": total, "accel": zray.get_runtime_context().get_accelerator_ids()}

    out = zray.get(on_gpu.remote(64), timeout=90)
    assert out["ids"] == [0], out
    assert out["cvd"] == "0", out
    assert out["count"] == 1, out
    assert out["name"] == torch.cuda.get_device_name(0), out
    assert out["total"] == float(sum(range(64 * 64))), out
    assert out["accel"]["GPU"] == ["0"], out


@pytest.mark.timeout(120)
def test_gpu_actor_keeps_its_gpu_and_its_tensors(gpu_cluster, torch):
    @zray.remote(num_gpus=1)
    class Holder:
        def __init__(self):
            import torch as t
            self.x = t.zeros(1000, device="cuda")

        def add(self, v):
            self.x += v
            return (float(self.x.sum().item()), os.environ.get("CUDA_VISIBLE_DEVICES"),
                    zray.get_gpu_ids(), str(self.x.device), os.getpid())

    h = Holder.remote()
    first = zray.get(h.add.remote(1.0), timeout=90)
    second = zray.get(h.add.remote(2.0), timeout=30)
    assert first[0] == 1000.0 and second[0] == 3000.0, (first, second)
    assert first[1] == second[1] == "0" and first[2] == second[2] == [0], (first, second)
    assert first[3] == "cuda:0" and first[4] == second[4]
    zray.kill(h)


@pytest.mark.timeout(120)
def test_fractional_gpu_tasks_share_one_device_at_once(gpu_cluster, torch, tmp_path):
    @zray.remote(num_gpus=0.5)
    def half(me, other):
        import torch as t
        x = t.ones(256, 256, device="cuda")
        open(me, "w").close()
        deadline = time.time() + 60
        while not os.path.exists(other) and time.time() < deadline:
            time.sleep(0.01)
        return (os.path.exists(other), zray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                float((x @ x).sum().item()))

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ra, rb = zray.get([half.remote(a, b), half.remote(b, a)], timeout=100)
    assert ra[0] and rb[0], "the two half-GPU tasks did not run at the same time"
    assert ra[1] == rb[1] == [0] and ra[2] == rb[2] == "0", (ra, rb)
    assert ra[3] == rb[3] == 256.0 * 256 * 256


@pytest.mark.timeout(60)
def test_cpu_task_gets_no_gpu(gpu_cluster):
    @zray.remote
    def plain():
        return zray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    # Ray 2.x leaves CUDA_VISIBLE_DEVICES alone for a task with no GPUs (unset here).
    assert zray.get(plain.remote(), timeout=30) == ([], None)


@pytest.mark.timeout(60)
def test_more_gpus_than_the_machine_has_waits(gpu_cluster):
    @zray.remote(num_gpus=_machine_gpus() + 1)
    def too_many():
        return "never"

    ref = too_many.remote()
    ready, _ = zray.wait([ref], timeout=1.0)
    assert ready == []
    zray.cancel(ref)
    with pytest.raises(zray.exceptions.TaskCancelledError):
        zray.get(ref, timeout=10)


@pytest.mark.timeout(120)
def test_cuda_tensor_returns_to_the_driver(gpu_cluster, torch):
    @zray.remote(num_gpus=1)
    def make():
        import torch as t
        return t.arange(10, device="cuda") * 3

    got = zray.get(make.remote(), timeout=90)
    assert got.is_cuda, got.device
    assert torch.equal(got.cpu(), torch.arange(10) * 3)


@pytest.mark.timeout(180)
def test_gpu_task_goes_to_the_node_with_the_gpu(torch, tmp_path):
    from test_cli_cluster import _free_port, _Procs

    if zray.is_initialized():
        zray.shutdown()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = _Procs(tmp_path)
    procs.env.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        procs.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(port)])
        procs.start("cpu", ["worker", "--address", address, "--num-cpus", "2", "--gpus", "0",
                            "--resources", json.dumps({"cpuonly": 1})])
        procs.start("gpu", ["worker", "--address", address, "--num-cpus", "2"])
        procs.connect_driver(address, 60)
        try:
            def two_alive():
                procs.check_running()
                alive = [n for n in zray.nodes() if n["Alive"]]
                return alive if len(alive) == 2 else None

            alive = poll_until(two_alive, 60, interval=0.1, what="2 alive nodes")
            gpu_node = [n["NodeID"] for n in alive if n["Resources"].get("GPU")]
            cpu_node = [n["NodeID"] for n in alive if n["Resources"].get("cpuonly")]
            assert len(gpu_node) == 1 and len(cpu_node) == 1 and gpu_node != cpu_node, alive

            @zray.remote(num_gpus=1)
            def where():
                import torch as t
                return (zray.get_runtime_context().get_node_id(),
                        os.environ.get("CUDA_VISIBLE_DEVICES"), t.cuda.device_count())

            for node, cvd, count in zray.get([where.remote() for _ in range(4)], timeout=120):
                assert node == gpu_node[0] and cvd == "0" and count == 1, (node, cvd, count)
        finally:
            zray.shutdown()
    finally:
        procs.kill_all()

