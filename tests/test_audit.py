"""What an attacker with a connection (or a local user) tried against today's surfaces,
each on a real cluster: log reads through symlinks and FIFOs planted in a log dir, a
dashboard held by connections that never finish a request or announce a negative
body, and metric reports too big for the broker to keep."""

import os
import socket
import time
import urllib.error
import urllib.request

import pytest
from conftest import poll_until

import zray


@pytest.fixture(scope="module")
def cluster():
    if zray.is_initialized():
        zray.shutdown()
    zray.init(num_cpus=1)
    try:
        yield zray._runtime.client
    finally:
        zray.shutdown()


@zray.remote
def square(x):
    return x * x


def _node(client):
    dirs = client.request("log_dirs", timeout=30)
    return dirs["nodes"][0]["node_id"], dirs["nodes"][0]["log_dir"], dirs["broker"]["log_dir"]


def _logs(client, node_hex, op, args):
    return client.request("node_logs", {"node_id": node_hex, "op": op, "args": args},
                          timeout=30)


@pytest.mark.timeout(120)
def test_log_reads_never_follow_symlinks_nor_block_on_fifos(cluster, tmp_path):
    node_hex, node_dir, broker_dir = _node(cluster)
    secret = tmp_path / "secret.txt"
    secret.write_text(":task_name:abcd x\nTOP SECRET LINE\n")
    planted = []
    try:
        for d in {node_dir, broker_dir}:  # one folder in a local cluster
            for name in ("executor-planted.log", "planted.log"):
                os.symlink(secret, os.path.join(d, name))
                planted.append(os.path.join(d, name))
            os.mkfifo(os.path.join(d, "fifo.log"), 0o600)
            planted.append(os.path.join(d, "fifo.log"))
        for where in (node_hex, ""):  # a node (relayed LOG_READ) and the broker itself
            # A task's lines are searched in a node's executor logs (on its log thread): a
            # symlinked one is skipped. The broker does no such search on its own loop.
            if where:
                found = _logs(cluster, where, "task", {"task_id": "abcd"})
                assert "SECRET" not in found["text"] and found["files"] == [], found
            else:
                with pytest.raises(ValueError, match="give its node_id"):
                    _logs(cluster, where, "task", {"task_id": "abcd"})
            for op in ("tail", "read"):
                with pytest.raises(ValueError, match="planted.log is a symbolic link"):
                    _logs(cluster, where, op, {"name": "planted.log"})
                # Opening a FIFO for reading would wait for a writer forever.
                with pytest.raises(ValueError, match="fifo.log is not a regular file"):
                    _logs(cluster, where, op, {"name": "fifo.log"})
            listing = _logs(cluster, where, "list", {})
            assert not {"planted.log", "fifo.log"} & {f[0] for f in listing["files"]}
        assert zray.nodes()[0]["Alive"]
        assert zray.get(square.remote(7), timeout=60) == 49  # the node still works
    finally:
        for p in planted:
            os.unlink(p)


@pytest.mark.timeout(120)
def test_dashboard_frees_threads_of_silent_connections(cluster):
    """POOL connections that never send a request held every thread of the dashboard
    (token or not): now each is closed after its idle timeout."""
    from zray.dashboard.server import POOL, DashboardServer

    dash = DashboardServer(cluster.address, port=0, idle_timeout=1.0)
    dash.start()
    silent = []
    try:
        for _ in range(POOL + 2):
            silent.append(socket.create_connection((dash.host, dash.port), timeout=30))

        def version():
            req = urllib.request.Request(dash.url + "/api/version",
                                         headers={"Authorization": "Bearer " + dash.token})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        poll_until(version, 60, interval=0.2, what="the dashboard to answer")
        # Content-Length: -1 would have read until the client closed, unbounded.
        with socket.create_connection((dash.host, dash.port), timeout=30) as s:
            s.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + dash.token.encode() + b"\r\nContent-Length: -1\r\n\r\n{")
            reply = b""
            while chunk := s.recv(65536):  # the dashboard closes this connection
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400") and b"Content-Length must be" in reply
        deep = urllib.request.Request(dash.url + "/api/jobs", data=b"[" * 200_000,
                                      method="POST",
                                      headers={"Authorization": "Bearer " + dash.token})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(deep, timeout=30)
        assert refused.value.code == 400 and b"not JSON" in refused.value.read()
        with pytest.raises(ValueError, match="idle_timeout"):
            DashboardServer(cluster.address, port=0, idle_timeout=-1)
    finally:
        for s in silent:
            s.close()
        dash.stop()
        dash.close()


@pytest.mark.timeout(120)
def test_metric_reports_are_bounded(cluster):
    from brokerd.metrics import MAX_REPORT_COST, UserMetrics

    tags = "t" * 1000
    # 500 metrics x 1000 samples x 20 tags of 1000 characters passed every field check:
    # about 10 GB kept by the broker per connection. Now the size is checked too.
    keys = [f"k{i}" for i in range(20)]
    huge = [[f"m{m}", "gauge", "", keys, [[[tags] * 20, 1.0] for _ in range(1000)], []]
            for m in range(3)]
    t = time.monotonic()
    with pytest.raises(ValueError, match="the report is too big"):
        cluster.request("metrics_report", {"series": huge}, timeout=60)
    ok = [["fine", "counter", "", ["k"], [[["v"], 2.0]], []]]
    assert cluster.request("metrics_report", {"series": ok}, timeout=30) is True
    mine = [u for u in cluster.request("metrics", timeout=30)["user"]
            if u[2] and u[2][0][0] == "fine"]
    assert mine and mine[-1][2] == ok, mine
    assert time.monotonic() - t < 60
    # Many reporters: the oldest are forgotten once all reports together are too big.
    store = UserMetrics(max_procs=512, max_cost=3 * MAX_REPORT_COST)
    for i in range(10):
        store.put(bytes([i]) * 8, ok, MAX_REPORT_COST)
    assert len(store.reports) == 3 and store.cost == 3 * MAX_REPORT_COST
    assert [r[0] for r in store.all()] == [(bytes([i]) * 8).hex() for i in (7, 8, 9)]


@pytest.mark.timeout(120)
def test_state_rows_read_as_in_rays_docs(cluster):
    """Ray's rows are dataclasses that also read as dicts: ``list_actors()[0].state``
    and ``row["state"]`` both work; address="auto" from the driver of an init() cluster
    (no address file) asks that cluster, as Ray finds the running one."""
    import json

    from zray.util.state import get_actor, list_actors, list_tasks

    @zray.remote
    class Doc:
        def ping(self):
            return 1

    a = Doc.options(name="audit_doc").remote()
    assert zray.get(a.ping.remote(), timeout=60) == 1
    rows = list_actors(filters=[("class_name", "=", "Doc")])
    assert [(r.state, r.name) for r in rows] == [("ALIVE", "audit_doc")]
    assert rows[0]["state"] == rows[0].state and rows[0].asdict() == dict(rows[0])
    assert json.loads(json.dumps(rows))[0]["name"] == "audit_doc"
    assert get_actor(id=rows[0].actor_id).class_name == "Doc"
    with pytest.raises(AttributeError, match="no column 'colour'"):
        _ = rows[0].colour
    from zray._procutil import user_tmp_dir

    # (Another cluster's address file, from a `zray start` running beside, wins.)
    if not os.environ.get("ZRAY_ADDRESS") and not os.path.exists(
            os.path.join(user_tmp_dir(), "address")):
        assert any(t.name == "Doc.ping" for t in list_tasks(address="auto", limit=1000))
    zray.kill(a)


@zray.remote
def _files_here():
    found = []
    for root, _dirs, files in os.walk("."):
        found += [os.path.join(root, f) for f in files]
    return sorted(found)


def _zip(path, entries):
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return str(path)


@pytest.mark.timeout(180)
def test_zip_slip_in_a_working_dir_stays_in_the_nodes_cache(cluster, tmp_path):
    """A user's .zip as working_dir is unpacked by the node: entries that climb out
    (``../``, absolute, through a symlink entry) fail the task's runtime_env setup and
    write nothing outside the node's package cache."""
    target = tmp_path / "outside"
    target.mkdir()
    escapes = {
        "dotdot": [(f"../../../../../../..{target}/escaped_dotdot", "x", 0o100644)],
        "absolute": [(f"{target}/escaped_abs", "x", 0o100644)],
        "middle": [(f"a/../../../../../../..{target}/escaped_mid", "x", 0o100644)],
        "symlink": [("link", str(target), 0o120777), ("link/escaped_sym", "x", 0o100644)],
    }
    for name, entries in escapes.items():
        z = _zip(tmp_path / f"{name}.zip", entries)
        with pytest.raises(zray.exceptions.RuntimeEnvSetupError):
            zray.get(_files_here.options(runtime_env={"working_dir": z}).remote(), timeout=120)
    assert list(target.iterdir()) == []
    # A setuid bit in the zip is not kept; the files are the owner's only.
    z = _zip(tmp_path / "suid.zip", [("run.sh", "#!/bin/sh\n", 0o104777)])
    assert zray.get(_mode.options(runtime_env={"working_dir": z}).remote("run.sh"),
                    timeout=120) == 0o700


@zray.remote
def _mode(name):
    return os.lstat(name).st_mode & 0o7777


@pytest.mark.timeout(60)
def test_placement_group_bundles_with_absurd_numbers_are_named(cluster):
    from zray.util.placement_group import placement_group

    for bundles, why in (
            ([{"CPU": float("nan")}], "'CPU' must be a finite number"),
            ([{"CPU": float("inf")}], "'CPU' must be a finite number"),
            ([{"CPU": 1e300}], "'CPU' must be a finite number"),
            ([{"x" * 1000: 1}], "names are 1 to 256 characters"),
            ([{"CPU": 0.001}] * 20_000, "at most 10000 bundles")):
        with pytest.raises(ValueError, match=why):
            placement_group(bundles)
    pg = placement_group([{"CPU": 1}])  # and a sound one is still placed
    assert pg.wait(timeout_seconds=60)
    zray.util.remove_placement_group(pg)
