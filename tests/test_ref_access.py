"""SUB and task arguments are bound to refs the client holds (issue 10 item 3).

Two drivers on one CLI cluster. Driver A (this process) puts a small and a
store-sized secret. Driver B (a subprocess) learns their ids out of band (the
hex string, not a ref the cluster gave it): ``get`` raises ObjectLostError as
for an id that does not exist, and so does a task it passes the forged ref to.
Then A hands the refs to a named actor, and B gets them from it inside a
value: now B holds refs the cluster gave it, and ``get`` returns the values.
zray-only: Ray has no such check.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import kill_tree, poll_until, wait_gone
from test_cli_cluster import _free_port, _Procs

import zray

DRIVER_B = """
import json, sys
import numpy as np
import zray

@zray.remote
def total(x):
    return int(np.asarray(x).sum()) if not isinstance(x, str) else len(x)

def attempt(fn):
    try:
        return ["ok", fn()]
    except Exception as e:
        return [type(e).__name__, str(e)[:200]]

zray.init(address=sys.argv[1], namespace="shared")
small_hex, big_hex, handed_hex = sys.argv[2], sys.argv[3], sys.argv[4]
forged_small = zray.ObjectRef.from_hex(small_hex)
forged_big = zray.ObjectRef.from_hex(big_hex)
forged_handed = zray.ObjectRef.from_hex(handed_hex)
out = {
    "forged_get_handed": attempt(lambda: zray.get(forged_handed, timeout=30)),
    "forged_get_small": attempt(lambda: zray.get(forged_small, timeout=30)),
    "forged_get_big": attempt(lambda: int(zray.get(forged_big, timeout=30).sum())),
    "forged_task_arg": attempt(lambda: zray.get(total.remote(forged_small), timeout=30)),
}
# (This process caches what it was answered for an id while it holds a ref to it.)
del forged_small, forged_big, forged_handed
box = zray.get_actor("mailbox")
given_small, given_big = zray.get(box.fetch.remote(), timeout=60)
out["given_get_small"] = attempt(lambda: zray.get(given_small, timeout=60))
out["given_get_big"] = attempt(lambda: int(zray.get(given_big, timeout=60).sum()))
out["given_task_arg"] = attempt(lambda: zray.get(total.remote(given_big), timeout=60))
print(json.dumps(out), flush=True)
zray.shutdown()
"""


@zray.remote
class Mailbox:
    def __init__(self):
        self.refs = None

    def store(self, refs):
        self.refs = refs
        return True

    def fetch(self):
        return self.refs

    def make(self):
        return [zray.put("made by the actor")]


@pytest.mark.timeout(180)
def test_a_driver_reads_only_the_refs_it_was_given(tmp_path):
    if zray.is_initialized():
        zray.shutdown()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = _Procs(tmp_path)
    try:
        procs.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(port),
                               "--no-state"])
        procs.start("worker", ["worker", "--address", address, "--num-cpus", "2"])

        def connected():
            procs.check_running()
            try:
                zray.init(address=address, namespace="shared")
                return True
            except ConnectionError:
                return False

        poll_until(connected, 60, interval=0.2, what="the driver to connect")
        try:
            small = zray.put("the secret")
            big = zray.put(np.ones(100_000, dtype=np.int64))  # 800 kB: in the node store
            box = Mailbox.options(name="mailbox").remote()
            assert zray.get(box.store.remote([small, big]), timeout=60)
            # A ref handed to this driver inside a direct call's reply (the second call on
            # the handle goes straight to the actor): bound to this driver, not escaped
            # for anyone who learns its id.
            zray.get(box.make.remote(), timeout=60)
            handed = zray.get(box.make.remote(), timeout=60)[0]
            assert zray.get(handed, timeout=60) == "made by the actor"
            script = tmp_path / "driver_b.py"
            script.write_text(DRIVER_B)
            b = subprocess.run([sys.executable, str(script), address, small.hex(), big.hex(),
                                handed.hex()],
                               capture_output=True, text=True, timeout=150, env=procs.env)
            assert b.returncode == 0, b.stderr[-3000:]
            out = json.loads(b.stdout.strip().splitlines()[-1])
            for key in ("forged_get_small", "forged_get_big", "forged_get_handed"):
                assert out[key][0] == "ObjectLostError", out
                assert "not known to the cluster" in out[key][1], out
            assert out["forged_task_arg"][0] in ("ObjectLostError", "RayTaskError"), out
            assert "ObjectLostError" in out["forged_task_arg"][0] + out["forged_task_arg"][1]
            assert out["given_get_small"] == ["ok", "the secret"], out
            assert out["given_get_big"] == ["ok", 100_000], out
            assert out["given_task_arg"] == ["ok", 100_000], out
            # The owner still reads its own objects.
            assert zray.get(small, timeout=30) == "the secret"
            assert zray.get(handed, timeout=30) == "made by the actor"
        finally:
            zray.shutdown()
    finally:
        everything = procs.descendants()
        procs.kill_all()
        wait_gone(everything, 20)
        for p in everything:
            kill_tree(p.pid)
