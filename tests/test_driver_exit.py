"""What a driver leaves running when it exits, and what a stopping node waits for.

* A driver that exits takes its plain tasks still running along (Ray: a finished job's
  workers are killed): before, such a task ran on to its end, for ever if it looped,
  holding its CPU. Work done for the job's detached actors runs on: the actor's own
  calls and the tasks it submitted.
* ``zray worker`` stopped with SIGTERM does not wait for a running task (Ray's workers
  exit on SIGTERM): before, the executor finished its task first, so every stop (and
  every embedded cluster's exit) waited out the agent's 2 s grace.

Real processes: ``zray broker`` + ``zray worker`` daemons, a second driver as a
subprocess.
"""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from _cluster import CliCluster, cli_cluster
from conftest import poll_until

import zray

DRIVER = r"""
import os, sys, time
import zray

zray.init(address=sys.argv[1])
d = sys.argv[2]


def mark(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


@zray.remote(max_retries=0)
def spin(path):
    mark(path, str(os.getpid()))
    while True:
        time.sleep(0.05)


@zray.remote
def child(path, gate):
    while not os.path.exists(gate):
        time.sleep(0.02)
    mark(path, str(os.getpid()))
    return 1


@zray.remote(num_cpus=0)
class Keeper:
    def work(self, d):
        mark(os.path.join(d, "started"), "")
        zray.get(child.remote(os.path.join(d, "child"), os.path.join(d, "gate")))
        mark(os.path.join(d, "actor"), "done")
        return 1


k = Keeper.options(name="keeper", lifetime="detached", namespace="exit-test").remote()
k.work.remote(d)
spin.remote(os.path.join(d, "spin"))
while not (os.path.exists(os.path.join(d, "spin")) and os.path.exists(os.path.join(d, "started"))):
    time.sleep(0.02)
print("EXITING", flush=True)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cli_cluster(tmp_path_factory.mktemp("exitcluster"), CliCluster) as c:
        c.add_worker("w0", cpus=3)
        yield c


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def test_a_driver_that_exits_takes_its_running_tasks_along(cluster, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, ZRAY_EXIT_DRAIN_S="0")
    out = subprocess.run([sys.executable, str(script), cluster.address, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert "EXITING" in out.stdout, out.stderr[-3000:]
    pid = int((tmp_path / "spin").read_text())
    try:
        # the detached actor's call and the task it submitted run on past the driver
        (tmp_path / "gate").write_text("")
        poll_until(lambda: (tmp_path / "actor").exists(), 60,
                   what="the detached actor's call to finish after its driver left")
        assert (tmp_path / "child").exists()
        # the driver's own task is gone, and its CPU is back
        poll_until(lambda: _gone(pid), 30, what="the exited driver's running task to end")
        poll_until(lambda: zray.available_resources().get("CPU") == 3, 30,
                   what="every CPU free again")
    finally:
        try:
            zray.kill(zray.get_actor("keeper", namespace="exit-test"))
        except ValueError:
            pass


@zray.remote(max_retries=0)
def hold(pidfile):
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    time.sleep(60)
    return "held"


def test_a_stopping_worker_does_not_wait_for_a_running_task(cluster, tmp_path):
    cluster.add_worker("w1", cpus=1)
    pidfile = str(tmp_path / "held")
    ref = hold.options(resources={"w1": 1}).remote(pidfile)
    poll_until(lambda: os.path.exists(pidfile), 60, what="the task to start")
    executor = int(open(pidfile).read())
    worker = cluster.procs.procs.pop("w1")
    t0 = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    took = time.monotonic() - t0
    assert _gone(executor)
    # the agent's grace for stragglers is 2 s: a task must not make it wait that out
    assert took < 1.5, f"the worker took {took:.2f}s to stop"
    with pytest.raises(zray.exceptions.RayError):  # its node is gone, no retries
        zray.get(ref, timeout=60)


KILLED_DRIVER = r"""
import os, sys, time
import zray

zray.init(address=sys.argv[1])
d = sys.argv[2]


@zray.remote(num_cpus=0)
class Holder:
    def pid(self):
        return os.getpid()


@zray.remote(max_retries=0)
def spin(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    while True:
        time.sleep(0.05)


h = Holder.options(name="held-by-a-killed-driver").remote()
actor_pid = zray.get(h.pid.remote())
spin.remote(os.path.join(d, "spin"))
while not os.path.exists(os.path.join(d, "spin")):
    time.sleep(0.02)
print("READY", actor_pid, flush=True)
time.sleep(600)
"""


def test_a_killed_driver_is_noticed_in_seconds(cluster, tmp_path):
    # Its connection closes: the broker gives it DRIVER_GONE_S (3 s) to show it lives,
    # not DRIVER_TIMEOUT_S (60 s), then its job ends: its actor and its task go.
    script = tmp_path / "driver.py"
    script.write_text(KILLED_DRIVER)
    p = subprocess.Popen([sys.executable, str(script), cluster.address, str(tmp_path)],
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("READY"), line
        actor_pid = int(line.split()[1])
        task_pid = int((tmp_path / "spin").read_text())
        t0 = time.monotonic()
        p.kill()
        p.wait(30)
        poll_until(lambda: _gone(actor_pid) and _gone(task_pid), 30,
                   what="the killed driver's actor and task to end")
        took = time.monotonic() - t0
        assert took < 20, took  # (60 s before)
        with pytest.raises(ValueError):
            zray.get_actor("held-by-a-killed-driver")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
