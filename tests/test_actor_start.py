"""An actor starts on a prestarted executor that never ran anything, when its node has
one idle: its creation then costs no process start (create + first call: 0.22 s -> ~10
ms on this 2-core machine; Ray 2.60: 0.02-0.7 s). A process that ran a task never hosts
an actor, and the pool is refilled. Real local cluster."""

import os

import pytest
from conftest import poll_until

import zray
from zray.util.state import list_workers


@pytest.fixture(scope="module")
def cluster():
    if zray.is_initialized():
        zray.shutdown()
    zray.init(num_cpus=2)
    yield
    zray.shutdown()


@zray.remote
def pid():
    return os.getpid()


@zray.remote
class Host:
    def pid(self):
        return os.getpid()


@zray.remote
class EnvHost:
    def env(self):
        return os.environ.get("ZRAY_T")


def _worker_pids() -> set:
    return {w["pid"] for w in list_workers() if w["worker_type"] == "WORKER" and w["is_alive"]}


def test_an_actor_takes_a_prestarted_process_that_never_ran_anything(cluster):
    task_pid = zray.get(pid.remote(), timeout=60)
    # the pool: the task's process and at least one that never ran anything
    poll_until(lambda: len(_worker_pids() - {task_pid}) >= 1, 60,
               what="a prestarted executor besides the task's")
    before = _worker_pids()
    h = Host.remote()
    actor_pid = zray.get(h.pid.remote(), timeout=60)
    assert actor_pid != task_pid  # never a process that ran a task
    assert actor_pid in before  # a prestarted one, not a new process
    # and the pool gets another one in its place
    poll_until(lambda: len(_worker_pids() - {actor_pid}) >= len(before), 60,
               what="the pool to be refilled")
    zray.kill(h)


def test_env_vars_reach_an_actor_on_a_prestarted_process(cluster):
    h = EnvHost.options(runtime_env={"env_vars": {"ZRAY_T": "on"}}).remote()
    assert zray.get(h.env.remote(), timeout=60) == "on"
    zray.kill(h)


def test_an_actor_with_a_runtime_env_gets_a_process_of_its_own(cluster, tmp_path):
    (tmp_path / "marker.txt").write_text("here")
    before = _worker_pids()
    h = Host.options(runtime_env={"working_dir": str(tmp_path)}).remote()
    assert zray.get(h.pid.remote(), timeout=120) not in before
    zray.kill(h)
