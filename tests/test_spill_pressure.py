"""A node under spill pressure: many large puts into a small object store.

The issue's run (10,000 puts of 1 MB into a 2 GB store) used to get the node
declared dead within 10 s (its agent spilled on its message loop and missed
heartbeats) and shared memory peaked at 3.5x the store's limit (nothing slowed
the puts down). Here the same run at CI size, and the issue's size marked slow:
the node stays alive the whole time, the node's shared memory stays within the
limit plus a stated slack, and every value comes back identical.

Each run is a driver script in its own session (``_run_script``); a thread in
the driver samples the bytes of the node's shared-memory dir while it puts.
"""

import msgpack
import pytest
from test_objects import _run_script

from zray import _protocol as P

MB = 1_000_000

SCRIPT = """
    import json, os, threading, time
    import numpy as np
    import zray

    LIMIT, N, SIZE = {limit}, {n}, {size}
    res = {{}}
    zray.init(num_cpus=1, object_store_memory=LIMIT)
    try:
        node = zray.get_runtime_context().get_node_id()
        shm = os.path.join(os.environ.get("ZRAY_SHM_DIR") or "/dev/shm", f"zray-{{os.getuid()}}", node)

        def shm_bytes():
            total = 0
            for root, _dirs, files in os.walk(shm):
                for f in files:
                    try:
                        total += os.stat(os.path.join(root, f)).st_blocks * 512
                    except OSError:
                        pass
            return total

        peak = [0]
        dead = []
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], shm_bytes())
                if not all(n["Alive"] for n in zray.nodes()):
                    dead.append(time.monotonic())
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def value(i):
            return np.random.default_rng(i).integers(0, 256, SIZE, dtype=np.uint8)

        t0 = time.monotonic()
        refs = [zray.put(value(i)) for i in range(N)]
        res["put_s"] = time.monotonic() - t0
        done.set()
        sampler.join()
        res["peak_shm"] = peak[0]
        res["dead_seen"] = len(dead)
        res["nodes_alive"] = [n["Alive"] for n in zray.nodes()]
        info = [n for n in zray._api.memory_info()["nodes"] if n["node_id"] == node][0]
        res["spilled"] = info["bytes_spilled"]
        bad = [i for i, r in enumerate(refs) if not np.array_equal(zray.get(r, timeout=60), value(i))]
        res["bad"] = bad[:20]

        @zray.remote
        def checksum(x):
            return int(x.astype(np.uint64).sum())

        # a task reads a spilled value too (the executor restores it from disk)
        res["task_ok"] = zray.get(checksum.remote(refs[0]), timeout=60) == int(
            value(0).astype(np.uint64).sum())
        res["nodes_alive_end"] = [n["Alive"] for n in zray.nodes()]
    finally:
        print("RESULT " + json.dumps(res), flush=True)
        zray.shutdown()
"""

def _check(res, limit, n, size):
    print(f"\n[measure] {n} puts of {size / MB:.0f} MB into {limit / MB:.0f} MB: "
          f"{res.get('put_s', 0):.1f} s, peak shm {res.get('peak_shm', 0) / MB:.1f} MB, "
          f"spilled {res.get('spilled', 0) / MB:.0f} MB, node-dead samples {res.get('dead_seen')}")
    assert res["dead_seen"] == 0 and all(res["nodes_alive"]) and all(res["nodes_alive_end"]), res
    assert res["spilled"] >= (n * size - limit) * 0.9, res
    # Slack over the limit: the object each writer is writing at that moment, and the
    # page rounding of every file in memory (the store counts bytes, tmpfs pages).
    slack = 2 * size + (limit // size + 4) * 4096
    assert res["peak_shm"] <= limit + slack, res
    assert res["bad"] == [], res
    assert res["task_ok"], res


@pytest.mark.timeout(240)
def test_node_under_spill_pressure_stays_alive_and_within_limit(tmp_path):
    limit, n, size = 40 * MB, 400, MB
    res = _run_script(tmp_path, SCRIPT.format(limit=limit, n=n, size=size), timeout=220)
    _check(res, limit, n, size)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_issue_spill_run_10000_puts_of_1mb_into_2gb(tmp_path):
    limit, n, size = 2000 * MB, 10_000, MB
    res = _run_script(tmp_path, SCRIPT.format(limit=limit, n=n, size=size), timeout=1700)
    _check(res, limit, n, size)


@pytest.mark.timeout(10)
def test_need_space_takes_only_a_byte_count():
    assert P.decode(P.encode(P.NeedSpace(5 * MB))) == P.NeedSpace(5 * MB)
    for bad in (-1, 1 << 62, True, 1.5, b"1", None):
        with pytest.raises(P.ProtocolError):
            P.decode(msgpack.packb([P.Msg.NEED_SPACE, bad]))
