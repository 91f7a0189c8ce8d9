"""The broker's task engine speaks in named states: a task's transition history after
success, retry, cancel and failure, read back from a real broker's event log, and an
illegal transition counted, not applied."""

import os
import time

import pytest
from conftest import poll_until

import zray
from brokerd.records import ExecState, Executor, Node, Task, TaskState
from brokerd.transitions import Transitions
from zray import _protocol as P


def history(ref_or_id) -> list:
    """[(from, to, reason), ...] of a task, from the broker's event log."""
    rid = ref_or_id.task_id() if hasattr(ref_or_id, "task_id") else ref_or_id
    return [tuple(e) for e in zray._runtime.client.request("task_events", {"id": rid})]


def states(ref_or_id) -> list:
    h = history(ref_or_id)
    return [h[0][0]] + [to for _, to, _ in h] if h else []


def settled(ref, final):
    return poll_until(lambda: states(ref) if states(ref)[-1:] == [final] else None, 10,
                      what=f"the task to reach {final}")


@zray.remote
def add(a, b):
    return a + b


@pytest.mark.timeout(60)
def test_success_runs_through_the_named_states(ray_local):
    ref = add.remote(1, 2)
    assert zray.get(ref, timeout=30) == 3
    assert settled(ref, "finished") == ["waiting_args", "queued", "running", "finished"]
    reasons = [r for _, _, r in history(ref)]
    assert reasons == ["submitted", "started", "returned"]


@pytest.mark.timeout(60)
def test_a_task_waiting_for_its_argument(ray_local):
    @zray.remote
    def slow():
        time.sleep(0.3)
        return 5

    first = slow.remote()
    second = add.remote(first, 1)
    assert zray.get(second, timeout=30) == 6
    assert settled(second, "finished") == ["waiting_args", "queued", "running", "finished"]
    assert history(second)[0][2] == "arguments ready"


@pytest.mark.timeout(60)
def test_retry_after_an_application_error_and_after_a_crash(ray_local, tmp_path):
    flag = str(tmp_path / "raised")

    @zray.remote(max_retries=1, retry_exceptions=True)
    def flaky():
        if not os.path.exists(flag):
            open(flag, "w").close()
            raise ValueError("first try")
        return "ok"

    ref = flaky.remote()
    assert zray.get(ref, timeout=30) == "ok"
    assert settled(ref, "finished") == ["waiting_args", "queued", "running", "queued",
                                        "running", "finished"]
    assert history(ref)[2][2] == "application error, retrying"

    crashed = str(tmp_path / "crashed")

    @zray.remote(max_retries=1)
    def dies_once():
        if not os.path.exists(crashed):
            open(crashed, "w").close()
            os._exit(3)
        return "survived"

    ref = dies_once.remote()
    assert zray.get(ref, timeout=30) == "survived"
    settled(ref, "finished")  # the result may reach us before the broker has the DONE
    h = history(ref)
    assert [to for _, to, _ in h] == ["queued", "running", "queued", "running", "finished"]
    assert "exit code 3" in h[2][2], h


@pytest.mark.timeout(60)
def test_failure_and_cancel_states(ray_local):
    @zray.remote
    def boom():
        raise KeyError("x")

    ref = boom.remote()
    with pytest.raises(zray.exceptions.RayTaskError):
        zray.get(ref, timeout=30)
    assert settled(ref, "failed")[-2:] == ["running", "failed"]

    # waits for a resource no node has: cancelled while queued
    ref = add.options(resources={"nowhere": 1}).remote(1, 1)
    poll_until(lambda: states(ref)[-1:] == ["queued"], 10, what="the task to be queued")
    zray.cancel(ref)
    with pytest.raises(zray.exceptions.TaskCancelledError):
        zray.get(ref, timeout=30)
    assert settled(ref, "cancelled") == ["waiting_args", "queued", "cancelled"]

    @zray.remote
    def sleeper():
        time.sleep(30)

    ref = sleeper.remote()
    poll_until(lambda: states(ref)[-1:] == ["running"], 10, what="the task to run")
    zray.cancel(ref)
    with pytest.raises(zray.exceptions.TaskCancelledError):
        zray.get(ref, timeout=30)
    assert settled(ref, "cancelled")[-2:] == ["running", "cancelled"]


@pytest.mark.timeout(60)
def test_actor_states_and_no_illegal_transitions_on_a_real_broker(ray_local):
    @zray.remote(max_restarts=1)
    class Box:
        def pid(self):
            return os.getpid()

    box = Box.remote()
    pid = zray.get(box.pid.remote(), timeout=30)
    os.kill(pid, 9)

    def new_pid():
        try:  # a call that reaches the dying process fails (no max_task_retries)
            return zray.get(box.pid.remote(), timeout=30) != pid
        except zray.exceptions.ActorDiedError:
            return False

    assert poll_until(new_pid, 30, what="the actor to restart")
    actor = [to for _, to, _ in history(box._actor_id)]
    assert actor == ["alive", "restarting", "alive"], actor
    zray.kill(box)
    assert [to for _, to, _ in history(box._actor_id)][-1] == "dead"
    status = zray._runtime.client.request("status")
    assert status["illegal_transitions"] == 0


@pytest.mark.timeout(10)
def test_an_illegal_transition_is_counted_not_applied():
    moves = Transitions(maxlen=10)
    spec = P.TaskSpec(b"t" * 12, P.TASK, b"f", "f", 1, {}, [], [], {}, b"", b"c" * 8,
                      b"c" * 8, b"j", b"")
    task = Task(spec.task_id, P.TASK, spec, [], {}, {}, ((), None), [])
    assert moves.move(task, TaskState.QUEUED, "ready")
    assert not moves.move(task, TaskState.FINISHED, "skipping running")  # not legal
    assert task.state == TaskState.QUEUED and moves.illegal == 1
    assert moves.history(task.task_id) == [("waiting_args", "queued", "ready")]
    ex = Executor(b"e" * 8, Node(b"n" * 8, b"Nnnnnnnnn", {}, {}, []))
    assert not moves.move(ex, ExecState.BUSY, "never started")
    assert ex.state == ExecState.STARTING and moves.illegal == 2
    for _ in range(20):  # the log is bounded
        moves.move(ex, ExecState.IDLE) and moves.move(ex, ExecState.BUSY)
    assert len(moves.events) == 10
