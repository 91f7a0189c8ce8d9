"""``zray logs`` and ``zray timeline`` on a cluster started with ``zray start``, as a user
reads them; log rotation and ``log_to_driver=False`` with real executors.
"""

import json
import os
import signal
import stat
import subprocess
import sys

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
    logs_dir = [x for x in listing.splitlines() if x.startswith("broker: ")][0].split(": ", 1)[1]
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
