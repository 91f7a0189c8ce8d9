"""A two-node cluster started with the CLI, as a user would start one.

    zray broker --host 127.0.0.1 --port PORT                        (foreground)
    zray worker --address tcp://127.0.0.1:PORT --num-cpus 2 \\
                --resources '{"nodeA": 1}' --labels pool=a            (foreground)
    zray status --address tcp://127.0.0.1:PORT

The driver (this test process) connects with
``zray.init(address="tcp://127.0.0.1:PORT")``; tasks pinned with custom
resources, tasks with the SPREAD strategy and tasks with a label_selector must
run where they ask to. At the
end SIGTERM stops the broker and workers, and no process they started may be
left.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import describe, driver_env, kill_tree, poll_until, wait_gone

import zray


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port() -> int:
    """A port to hand a daemon's --port: free now, and below the kernel's ephemeral range.
    A port bind(0) gave is from that range, and any process's outgoing connection may take
    it between our check and the daemon's bind (seen in CI: the broker's "Address already
    in use"); a port below the range is only taken by someone who binds it by number."""
    low = _ephemeral_low()
    if low > 12000:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(10000, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zray_cmd() -> list:
    exe = shutil.which("zray")
    if exe is None:
        sibling = os.path.join(os.path.dirname(sys.executable), "zray")
        if os.access(sibling, os.X_OK):
            exe = sibling
    return [exe] if exe else [sys.executable, "-m", "zray.cli"]


class _Procs:
    """The CLI processes of one test, with their output in log files."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = {}
        self.env = driver_env(ZRAY_TMPDIR=str(tmp_path / "zray-tmp"))

    def start(self, name, args):
        log = open(self.tmp_path / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(_zray_cmd() + args, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True)
        log.close()
        return self.procs[name]

    def logs(self) -> str:
        out = []
        for name in self.procs:
            try:
                text = (self.tmp_path / f"{name}.log").read_text(errors="replace")
            except OSError:
                text = ""
            out.append(f"--- {name} ---\n{text[-3000:]}")
        return "\n".join(out)

    def check_running(self):
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"CLI processes exited early: {dead}\n{self.logs()}"

    def descendants(self) -> list:
        found = []
        for p in self.procs.values():
            try:
                root = psutil.Process(p.pid)
                found.append(root)
                found.extend(root.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return found

    def connect_driver(self, address: str, timeout: float = 60) -> None:
        """``zray.init(address=...)`` in this process once the broker answers (it may still
        be starting); fails at once if one of the CLI processes exited."""

        def connected():
            self.check_running()
            try:
                zray.init(address=address)
                return True
            except ConnectionError:
                return False

        poll_until(connected, timeout, interval=0.2, what="the driver to connect to the broker")

    def kill_all(self):
        for p in self.procs.values():
            kill_tree(p.pid)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


@pytest.mark.timeout(120)
def test_two_node_cluster_via_cli(tmp_path):
    if zray.is_initialized():
        zray.shutdown()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = _Procs(tmp_path)
    try:
        procs.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(port)])
        procs.start("workerA", ["worker", "--address", address, "--num-cpus", "2",
                                "--resources", json.dumps({"nodeA": 1}), "--labels", "pool=a"])
        procs.start("workerB", ["worker", "--address", address, "--num-cpus", "2",
                                "--resources", json.dumps({"nodeB": 1}),
                                "--labels", json.dumps({"pool": "b", "disk": "ssd"})])

        procs.connect_driver(address, 30)
        try:
            def two_alive():
                procs.check_running()
                alive = [n for n in zray.nodes() if n["Alive"]]
                return alive if len(alive) == 2 else None

            alive = poll_until(two_alive, 30, interval=0.1, what="2 alive nodes")
            by_res = {}
            for n in alive:
                assert n["Resources"]["CPU"] == 2, n
                for key in ("nodeA", "nodeB"):
                    if n["Resources"].get(key):
                        by_res[key] = n["NodeID"]
            assert set(by_res) == {"nodeA", "nodeB"}, alive
            node_a, node_b = by_res["nodeA"], by_res["nodeB"]
            assert node_a != node_b
            total = zray.cluster_resources()
            assert total["CPU"] == 4 and total["nodeA"] == 1 and total["nodeB"] == 1, total

            @zray.remote
            def where(delay=0.0):
                time.sleep(delay)
                return zray.get_runtime_context().get_node_id()

            on_a = zray.get([where.options(resources={"nodeA": 0.1}).remote() for _ in range(6)],
                            timeout=60)
            on_b = zray.get([where.options(resources={"nodeB": 0.1}).remote() for _ in range(6)],
                            timeout=60)
            assert set(on_a) == {node_a}
            assert set(on_b) == {node_b}

            # node labels from `zray worker --labels`, and label_selector
            labels = {n["NodeID"]: n["Labels"] for n in zray.nodes()}
            assert labels[node_a]["pool"] == "a" and labels[node_b]["disk"] == "ssd", labels
            by_label = zray.get([where.options(label_selector=sel).remote()
                                 for sel in ({"pool": "b"}, {"pool": "!b"}, {"disk": "ssd"},
                                             {"pool": "in(a, c)"})], timeout=60)
            assert by_label == [node_b, node_a, node_b, node_a], by_label
            nowhere = where.options(label_selector={"pool": "c"}).remote()
            assert zray.wait([nowhere], timeout=0.5)[0] == []  # waits for such a node

            spread = zray.get([where.options(scheduling_strategy="SPREAD").remote(0.3)
                               for _ in range(8)], timeout=60)
            assert set(spread) == {node_a, node_b}, spread

            # objects flow between the nodes: a value made on A consumed on B
            @zray.remote
            def make():
                return list(range(1000))

            @zray.remote
            def consume(x):
                return sum(x), zray.get_runtime_context().get_node_id()

            ref = make.options(resources={"nodeA": 0.1}).remote()
            total_sum, node = zray.get(
                consume.options(resources={"nodeB": 0.1}).remote(ref), timeout=60)
            assert (total_sum, node) == (sum(range(1000)), node_b)
        finally:
            zray.shutdown()

        # the cluster outlives the driver; `zray status` lists both nodes
        status = subprocess.run(_zray_cmd() + ["status", "--address", address],
                                capture_output=True, text=True, timeout=30, env=procs.env)
        assert status.returncode == 0, (status.stdout, status.stderr)
        print(status.stdout)
        for node_id in (node_a, node_b):
            assert node_id[:8] in status.stdout, (node_id, status.stdout)

        # SIGTERM stops every CLI process and whatever they started
        everything = procs.descendants()
        assert len(everything) >= 5, describe(everything)  # broker, 2 workers, executors
        for name in ("workerA", "workerB", "broker"):
            procs.procs[name].send_signal(signal.SIGTERM)
        for name, p in procs.procs.items():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} ignored SIGTERM for 15 s\n{procs.logs()}")
        left = wait_gone(everything, 10)
        assert left == [], f"left behind after SIGTERM: {describe(left)}"
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.kill_all()


@pytest.mark.timeout(60)
def test_worker_refuses_bad_labels(tmp_path):
    out = subprocess.run(_zray_cmd() + ["worker", "--address", "tcp://127.0.0.1:9",
                                        "--labels", "pool=not ok!"],
                         capture_output=True, text=True, timeout=50,
                         env=driver_env(ZRAY_TMPDIR=str(tmp_path / "zray-tmp")))
    assert out.returncode != 0
    assert "--labels" in out.stderr and "not ok!" in out.stderr, out.stderr
