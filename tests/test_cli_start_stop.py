"""``zray start`` / ``zray stop`` as a user runs them: a head in the background, a second
worker joining it, a driver using the cluster, ``zray list``/``get``/``summary``/
``status`` on it, then ``zray stop`` ending exactly what ``start`` started (by recorded
pid and start time, never by name) and nothing else.

Each test has its own ZRAY_TMPDIR, so its address file and table of started processes
are its own.
"""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import driver_env, is_alive, kill_tree, poll_until, wait_gone
from test_cli_cluster import _free_port, _zray_cmd

pytestmark = pytest.mark.timeout(240)


def adopt_daemons(on: bool = True) -> None:
    """While a test runs, make this test process the parent of the daemons ``zray start``
    leaves behind (PR_SET_CHILD_SUBREAPER), so that on a machine shared with other test
    runs they do not look like orphans that another run's leak check may kill. Turned off
    again at clean-up: later tests see orphans go to init as usual."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class _Zray:
    """Runs ``zray ...`` with this test's private ZRAY_TMPDIR."""

    def __init__(self, tmp_path):
        adopt_daemons()
        self.env = driver_env(ZRAY_TMPDIR=str(tmp_path / "zt"))
        self.table = tmp_path / "zt" / "started.json"

    def __call__(self, *args, timeout=120, check=True):
        out = subprocess.run(_zray_cmd() + list(args), capture_output=True, text=True,
                             timeout=timeout, env=self.env, stdin=subprocess.DEVNULL)
        if check:
            assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out

    def started(self) -> list:
        try:
            return json.loads(self.table.read_text())
        except FileNotFoundError:
            return []

    def procs(self) -> list:
        found = []
        for e in self.started():
            try:
                p = psutil.Process(e["pid"])
                found.append(p)
                found += p.children(recursive=True)
            except psutil.Error:
                pass
        return found

    def cleanup(self):
        try:
            self("stop", "--force", check=False, timeout=60)
            for e in self.started():
                kill_tree(e["pid"])
        finally:
            adopt_daemons(False)


@pytest.fixture
def zray_cli(tmp_path):
    z = _Zray(tmp_path)
    try:
        yield z
    finally:
        z.cleanup()


def test_start_head_join_use_and_stop(zray_cli, run_driver):
    port = _free_port()
    out = zray_cli("start", "--head", "--port", str(port), "--num-cpus", "2",
                   "--resources", '{"head_res": 1}', "--no-include-dashboard")
    address = f"tcp://127.0.0.1:{port}"
    assert address in out.stdout and "zray stop" in out.stdout, out.stdout
    roles = sorted(e["role"] for e in zray_cli.started())
    assert roles == ["broker", "worker"]

    out = zray_cli("start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1",
                   "--labels", "pool=extra")
    assert "worker started" in out.stdout, out.stdout
    assert sorted(e["role"] for e in zray_cli.started()) == ["broker", "worker", "worker"]

    nodes = json.loads(zray_cli("list", "nodes", "--format", "json").stdout)
    assert len(nodes) == 2 and {n["state"] for n in nodes} == {"ALIVE"}
    assert sorted(n["resources_total"]["CPU"] for n in nodes) == [1.0, 2.0]
    status = zray_cli("status").stdout  # the address file `start` left finds the cluster
    assert f"zray cluster at {address}" in status and "Nodes: 2" in status, status

    # a driver uses it: address="auto" finds the cluster zray start started
    res = run_driver("""
import zray
zray.init(address="auto")

@zray.remote
def where():
    return zray.get_runtime_context().get_node_id()

@zray.remote
def same(i):
    return i

print("NODES", len({zray.get(where.options(resources={"head_res": 0.5}).remote())}))
print("SUM", sum(zray.get([same.remote(i) for i in range(10)])))
zray.shutdown()
""", timeout=120, ZRAY_TMPDIR=zray_cli.env["ZRAY_TMPDIR"])
    assert res.returncode == 0, res.stderr
    assert "NODES 1" in res.stdout and "SUM 45" in res.stdout, res.stdout

    poll_until(lambda: len(json.loads(zray_cli("list", "tasks", "-f", "state=FINISHED",
                                               "--limit", "100", "--format", "json").stdout))
               >= 11, 60, interval=0.5, what="the driver's 11 tasks to be FINISHED")
    table = zray_cli("list", "tasks", "--filter", "name=where").stdout
    assert "TASK_ID" in table and "FINISHED" in table and "where" in table, table
    summary = zray_cli("summary", "tasks").stdout
    assert "where" in summary and "FINISHED" in summary, summary
    one = nodes[0]["node_id"]
    got = zray_cli("get", "nodes", one).stdout
    assert one in got and "resources_available" in got, got
    bad = zray_cli("list", "tasks", "-f", "colour=red", check=False)
    assert bad.returncode != 0 and "'colour' is not a column of tasks" in bad.stderr, bad
    missing = zray_cli("get", "actors", "00" * 12, check=False)
    assert missing.returncode != 0 and "no actor with id" in missing.stderr

    everything = zray_cli.procs()
    assert len(everything) >= 4, everything  # broker, 2 workers, their executors
    out = zray_cli("stop")
    assert "Stopped 3 zray process(es)" in out.stdout, out.stdout
    assert not wait_gone(everything, 20)
    assert zray_cli.started() == []
    assert zray_cli("stop").stdout.startswith("No zray processes")
    gone = zray_cli("status", check=False)
    assert gone.returncode != 0


def test_stop_ends_only_what_start_recorded(zray_cli, tmp_path):
    # A foreground broker the user runs itself, and a process whose pid sits in the table
    # with another start time (a reused pid): `zray stop` leaves both alone.
    port = _free_port()
    own = subprocess.Popen(_zray_cmd() + ["broker", "--port", str(port)], env=zray_cli.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                               start_new_session=True)
    try:
        os.makedirs(zray_cli.table.parent, exist_ok=True)
        zray_cli.table.write_text(json.dumps([{
            "pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time() - 100,
            "role": "worker", "session_dir": str(tmp_path), "argv": []}]))
        out = zray_cli("stop")
        assert out.stdout.startswith("No zray processes"), out.stdout
        assert is_alive(psutil.Process(sleeper.pid)) and own.poll() is None
        assert zray_cli.started() == []  # the stale entry is dropped
    finally:
        for p in (own, sleeper):
            kill_tree(p.pid)
            p.wait(10)


def test_start_refuses_bad_usage(zray_cli):
    for args, text in ((["start"], "either --head"),
                       (["start", "--head", "--address", "1.2.3.4:5"], "either --head"),
                       (["start", "--address", "127.0.0.1:1", "--dashboard-port", "1"],
                        "--dashboard-port is for --head only"),
                       (["start", "--head", "--labels", "novalue"], "--labels"),
                       (["stop", "--grace-period", "-1"], "grace-period")):
        out = zray_cli(*args, check=False)
        assert out.returncode != 0 and text in out.stderr, (args, out.stderr)
    assert zray_cli.started() == []
    try:
        import zray.dashboard  # noqa: F401
    except ImportError:
        out = zray_cli("start", "--head", "--port", str(_free_port()), "--include-dashboard",
                       check=False)
        assert out.returncode != 0 and "not installed" in out.stderr, out.stderr
        assert zray_cli.started() == []


def test_start_block_stops_everything_on_sigterm(zray_cli, tmp_path):
    port = _free_port()
    log = open(tmp_path / "block.log", "wb")
    proc = subprocess.Popen(_zray_cmd() + ["start", "--head", "--port", str(port), "--block",
                                           "--num-cpus", "1", "--no-include-dashboard"],
                            env=zray_cli.env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    try:
        poll_until(lambda: "--block: running" in (tmp_path / "block.log").read_text(), 90,
                   interval=0.1, what="zray start --block to be up")
        everything = zray_cli.procs()
        assert len(everything) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "block.log").read_text()
        assert not wait_gone(everything, 20)
        assert zray_cli.started() == []
    finally:
        kill_tree(proc.pid)


def test_start_with_dashboard_when_installed(zray_cli):
    pytest.importorskip("zray.dashboard")
    import urllib.request

    port, dport = _free_port(), _free_port()
    out = zray_cli("start", "--head", "--port", str(port), "--num-cpus", "1",
                   "--include-dashboard", "--dashboard-port", str(dport))
    assert f"http://127.0.0.1:{dport}" in out.stdout, out.stdout
    assert sorted(e["role"] for e in zray_cli.started()) == ["broker", "dashboard", "worker"]

    def page():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dport}/", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    poll_until(page, 60, interval=0.2, what="the dashboard to answer")
    everything = zray_cli.procs()
    assert "Stopped 3" in zray_cli("stop").stdout
    assert not wait_gone(everything, 20)
