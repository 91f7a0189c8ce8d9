"""The object store: large values in shared memory, spilling, transfers between nodes.

Everything runs real processes over real sockets:

* ``local_ray``: an embedded cluster in this process (``zray.init(num_cpus=2)``);
  the driver shares the node's store under ``/dev/shm/zray-<uid>/<node>/``.
* store-limit tests run their driver in a subprocess (a script in tmp_path,
  its own session) with ``object_store_memory`` set, and print JSON results.
* ``two_nodes``: ``zray broker`` plus two ``zray worker``s (custom resources
  nodeA / nodeB) started with the CLI; this process connects as a TCP driver,
  so it has no local store and large objects reach it inline as blobs.

Every test checks that the processes it (or its fixture) started are gone at the end.
"""

import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
from conftest import describe, driver_env, is_alive, poll_until, wait_gone
from test_cli_cluster import _free_port

import zray
from zray import _protocol as P
from zray.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    ObjectReconstructionFailedError,
    ObjectStoreFullError,
)
from zray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

SHM_ROOT = os.path.join(os.environ.get("ZRAY_SHM_DIR") or "/dev/shm", f"zray-{os.getuid()}")
MB = 1_000_000


# --------------------------------------------------------------------- helpers
def _zray_cmd() -> list:
    exe = shutil.which("zray")
    if exe is None:
        sibling = os.path.join(os.path.dirname(sys.executable), "zray")
        if os.access(sibling, os.X_OK):
            exe = sibling
    return [exe] if exe else [sys.executable, "-m", "zray.cli"]


def _in_sessions(sids) -> list:
    """Live processes whose session id is in ``sids`` (children that were reparented
    after their parent exited still carry the session of the process we started)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sids and is_alive(p):
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def _kill_sessions(sids) -> None:
    for p in _in_sessions(sids):
        try:
            p.kill()
        except psutil.Error:
            pass


def _assert_sessions_gone(sids, timeout=15.0) -> None:
    deadline = time.monotonic() + timeout
    left = _in_sessions(sids)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _in_sessions(sids)
    assert left == [], f"processes left behind: {describe(left)}"


def _run_script(tmp_path, source: str, timeout: float = 60) -> dict:
    """Run a driver script in its own session; return the JSON it printed after
    ``RESULT``. Every process of that session is gone when this returns."""
    path = tmp_path / f"driver_{time.monotonic_ns()}.py"
    path.write_text(textwrap.dedent(source))
    # short: the embedded cluster's ipc:// socket path must fit in sun_path (108 bytes)
    zray_tmp = tempfile.mkdtemp(prefix="zt-", dir="/tmp")
    env = driver_env(ZRAY_TMPDIR=zray_tmp)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(tmp_path), env=env,
                            start_new_session=True)
    sid = proc.pid
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_sessions({sid})
            out, err = proc.communicate()
            pytest.fail(f"driver script overran {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
        results = [line[len("RESULT "):] for line in out.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and results, (
            f"driver script failed (rc={proc.returncode})\nstdout:\n{out}\nstderr:\n{err[-5000:]}")
        print(err[-2000:], file=sys.stderr)
        return json.loads(results[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        # the embedded cluster's broker/node die with the driver (PDEATHSIG)
        try:
            _assert_sessions_gone({sid}, timeout=15)
        finally:
            _kill_sessions({sid})
            shutil.rmtree(zray_tmp, ignore_errors=True)


def _node_entry(summary: dict, node_id: str) -> dict:
    for n in summary["nodes"]:
        if n["node_id"] == node_id:
            return n
    raise AssertionError(f"node {node_id} not in memory summary {summary['nodes']}")


def _largest_entry(summary: dict, oid_hex: str):
    for o in summary["largest"]:
        if o["object_id"] == oid_hex:
            return o
    return None


def _churn_refs(make_ref, seconds: float = 3.0, nthreads: int = 4) -> int:
    """Threads that make refs to task results and drop them at random moments while
    the results arrive (some right after a get() that timed out), with the GIL
    handed over every microsecond. Returns how many refs were made."""
    old = sys.getswitchinterval()
    stop = time.monotonic() + seconds
    made = [0] * nthreads
    errors: list = []

    def churn(k):
        rng = random.Random(k)
        try:
            while time.monotonic() < stop:
                refs = [make_ref() for _ in range(4)]
                try:
                    zray.get(refs, timeout=rng.random() * 0.02)
                except GetTimeoutError:
                    pass
                made[k] += len(refs)
                del refs  # the last refs go while their values may be arriving
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=churn, args=(k,)) for k in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    return sum(made)


def _assert_records_back_to(baseline: set, timeout: float = 15.0) -> None:
    """The driver's object table holds nothing but ``baseline`` once the values
    still in flight have arrived (and been dropped: nobody holds a ref to them)."""
    records = zray._runtime.client.records

    def settled():
        return not (set(records) - baseline)

    deadline = time.monotonic() + timeout
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = set(records) - baseline
    assert not left, (f"{len(left)} objects without a live ref still have a record here "
                      f"(table {len(records)}, baseline {len(baseline)})")


# ----------------------------------------------------------- remote functions
@zray.remote
def make_random(n_floats, seed):
    return np.random.default_rng(seed).random(n_floats)


@zray.remote
def digest(x):
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(), x.shape, bool(x.flags.writeable)


@zray.remote
def put_many(n):
    return [zray.put(i) for i in range(n)]


@zray.remote
def arange_i64(n):
    return np.arange(n, dtype=np.int64)


@zray.remote
def zeros_u8(n):
    return np.zeros(n, dtype=np.uint8)


@zray.remote
def random_u8(n, seed):
    return np.frombuffer(np.random.default_rng(seed).bytes(n), dtype=np.uint8)


@zray.remote
def ones_f64(n):
    return np.ones(n)


@zray.remote
def summarize(x):
    return (int(x.sum()), int(x[0]), int(x[-1]), int(x.nbytes),
            zray.get_runtime_context().get_node_id())


@zray.remote
def sample(x):
    """Cheap: a strided checksum, so a timing is mostly the transfer."""
    return int(x.nbytes), int(x[::997].sum(dtype=np.uint64)), zray.get_runtime_context().get_node_id()


# ------------------------------------------------------------ local cluster
@pytest.fixture(scope="module")
def _local_procs():
    """Processes of this module's embedded cluster(s); at the end none may be left."""
    seen: set = set()
    yield seen
    if zray.is_initialized():
        if zray._runtime.cluster is not None:
            seen.update(psutil.Process().children(recursive=True))
        zray.shutdown()
    left = wait_gone(list(seen), 15)
    assert left == [], f"embedded cluster left processes behind: {describe(left)}"


@pytest.fixture
def local_ray(_local_procs):
    """An embedded cluster (num_cpus=2) in this process, shared by the module's
    local tests; re-created if a TCP-driver test disconnected it."""
    if zray.is_initialized() and zray._runtime.cluster is None:
        zray.shutdown()
    if not zray.is_initialized():
        zray.init(num_cpus=2)
    _local_procs.update(psutil.Process().children(recursive=True))
    try:
        yield zray
    finally:
        if zray.is_initialized() and zray._runtime.cluster is not None:
            _local_procs.update(psutil.Process().children(recursive=True))


def _store_dir() -> str:
    node = zray.get_runtime_context().get_node_id()
    assert node, "the driver of an embedded cluster should share the node's store"
    return os.path.join(SHM_ROOT, node)


@pytest.mark.timeout(60)
def test_put_get_large_numpy_and_small_values(local_ray):
    n = 50 * MB // 8
    a = np.random.default_rng(7).integers(0, 2**62, size=n, dtype=np.int64)
    expect = a.copy()
    t0 = time.perf_counter()
    ref = zray.put(a)
    t_put = time.perf_counter() - t0
    a[:] = -1  # changing the original after put must not change the stored object
    t0 = time.perf_counter()
    b = zray.get(ref)
    t_get = time.perf_counter() - t0
    print(f"\n[measure] 50 MB numpy put {t_put * 1000:.1f} ms ({50 / t_put:.0f} MB/s), "
          f"get {t_get * 1000:.2f} ms")
    assert isinstance(b, np.ndarray) and b.dtype == np.int64 and b.shape == (n,)
    assert b.flags.writeable is False
    with pytest.raises(ValueError):
        b[0] = 1
    np.testing.assert_array_equal(b, expect)
    # a second get gives the same (read-only) data
    c = zray.get(ref)
    assert c.flags.writeable is False
    np.testing.assert_array_equal(c, expect)
    assert os.path.exists(os.path.join(_store_dir(), ref.hex()))
    del b, c, ref

    for value in (0, 42, -7, 2**70, 3.5, "text", b"bytes", None, True, (1, 2.5, "x"),
                  {"a": 1, "b": [1, 2, {"c": None}], 3: (4, 5)}, [1, [2, [3]]], set(range(5)),
                  np.arange(10), {"arr": np.ones(3)}):
        got = zray.get(zray.put(value), timeout=10)
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got, value)
        elif isinstance(value, dict) and "arr" in value:
            np.testing.assert_array_equal(got["arr"], value["arr"])
        else:
            assert got == value and type(got) is type(value), (value, got)


@pytest.mark.timeout(60)
def test_task_returns_large_array_consumer_gets_it_and_file_is_freed(local_ray):
    n = 20 * MB // 8
    expect = np.random.default_rng(11).random(n)
    import hashlib

    expect_digest = hashlib.sha256(expect.tobytes()).hexdigest()

    ref = make_random.remote(n, 11)
    out = digest.remote(ref)  # a top-level ref argument: resolved to the value
    got_digest, shape, writeable = zray.get(out, timeout=30)
    assert got_digest == expect_digest and tuple(shape) == (n,)
    assert writeable is False  # in the task too the argument is a read-only view
    value = zray.get(ref, timeout=30)
    np.testing.assert_array_equal(value, expect)
    assert value.flags.writeable is False

    path = os.path.join(_store_dir(), ref.hex())
    poll_until(lambda: os.path.exists(path), 10, what=f"store file {path}")
    assert os.path.getsize(path) >= 20 * MB
    del value, ref, out
    poll_until(lambda: not os.path.exists(path), 15, what=f"store file {path} to be deleted")


@pytest.mark.timeout(90)
def test_store_stays_flat_over_many_puts(local_ray):
    store = _store_dir()
    node = zray.get_runtime_context().get_node_id()
    n = 10_000
    peak_files = 0
    t0 = time.perf_counter()
    for i in range(n):
        ref = zray.put(np.ones(125_000))
        del ref
        if i % 1000 == 999:
            peak_files = max(peak_files, len(os.listdir(store)))
    dt = time.perf_counter() - t0
    print(f"\n[measure] {n} puts of 1 MB (ref dropped each time): {n / dt:.0f} puts/s "
          f"({dt:.2f} s, {n / dt:.0f} MB/s); most files seen in the store dir: {peak_files}")

    def flat():
        nd = _node_entry(zray._api.memory_info(), node)
        files = [f for f in os.listdir(store) if not f.startswith(".")]
        if nd["bytes_in_memory"] < 20 * MB and len(files) < 20:
            return nd, len(files)
        return None

    nd, files = poll_until(flat, 20, interval=0.1, what="the store to drain to < 20 MB")
    print(f"[measure] after the loop: {nd}, {files} files")


@pytest.mark.timeout(60)
def test_get_object_holding_10000_refs(local_ray):
    t0 = time.perf_counter()
    refs = zray.get(put_many.remote(10_000), timeout=60)
    dt = time.perf_counter() - t0
    assert len(refs) == 10_000
    assert all(isinstance(r, zray.ObjectRef) for r in refs[:100])
    assert zray.get([refs[0], refs[1234], refs[-1]], timeout=30) == [0, 1234, 9999]
    assert zray.get(refs[5000], timeout=30) == 5000
    t1 = time.perf_counter()
    assert zray.get(refs, timeout=60) == list(range(10_000))
    print(f"\n[measure] task putting 10,000 refs + get of the list {dt:.2f} s; "
          f"get of all 10,000 inner refs {time.perf_counter() - t1:.2f} s")


# ------------------------------------------------- clusters with a store limit
@pytest.mark.timeout(90)
def test_spilling_keeps_store_under_limit_and_restores_transparently(tmp_path):
    res = _run_script(tmp_path, """
        import json, os, time
        import numpy as np
        import zray

        res = {}
        zray.init(num_cpus=2, object_store_memory=100_000_000)
        try:
            node = zray.get_runtime_context().get_node_id()
            refs = [zray.put(np.full(1_250_000, i, dtype=np.float64)) for i in range(30)]
            deadline = time.monotonic() + 20
            while True:
                m = zray._api.memory_info(top=50)
                nd = [n for n in m["nodes"] if n["node_id"] == node][0]
                if nd["bytes_spilled"] > 0 and nd["bytes_in_memory"] <= 100_000_000:
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            res["node"] = nd
            shm = os.path.join(os.environ.get("ZRAY_SHM_DIR") or "/dev/shm",
                               f"zray-{os.getuid()}", node)
            spill = os.path.join(os.environ["ZRAY_TMPDIR"], "spill", node)
            res["shm_files"] = len([f for f in os.listdir(shm) if not f.startswith(".")])
            res["spill_files"] = len([f for f in os.listdir(spill) if not f.startswith(".")])
            res["spilled_ids"] = [r.hex() for r in refs if os.path.exists(os.path.join(spill, r.hex()))]
            ok = []
            for i, r in enumerate(refs):
                v = zray.get(r, timeout=30)
                ok.append([v.shape == (1_250_000,), bool((v == i).all()), bool(v.flags.writeable)])
            res["values"] = ok

            @zray.remote
            def consume(x):
                return float(x.sum()), float(x[0]), x.shape[0]

            ids = [r.hex() for r in refs]
            idx = ids.index(res["spilled_ids"][0]) if res["spilled_ids"] else 0
            res["consumed_index"] = idx
            res["task"] = zray.get(consume.remote(refs[idx]), timeout=30)
            res["after"] = [n for n in zray._api.memory_info()["nodes"] if n["node_id"] == node][0]
        finally:
            print("RESULT " + json.dumps(res), flush=True)
            zray.shutdown()
    """, timeout=80)
    nd = res["node"]
    size = 10 * MB
    assert nd["bytes_spilled"] > 0, nd
    assert nd["bytes_in_memory"] <= 100 * MB, nd
    assert nd["store_limit"] == 100 * MB, nd
    # every byte is either in memory or spilled (each object ~10 MB plus a header)
    assert 30 * size <= nd["bytes_in_memory"] + nd["bytes_spilled"] <= 30 * size * 1.01, nd
    assert res["spill_files"] >= 1 and res["spilled_ids"], res
    assert res["shm_files"] + res["spill_files"] >= 30, res
    assert res["values"] == [[True, True, False]] * 30, res["values"]
    i = res["consumed_index"]
    assert res["task"] == [float(i) * 1_250_000, float(i), 1_250_000], res
    print(f"\n[measure] spill: {nd}; {res['spill_files']} spill files, {res['shm_files']} in shm")


@pytest.mark.timeout(60)
def test_put_larger_than_store_raises_object_store_full(tmp_path):
    res = _run_script(tmp_path, """
        import json
        import numpy as np
        import zray

        res = {}
        zray.init(num_cpus=1, object_store_memory=50_000_000)
        try:
            try:
                zray.put(np.zeros(10_000_000))  # 80 MB
                res["raised"] = None
                res["client_store_limit"] = zray._runtime.client.info.get("store_limit")
                res["nodes"] = zray._api.memory_info()["nodes"]
            except Exception as e:
                res["raised"] = type(e).__name__
                res["is_store_full"] = isinstance(e, zray.exceptions.ObjectStoreFullError)
                res["is_ray_error"] = isinstance(e, zray.exceptions.RayError)
                res["msg"] = str(e)
            # the cluster is still usable afterwards
            res["after"] = int(zray.get(zray.put(np.ones(1_000_000))).sum())
        finally:
            print("RESULT " + json.dumps(res), flush=True)
            zray.shutdown()
    """, timeout=50)
    assert res["raised"] == "ObjectStoreFullError", res
    assert res["is_store_full"] and res["is_ray_error"], res
    assert re.search(r"\b80(\.\d+)?\s*MB", res["msg"]), res["msg"]
    assert re.search(r"\b50(\.\d+)?\s*MB", res["msg"]), res["msg"]
    assert res["after"] == 1_000_000
    assert issubclass(ObjectStoreFullError, zray.exceptions.RayError)


# ------------------------------------------------ two nodes started by the CLI
class _Cluster:
    """``zray broker`` + ``zray worker``s, each in its own session, output in log files."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs: dict = {}
        self.env = driver_env(ZRAY_TMPDIR=str(tmp_path / "zray-tmp"))
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.node_ids: dict = {}

    def start(self, name, args):
        with open(self.tmp_path / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(_zray_cmd() + args, stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=self.env, start_new_session=True)
        return self.procs[name]

    def start_worker(self, name, resources, cpus=2):
        return self.start(name, ["worker", "--address", self.address, "--num-cpus", str(cpus),
                                 "--resources", json.dumps(resources)])

    def sids(self) -> set:
        return {p.pid for p in self.procs.values()}

    def logs(self) -> str:
        out = []
        for name in self.procs:
            try:
                text = (self.tmp_path / f"{name}.log").read_text(errors="replace")
            except OSError:
                text = ""
            out.append(f"--- {name} ---\n{text[-3000:]}")
        return "\n".join(out)

    def check_running(self, names=None):
        dead = {n: p.returncode for n, p in self.procs.items()
                if (names is None or n in names) and p.poll() is not None}
        assert not dead, f"CLI processes exited early: {dead}\n{self.logs()}"

    def stop(self):
        for name in [n for n in self.procs if n != "broker"] + ["broker"]:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _connect(address: str):
    """Make this process a TCP driver of ``address`` (dropping any other connection)."""
    if zray.is_initialized():
        zray.shutdown()

    def connected():
        try:
            zray.init(address=address)
            return True
        except ConnectionError:
            return False

    poll_until(connected, 30, interval=0.2, what=f"the driver to connect to {address}")


def _wait_nodes(cluster: _Cluster, keys, timeout=30) -> dict:
    def found():
        cluster.check_running()
        by_res = {}
        for n in zray.nodes():
            if n["Alive"]:
                for k in keys:
                    if n["Resources"].get(k):
                        by_res[k] = n["NodeID"]
        return by_res if set(by_res) == set(keys) else None

    return poll_until(found, timeout, interval=0.1, what=f"nodes {keys} alive")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """broker + worker nodeA + worker nodeB (2 CPUs each); this process is a TCP driver."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    cluster = _Cluster(tmp)
    try:
        cluster.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(cluster.port)])
        cluster.start_worker("workerA", {"nodeA": 1})
        cluster.start_worker("workerB", {"nodeB": 1})
        _connect(cluster.address)
        cluster.node_ids = _wait_nodes(cluster, ["nodeA", "nodeB"])
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        if zray.is_initialized() and zray._runtime.cluster is None:
            zray.shutdown()
        cluster.stop()
        try:
            _assert_sessions_gone(cluster.sids(), timeout=15)
        finally:
            _kill_sessions(cluster.sids())


def _logs_on_failure(test):
    """Print the CLI processes' logs when a two-node test fails."""

    @functools.wraps(test)
    def wrapper(tcp_driver, *args, **kwargs):
        try:
            return test(tcp_driver, *args, **kwargs)
        except BaseException:
            print(tcp_driver.logs())
            raise

    return wrapper


@pytest.fixture
def tcp_driver(two_nodes):
    """This process connected over TCP to the two-node cluster (no local store)."""
    if not (zray.is_initialized() and zray._runtime.cluster is None
            and zray._runtime.client.address == two_nodes.address):
        _connect(two_nodes.address)
    assert zray.get_runtime_context().get_node_id() == ""  # no local store
    return two_nodes


@pytest.mark.timeout(120)
@_logs_on_failure
def test_cross_node_large_object_moves_once(tcp_driver):
    node_a, node_b = tcp_driver.node_ids["nodeA"], tcp_driver.node_ids["nodeB"]
    on_a = {"resources": {"nodeA": 0.01}}
    on_b = {"resources": {"nodeB": 0.01}}
    n = 200 * MB // 8
    expect = (n * (n - 1) // 2, 0, n - 1, n * 8)

    ref = arange_i64.options(**on_a).remote(n)
    ready, _ = zray.wait([ref], timeout=60, fetch_local=False)
    assert ready == [ref]
    t0 = time.perf_counter()
    out = zray.get(summarize.options(**on_b).remote(ref), timeout=60)
    dt_first = time.perf_counter() - t0
    assert tuple(out[:4]) == expect and out[4] == node_b, (out, node_b)

    t0 = time.perf_counter()
    outs = zray.get([summarize.options(**on_b).remote(ref) for _ in range(20)], timeout=90)
    dt_20 = time.perf_counter() - t0
    assert all(tuple(o[:4]) == expect and o[4] == node_b for o in outs), outs

    entry = _largest_entry(zray._api.memory_info(top=10), ref.hex())
    assert entry is not None, "the 200 MB object is not among the largest"
    assert sorted(entry["nodes"]) == sorted([node_a, node_b]), entry  # one copy per node
    assert entry["size"] >= 200 * MB, entry

    # the TCP driver has no store: the value is shipped to it as a blob
    t0 = time.perf_counter()
    value = zray.get(ref, timeout=60)
    dt_driver = time.perf_counter() - t0
    assert value.dtype == np.int64 and value.shape == (n,)
    assert np.array_equal(value, np.arange(n, dtype=np.int64))
    del value, ref
    print(f"\n[measure] 200 MB arange int64 A->B first consumer {dt_first:.3f} s "
          f"({200 / dt_first:.0f} MB/s); 20 more consumers on B {dt_20:.3f} s; "
          f"get into the TCP driver {dt_driver:.3f} s ({200 / dt_driver:.0f} MB/s)")

    size = 200 * MB
    rates = {}
    for name, make, args in (("zeros (compressible)", zeros_u8, (size,)),
                             ("random (incompressible)", random_u8, (size, 5))):
        src = make.options(**on_a).remote(*args)
        ready, _ = zray.wait([src], timeout=60, fetch_local=False)
        assert ready == [src]
        t0 = time.perf_counter()
        nbytes, check, node = zray.get(sample.options(**on_b).remote(src), timeout=60)
        dt = time.perf_counter() - t0
        assert nbytes == size and node == node_b
        if make is zeros_u8:
            assert check == 0
        else:
            ref_arr = np.frombuffer(np.random.default_rng(5).bytes(size), dtype=np.uint8)
            assert check == int(ref_arr[::997].sum(dtype=np.uint64))
            del ref_arr
        rates[name] = (dt, size / MB / dt)
        del src
    for name, (dt, rate) in rates.items():
        print(f"[measure] 200 MB {name} A->B consume: {dt:.3f} s, {rate:.0f} MB/s")


@pytest.mark.timeout(60)
@_logs_on_failure
def test_memory_cli_lists_nodes_and_largest_objects(tcp_driver):
    node_a, node_b = tcp_driver.node_ids["nodeA"], tcp_driver.node_ids["nodeB"]
    ref = ones_f64.options(resources={"nodeA": 0.01}).remote(3 * MB // 8)  # 3 MB on node A
    ready, _ = zray.wait([ref], timeout=30, fetch_local=False)
    assert ready == [ref]
    r = subprocess.run(_zray_cmd() + ["memory", "--address", tcp_driver.address],
                       capture_output=True, text=True, timeout=30, env=tcp_driver.env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    print(out)
    for node in (node_a, node_b):
        lines = [ln for ln in out.splitlines() if node in ln]
        assert lines, f"no line for node {node}:\n{out}"
        assert all(w in lines[0] for w in ("objects", "in memory", "spilled")), lines[0]
    assert "Largest objects" in out, out
    line = [ln for ln in out.splitlines() if ref.hex() in ln]
    assert line, f"{ref.hex()} not listed:\n{out}"
    assert "owner" in line[0] and f"pid={os.getpid()}" in line[0], line[0]
    assert node_a[:8] in line[0], line[0]
    del ref


def _remove_worker(cluster, name: str, node_id):
    """Kill a worker started by a test, forget it, and remove the store dir a SIGKILLed
    agent leaves behind."""
    victim = cluster.procs.pop(name)
    if victim.poll() is None:
        victim.kill()
        victim.wait(5)
    _kill_sessions({victim.pid})
    if node_id:
        shutil.rmtree(os.path.join(SHM_ROOT, node_id), ignore_errors=True)


@pytest.mark.timeout(90)
@_logs_on_failure
def test_dropped_refs_keep_no_values_in_a_storeless_driver(tcp_driver):
    # This driver has no store: each value it gets comes as a blob that is unpacked
    # as it arrives, while other threads drop their last refs to those very objects.
    # A value must never outlive its last ref here (it would leak, and stay readable).
    client = zray._runtime.client
    baseline = set(client.records)
    made = _churn_refs(lambda: zeros_u8.remote(200_000), seconds=4.0)
    assert made > 50
    _assert_records_back_to(baseline)


@pytest.mark.timeout(60)
@_logs_on_failure
def test_future_of_a_result_left_in_a_node_store_completes(tcp_driver):
    # Asked for before the result exists; the result then turns out to be in a
    # node's store, not here: the future must still get it moved here.
    ref = zeros_u8.remote(300_000)
    value = ref.future().result(timeout=30)
    assert value.nbytes == 300_000 and not value.any()


@pytest.mark.timeout(90)
@_logs_on_failure
def test_object_lost_when_its_only_node_dies(tcp_driver):
    """Two 5 MB results of a task that is not retryable (max_retries=0) live only on
    node C; its agent is SIGKILLed. ``inflight`` is fetched at once (the broker still
    believes C alive and asks it for the blob); ``late`` is fetched only after the
    broker declared C dead (within NODE_TIMEOUT_S and a little). Both gets must end
    in ObjectReconstructionFailedError (an ObjectLostError) within 30 s of the kill:
    they cannot be rebuilt."""
    victim = tcp_driver.start_worker("workerC", {"nodeC": 1}, cpus=1)
    node_c = None
    try:
        node_c = _wait_nodes(tcp_driver, ["nodeA", "nodeB", "nodeC"])["nodeC"]
        on_c = {"resources": {"nodeC": 0.01}, "max_retries": 0}
        inflight = ones_f64.options(**on_c).remote(5 * MB // 8)
        late = ones_f64.options(**on_c).remote(5 * MB // 8)
        ready, _ = zray.wait([inflight, late], num_returns=2, timeout=30, fetch_local=False)
        assert len(ready) == 2
        summary = zray._api.memory_info(top=10)
        for ref in (inflight, late):
            entry = _largest_entry(summary, ref.hex())
            assert entry is not None and entry["nodes"] == [node_c], entry

        victim_tree = [psutil.Process(victim.pid)] + psutil.Process(victim.pid).children(recursive=True)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(10)
        left = wait_gone(victim_tree, 10)  # its executors die with it (PDEATHSIG)
        assert left == [], describe(left)

        def get_outcome(ref, timeout):
            try:
                return "value", zray.get(ref, timeout=timeout)
            except GetTimeoutError:
                return None
            except ObjectLostError as e:
                assert isinstance(e, ObjectReconstructionFailedError), repr(e)
                assert "not retryable" in str(e), str(e)
                return "lost", e

        first = get_outcome(inflight, 0.5)  # a fetch from C is now in flight
        poll_until(lambda: node_c not in [n["NodeID"] for n in zray.nodes() if n["Alive"]], 30,
                   interval=0.2, what="the broker to declare node C dead")
        declared_after = time.monotonic() - killed_at
        assert declared_after < P.NODE_TIMEOUT_S + 3, (
            f"node C declared dead {declared_after:.1f} s after SIGKILL "
            f"(NODE_TIMEOUT_S={P.NODE_TIMEOUT_S})")

        outcome = get_outcome(late, 10)
        assert outcome is not None and outcome[0] == "lost", (
            f"get() of an object whose only node is dead: {outcome!r}")
        assert late.hex() in str(outcome[1]), str(outcome[1])

        outcome = first
        while outcome is None and time.monotonic() < killed_at + 30:
            outcome = get_outcome(inflight, 1.0)
        print(f"\n[measure] node C declared dead {declared_after:.1f} s after SIGKILL")
        assert outcome is not None, (
            "get() started while node C was dying neither returned nor raised ObjectLostError "
            f"within 30 s of the kill (node declared dead after {declared_after:.1f} s)")
        assert outcome[0] == "lost", f"get() returned a value from a dead node: {outcome!r}"
        assert inflight.hex() in str(outcome[1]), str(outcome[1])
        # the rest of the cluster still works
        assert zray.get(summarize.options(resources={"nodeB": 0.01}).remote(np.arange(10)),
                        timeout=30)[4] == tcp_driver.node_ids["nodeB"]
    finally:
        _remove_worker(tcp_driver, "workerC", node_c)


@zray.remote
def plus_one(x):
    return x + 1


@pytest.mark.timeout(120)
@_logs_on_failure
def test_lost_chain_of_results_is_rebuilt_from_lineage(tcp_driver):
    """A chain of three tasks (retryable, Ray's default max_retries=3) whose 400 KB
    results live only in node C's store; only the last ref is held. C's agent is
    SIGKILLed and ``get`` of the last result starts at once (while the broker still
    believes C alive): the broker reruns the three tasks elsewhere (the lineage of the
    freed intermediate results is kept while the last one lives) and the get returns
    the right value; the tasks' histories show the rebuild (FINISHED -> QUEUED or
    WAITING_ARGS). A result whose argument came from a task with max_retries=0
    cannot be rebuilt: ObjectReconstructionFailedError, naming that argument."""
    victim = tcp_driver.start_worker("workerC", {"nodeC": 1}, cpus=4)  # (room for all)
    node_c = node_d = None
    try:
        node_c = _wait_nodes(tcp_driver, ["nodeA", "nodeB", "nodeC"])["nodeC"]
        on_c = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_c, soft=True)}
        first = ones_f64.options(**on_c).remote(50_000)
        last = plus_one.options(**on_c).remote(plus_one.options(**on_c).remote(first))
        first_task = first.task_id().binary()
        del first
        fragile = ones_f64.options(max_retries=0, **on_c).remote(50_000)
        fragile_hex = fragile.hex()
        bad = plus_one.options(**on_c).remote(fragile)
        del fragile
        ready, _ = zray.wait([last, bad], num_returns=2, timeout=30, fetch_local=False)
        assert len(ready) == 2
        for ref in (last, bad):
            entry = _largest_entry(zray._api.memory_info(top=10), ref.hex())
            assert entry is not None and entry["nodes"] == [node_c], entry
        # queued (no node has "later" yet) with ``last`` counted as there: after the
        # kill it waits for the rebuilt value, and runs once a "later" node joins
        waiter = plus_one.options(resources={"later": 1}).remote(last)
        poll_until(lambda: any(e[1] == "queued" for e in zray._runtime.client.request(
            "task_events", {"id": waiter.task_id().binary()})), 10, what="waiter queued")

        victim_tree = [psutil.Process(victim.pid)] + psutil.Process(victim.pid).children(recursive=True)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(10)
        outcome = {}

        def get_last():
            try:
                outcome["value"] = zray.get(last, timeout=60)
            except BaseException as e:  # reported by the main thread
                outcome["error"] = e
            outcome["after"] = time.monotonic() - killed_at

        getter = threading.Thread(target=get_last, daemon=True)
        getter.start()
        assert wait_gone(victim_tree, 10) == []
        poll_until(lambda: node_c not in [n["NodeID"] for n in zray.nodes() if n["Alive"]], 30,
                   interval=0.2, what="the broker to declare node C dead")
        declared_after = time.monotonic() - killed_at
        getter.join(70)
        assert not getter.is_alive() and "error" not in outcome, outcome
        value, rebuilt_after = outcome["value"], outcome["after"]
        print(f"\n[measure] node C declared dead {declared_after:.1f} s after SIGKILL; "
              f"chain rebuilt and fetched {rebuilt_after:.1f} s after it")
        assert value.shape == (50_000,) and (value == 3).all()
        assert declared_after < P.NODE_TIMEOUT_S + 3
        for tid in (first_task, last.task_id().binary()):
            h = [tuple(e) for e in zray._runtime.client.request("task_events", {"id": tid})]
            rebuilt = [e for e in h if e[0] == "finished"]
            assert len(rebuilt) == 1 and rebuilt[0][2] == "reconstructing lost object", h
            assert h[-1][1] == "finished", h
        entry = _largest_entry(zray._api.memory_info(top=10), last.hex())
        assert entry is not None and node_c not in entry["nodes"], entry
        with pytest.raises(ObjectReconstructionFailedError, match=fragile_hex):
            zray.get(bad, timeout=30)
        h = [tuple(e) for e in zray._runtime.client.request(
            "task_events", {"id": waiter.task_id().binary()})]
        assert ("queued", "waiting_args", "argument lost, being rebuilt") in h, h
        _remove_worker(tcp_driver, "workerC", node_c)  # (dead: out of check_running)
        tcp_driver.start_worker("workerD", {"later": 1}, cpus=1)
        node_d = _wait_nodes(tcp_driver, ["later"])["later"]
        assert (zray.get(waiter, timeout=30) == 4).all()
    finally:
        if "workerC" in tcp_driver.procs:
            _remove_worker(tcp_driver, "workerC", node_c)
        if "workerD" in tcp_driver.procs:
            _remove_worker(tcp_driver, "workerD", node_d)


@zray.remote(max_retries=1)
def sleep_then_node(seconds):
    time.sleep(seconds)
    return zray.get_runtime_context().get_node_id()


@pytest.mark.timeout(90)
@_logs_on_failure
def test_a_task_on_a_dying_node_is_queued_again(tcp_driver):
    """A task running on node D when D is SIGKILLed goes back to the queue
    (running -> queued, the reason naming the node) and runs again where it can."""
    victim = tcp_driver.start_worker("workerD", {"nodeD": 1}, cpus=1)
    node_d = None
    try:
        node_d = _wait_nodes(tcp_driver, ["nodeA", "nodeB", "nodeD"])["nodeD"]
        ref = sleep_then_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_d, soft=True)).remote(3)
        client = zray._runtime.client

        def events():
            return [tuple(e) for e in client.request("task_events", {"id": ref.task_id().binary()})]

        poll_until(lambda: events()[-1:] and events()[-1][1] == "running", 30,
                   what="the task to run on node D")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        assert zray.get(ref, timeout=60) in (tcp_driver.node_ids["nodeA"],
                                             tcp_driver.node_ids["nodeB"])
        h = events()
        assert [to for _, to, _ in h] == ["queued", "running", "queued", "running", "finished"], h
        assert node_d in h[2][2] and "died" in h[2][2], h
    finally:
        _remove_worker(tcp_driver, "workerD", node_d)


@pytest.mark.timeout(60)
def test_freed_files_are_recycled_but_never_under_a_live_view(local_ray):
    # A view from get() must keep its bytes even after its object is freed and
    # the store recycles freed files for new puts of the same size.
    kept = zray.get(zray.put(np.full(1_000_000, 7.0)))
    ref = zray.put(np.full(1_000_000, 3.0))
    del ref  # freed: its file may be recycled, nobody maps it
    store = zray._runtime.client.store
    for i in range(50):
        r = zray.put(np.full(1_000_000, float(i)))
        assert zray.get(r)[0] == float(i)
        del r
    assert (kept == 7.0).all()
    deadline = time.time() + 10
    while not os.listdir(store.free_dir) and time.time() < deadline:
        time.sleep(0.05)
    assert os.listdir(store.free_dir), "freed files should be kept for reuse"


def _store_files(store) -> set:
    # Objects only: not the free list, temporaries, or clients' direct-result sockets (c-<cid>)
    # and result lanes (r-<cid>: zray/_resultlane.py) and lease lanes (t-<cid>: workerd/lease.py),
    # which appear whenever an executor starts.
    return {n for n in os.listdir(store.dir) if not n.startswith((".", "c-", "r-", "t-"))
            and n != "free"
            and not n.endswith(".tmp")}


def _wait_files(store, want, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if want(_store_files(store)):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(60)
def test_refs_inside_objects_keep_their_targets_then_everything_is_freed(local_ray):
    store = zray._runtime.client.store
    before = _store_files(store)
    inner = zray.put(np.full(500_000, 5.0))  # 4 MB: in the store
    inner_file = inner.hex()
    outer = zray.put([inner])
    del inner  # only the outer object still refers to it
    assert _wait_files(store, lambda f: inner_file in f)
    got = zray.get(zray.get(outer)[0])
    assert got[0] == 5.0
    del got
    del outer  # the last reference anywhere: the inner object goes too
    assert _wait_files(store, lambda f: inner_file not in f and f <= before | set()), \
        "inner object should be freed once nothing refers to it"


@pytest.mark.timeout(60)
def test_refs_made_in_a_task_live_while_the_driver_holds_them(local_ray):
    @zray.remote
    def make():
        return [zray.put(np.full(300_000, float(i))) for i in range(3)]

    refs = zray.get(make.remote())  # the task (their owner) is long done
    store = zray._runtime.client.store
    files = {r.hex() for r in refs}
    assert _wait_files(store, lambda f: files <= f)
    assert [zray.get(r)[0] for r in refs] == [0.0, 1.0, 2.0]

    @zray.remote
    def total(lst):
        return sum(float(zray.get(r).sum()) for r in lst)

    assert zray.get(total.remote(refs)) == 300_000 * 3.0  # nested refs borrowed by a task
    del refs
    assert _wait_files(store, lambda f: not (files & f)), "borrowed objects should be freed"


@pytest.mark.timeout(60)
def test_dropped_refs_keep_no_values_in_the_driver(local_ray):
    # Small results come inline and large ones through the node's store, while
    # other threads drop their last refs to them.
    client = zray._runtime.client
    baseline = set(client.records)
    made = _churn_refs(lambda: zeros_u8.remote(random.choice([100, 200_000])), seconds=3.0)
    assert made > 50
    _assert_records_back_to(baseline)
