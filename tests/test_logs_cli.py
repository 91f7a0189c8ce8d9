"""``zray logs`` and ``zray timeline`` on a cluster started with ``zray start``, as a user
reads them; log rotation and ``log_to_driver=False`` with real executors.
"""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
from conftest import kill_tree, poll_until
from test_cli_cluster import _free_port, _zray_cmd
from test_cli_start_stop import _Zray

pytestmark = pytest.mark.timeout(240)

DRIVER = """
import os, sys, zray
zray.init(address="auto", log_to_driver={log_to_driver})

@zray.remote
def talk(i):
    print(f"task line {{i}}")
    print(f"task err {{i}}", file=sys.stderr)
    return i

@zray.remote
class Talker:
    def say(self, n):
        print(f"actor line {{n}}", flush=True)
        return os.getpid()

refs = [talk.remote(i) for i in range(3)]
zray.get(refs)
a = Talker.remote()
pid = zray.get(a.say.remote(0))
print("IDS", refs[1].task_id().hex(), a._actor_id.hex(), pid, flush=True)
flag = {flag!r}
n = 1
while flag and not os.path.exists(flag) and n < 3000:
    zray.get(a.say.remote(n))
    n += 1
    import time
    time.sleep(0.1)
zray.shutdown()
"""


@pytest.fixture
def cluster(tmp_path):
    z = _Zray(tmp_path)
    try:
        z("start", "--head", "--port", str(_free_port()), "--num-cpus", "2",
          "--no-include-dashboard")
        yield z
    finally:
        z.cleanup()


def _driver(z, tmp_path, log_to_driver=True, flag=""):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER.format(log_to_driver=log_to_driver, flag=flag))
    return subprocess.Popen([sys.executable, str(path)], env=z.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _ids(out: str):
    line = [x for x in out.splitlines() if x.startswith("IDS ")][0]
    task, actor, pid = line.split()[1:]
    return task, actor, int(pid)


def test_logs_by_task_actor_pid_and_name(cluster, tmp_path):
    d = _driver(cluster, tmp_path)
    out, err = d.communicate(timeout=120)
    assert d.returncode == 0, err
    assert "task line 1" in out and "actor line 0" in out  # log_to_driver=True (default)
    task, actor, pid = _ids(out)

    listing = cluster("logs").stdout
    for name in ("broker.log", "node.log", "executors.tsv", "executor-"):
        assert name in listing, listing
    assert len(re.findall(r"^node \w+ ", listing, re.M)) == 1, listing

    lines = cluster("logs", "--task-id", task).stdout
    assert "task line 1" in lines and "task err 1" in lines, lines
    assert "task line 0" not in lines and "task line 2" not in lines, lines

    by_actor = cluster("logs", "--actor-id", actor).stdout
    assert "actor line 0" in by_actor and "task line" not in by_actor, by_actor
    assert cluster("logs", "--pid", str(pid)).stdout == by_actor

    broker = cluster("logs", "broker.log", "--tail", "50").stdout
    assert "listening on" in broker, broker
    assert len(cluster("logs", "node.log", "--tail", "1").stdout.splitlines()) == 1

    for args, text in ((["--pid", "1"], "no log of pid 1"),
                       (["--task-id", "00" * 12], "no task with id"),
                       (["nothing-like-this*"], "no log file matches"),
                       (["--follow"], "--follow needs a file"),
                       (["--node", "ffff"], "no node ffff"),
                       (["broker.log", "--pid", "3"], "give one of")):
        bad = cluster("logs", *args, check=False)
        assert bad.returncode != 0 and text in bad.stderr, (args, bad.stderr)

    # every log file is the owner's only
    logs_dir = re.search(r"^node \w+ \([^:]+: (.+)\)$", listing, re.M).group(1)
    for name in os.listdir(logs_dir):
        mode = stat.S_IMODE(os.stat(os.path.join(logs_dir, name)).st_mode)
        assert mode & 0o077 == 0, (name, oct(mode))


def test_follow_prints_new_lines_until_interrupted(cluster, tmp_path):
    flag = str(tmp_path / "stop-driver")
    d = _driver(cluster, tmp_path, flag=flag)
    follow = None
    try:
        def ids():
            line = d.stdout.readline()
            return line if line.startswith("IDS ") else None
        task, actor, pid = _ids(poll_until(ids, 120, interval=0, what="the driver's ids"))
        log = open(tmp_path / "follow.out", "wb")
        follow = subprocess.Popen(_zray_cmd() + ["logs", "--actor-id", actor, "--follow",
                                                 "--tail", "0"],
                                  env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        log.close()

        def ticks():
            text = (tmp_path / "follow.out").read_text()
            return [int(x.split()[-1]) for x in text.splitlines() if x.startswith("actor line")]
        seen = poll_until(lambda: len(ticks()) >= 3 and ticks(), 60, interval=0.1,
                          what="appended lines")
        assert seen == sorted(seen) and 0 not in seen  # only new lines (--tail 0)
        follow.send_signal(signal.SIGINT)
        assert follow.wait(30) == 0
    finally:
        open(flag, "w").close()
        if follow is not None:
            kill_tree(follow.pid)
        try:
            d.wait(60)
        finally:
            kill_tree(d.pid)


def test_log_to_driver_false_keeps_output_in_the_logs(cluster, tmp_path):
    d = _driver(cluster, tmp_path, log_to_driver=False)
    out, err = d.communicate(timeout=120)
    assert d.returncode == 0, err
    assert "task line" not in out + err and "actor line" not in out + err
    task, _, _ = _ids(out)
    assert "task line 1" in cluster("logs", "--task-id", task).stdout


def test_timeline_cli_writes_a_chrome_trace(cluster, tmp_path):
    d = _driver(cluster, tmp_path)
    out, err = d.communicate(timeout=120)
    assert d.returncode == 0, err
    path = tmp_path / "trace.json"
    res = cluster("timeline", "--output", str(path))
    assert str(path) in res.stdout
    events = json.loads(path.read_text())
    assert isinstance(events, list) and len(events) >= 5
    for e in events:
        assert e["ph"] == "X" and e["dur"] >= 0 and e["ts"] > 0
        assert {"pid", "tid", "name"} <= set(e)
    assert {"talk", "Talker.say"} <= {e["name"] for e in events}


def test_executor_logs_rotate(run_driver):
    res = run_driver("""
import os, time, zray
zray.init(num_cpus=1, log_to_driver=False)  # the driver's own lines stay whole

@zray.remote
def noisy(i):
    print(f"call {i}")
    print(("x" * 99 + "\\n") * 40, end="")  # 4,000 bytes a call
    return os.getpid()

logs = os.path.join(zray._runtime.cluster.session_dir, "logs")
pid = zray.get(noisy.remote(0))
deadline = time.monotonic() + 60
i = 1
while time.monotonic() < deadline:
    names = os.listdir(logs)
    if any(n.endswith(".log.2") for n in names if n.startswith("executor-")):
        break
    zray.get(noisy.remote(i))
    i += 1
    time.sleep(0.2)
zray.get(noisy.remote(-1))  # after the rotation: lands in the new file
print("LOGS", logs)
zray.shutdown()
""", timeout=120, ZRAY_ROTATION_MAX_BYTES="5000", ZRAY_ROTATION_BACKUP_COUNT="2")
    assert res.returncode == 0, res.stderr
    logs = [x for x in res.stdout.splitlines() if x.startswith("LOGS ")][0][5:]
    names = sorted(os.listdir(logs))
    rotated = [n for n in names if n.startswith("executor-") and n.endswith((".1", ".2"))]
    assert len(rotated) >= 2, names
    assert not any(n.endswith(".3") for n in names), names  # two backups kept
    # writes went on into the new file after the rotations (or its successor)
    rotating = [n for n in names if n.startswith("executor-") and n.endswith(".log")
                and n + ".1" in names]
    assert any("call -1" in open(os.path.join(logs, n + suffix)).read()
               for n in rotating for suffix in ("", ".1"))
    for n in rotated:
        path = os.path.join(logs, n)
        assert os.path.getsize(path) > 5000  # rotated once past the limit
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def test_rotation_settings_are_checked(tmp_path):
    z = _Zray(tmp_path)
    z.env["ZRAY_ROTATION_MAX_BYTES"] = "lots"
    try:
        res = z("start", "--head", "--port", str(_free_port()), "--no-include-dashboard",
                check=False)
        assert res.returncode != 0
        assert "ZRAY_ROTATION_MAX_BYTES must be an integer" in res.stderr, res.stderr
    finally:
        z.cleanup()


def test_logs_of_a_second_node_through_the_broker(cluster, tmp_path):
    port = [e for e in cluster.started() if e["role"] == "broker"][0]["argv"][4]
    cluster("start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1",
            "--resources", '{"second": 1}')
    script = tmp_path / "second.py"
    script.write_text("""
import os, zray
zray.init(address="auto")

@zray.remote(resources={"second": 1})
def there():
    print("printed on the second node", flush=True)
    return os.getpid(), zray.get_runtime_context().get_node_id()

print("WHERE", *zray.get(there.remote()))
zray.shutdown()
""")
    out = subprocess.run([sys.executable, str(script)], env=cluster.env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid, node = [x for x in out.stdout.splitlines() if x.startswith("WHERE ")][0].split()[1:]
    listing = cluster("logs").stdout
    assert len(re.findall(r"^node \w+ ", listing, re.M)) == 2, listing
    only = cluster("logs", "--node", node[:8]).stdout
    assert only.count("node.log") == 1 and f"node {node}" in only, only
    assert "printed on the second node" in cluster("logs", "--pid", pid).stdout
    assert "printed on the second node" in cluster("logs", "executor-*", "--node", node).stdout


def test_only_the_asked_node_answers_a_log_read(ray_local):
    """LOG_DATA is forwarded only as the answer to a LOG_READ the broker sent that very
    node: an unasked or mis-numbered answer is dropped and counted."""
    import threading

    import zmq

    from zray import _protocol as P

    client = ray_local._runtime.client
    ctx = zmq.Context()
    node_id = os.urandom(P.ID_LEN)
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, P.node_ident(node_id))
    s.setsockopt(zmq.LINGER, 0)
    s.connect(client.address)
    try:
        s.send(P.encode(P.NodeHello(P.VERSION, node_id, {"resources": {}, "hostname": "fake",
                                                          "log_dir": "/nowhere"})))

        def dropped():
            return client.request("status")["dropped_messages"]

        poll_until(lambda: any(n["NodeID"] == node_id.hex() for n in ray_local.nodes()), 30,
                   what="the fake node to join")
        before = dropped()
        s.send(P.encode(P.LogData(1, True, "forged")))  # nothing was asked
        poll_until(lambda: dropped() > before, 30, what="the unasked answer to be dropped")

        answer = {}
        asker = threading.Thread(target=lambda: answer.update(r=client.request(
            "node_logs", {"node_id": node_id.hex(), "op": "list", "args": {}}, timeout=30)))
        asker.start()
        deadline = time.monotonic() + 30
        read = None
        while read is None and time.monotonic() < deadline:
            if s.poll(1000):
                m = P.decode(s.recv())
                if m.TYPE == P.Msg.LOG_READ:
                    read = m
        assert read is not None and read.op == "list"
        before = dropped()
        s.send(P.encode(P.LogData(read.req_id + 1, True, "wrong number")))
        poll_until(lambda: dropped() > before, 30, what="the mis-numbered answer dropped")
        s.send(P.encode(P.LogData(read.req_id, True, {"files": [["a.log", 1]],
                                                       "executors": []})))
        asker.join(30)
        assert answer["r"] == {"files": [["a.log", 1]], "executors": []}
    finally:
        s.close()
        ctx.term()
