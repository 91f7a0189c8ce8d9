"""Tiny tasks in windows: what a user can see of the broker sending several tasks ahead
to an executor (brokerd/window.py) and the executor answering several DONEs in one
message (workerd/held.py).

Results, errors, printed output and side effects come out as if every task had
travelled alone; a task sent ahead that has not started can be cancelled, runs
elsewhere if its executor dies, and does not wait behind a call that runs long while
another executor is idle. Each test runs its own cluster in a driver subprocess: some
set ZRAY_EXEC_SHORT_S / ZRAY_EXEC_LONG_S so that a window forms whatever the load of
the machine (every function counts as short, no call as long)."""

import re

import pytest

# The driver scripts' shared part: a remote function that appends to a log file, and
# waits for a gate file when given one (a task we hold running for as long as we like).
_PRELUDE = '''
import os, sys, time
import zray as ray
from zray.util.state import list_tasks

LOG, GATE, STARTED = "side_effects.log", "gate", "started"

def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.01)

@ray.remote
def step(i, gate=False):
    if gate:
        with open(STARTED, "w") as f:
            f.write(str(os.getpid()))
        wait_for(lambda: os.path.exists(GATE), 60, "the gate")
    with open(LOG, "a") as f:
        f.write(f"{i}\\n")
    return i, os.getpid()

def logged():
    with open(LOG) as f:
        return [int(x) for x in f.read().split()]

def sent_ahead(n):
    """Wait until n step tasks are sent ahead to an executor (SUBMITTED_TO_WORKER)."""
    def count():
        return sum(t["state"] == "SUBMITTED_TO_WORKER" for t in list_tasks(
            filters=[("name", "=", "step")], limit=1000))
    wait_for(lambda: count() >= n, 30, f"{n} tasks sent ahead")
'''

_WINDOW_ENV = {"ZRAY_EXEC_SHORT_S": "30", "ZRAY_EXEC_LONG_S": "60"}


@pytest.mark.timeout(120)
def test_cancel_a_task_sent_ahead_before_it_starts(run_driver):
    res = run_driver(_PRELUDE + '''
ray.init(num_cpus=1)
assert ray.get(step.remote(-1))[0] == -1  # the broker learns step's run time
os.remove(LOG)
blocker = step.remote(0, gate=True)
wait_for(lambda: os.path.exists(STARTED), 30, "the blocker to start")
followers = [step.remote(i) for i in range(1, 9)]
sent_ahead(8)  # all eight wait in the executor, behind the blocker
ray.cancel(followers[2])
# (ray.cancel returns once it is sent, as Ray's does: the gate opens once the broker has
# it, or the blocker and two followers could finish before it arrives)
cancelled = followers[2].task_id().hex()
wait_for(lambda: [t.get("error_type") for t in list_tasks(
    filters=[("task_id", "=", cancelled)])] == ["TASK_CANCELLED"], 30, "the broker to cancel it")
open(GATE, "w").close()
try:
    ray.get(followers[2], timeout=30)
    sys.exit("the cancelled task returned")
except ray.exceptions.TaskCancelledError:
    pass
done = ray.get([blocker] + followers[:2] + followers[3:], timeout=60)
assert [i for i, _ in done] == [0, 1, 2, 4, 5, 6, 7, 8], done
assert logged() == [0, 1, 2, 4, 5, 6, 7, 8], logged()  # in order; 3 never ran
print("ok")
''', timeout=100, **_WINDOW_ENV)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "ok" in res.stdout


@pytest.mark.timeout(150)
def test_tasks_sent_ahead_to_an_executor_that_dies_run_elsewhere_once(run_driver):
    res = run_driver(_PRELUDE + '''
import signal
ray.init(num_cpus=1)
ray.get(step.remote(-1))
os.remove(LOG)
blocker = step.remote(0, gate=True)
wait_for(lambda: os.path.exists(STARTED), 30, "the blocker to start")
victim = int(open(STARTED).read())
followers = [step.remote(i) for i in range(1, 9)]
sent_ahead(8)
os.kill(victim, signal.SIGKILL)
open(GATE, "w").close()  # the blocker's retry goes through
done = ray.get([blocker] + followers, timeout=90)
assert [i for i, _ in done] == list(range(9)), done
assert all(pid != victim for _, pid in done), (victim, done)
assert sorted(logged()) == list(range(9)), logged()  # each ran exactly once
print("ok")
''', timeout=130, **_WINDOW_ENV)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "ok" in res.stdout


@pytest.mark.timeout(150)
@pytest.mark.parametrize("env", [{}, {"ZRAY_EXEC_SHORT_S": "30", "ZRAY_EXEC_LONG_S": "0.5"}],
                         ids=["default", "turns-long-after-the-other-went-idle"])
def test_a_long_call_does_not_hold_short_tasks_behind_it(run_driver, env):
    # step is short on average, so tasks ride in windows, also behind the one call that
    # blocks; the other executor runs them once it is idle. In the second case that
    # call counts as long only well after the other executor went idle: the broker's
    # periodic check takes the tasks back then.
    res = run_driver(_PRELUDE + '''
ray.init(num_cpus=2)
for _ in range(5):
    ray.get([step.remote(-1) for _ in range(200)])
blocker = step.remote(0, gate=True)
shorts = [step.remote(i) for i in range(1, 401)]
got = ray.get(shorts, timeout=60)  # all of them while the blocker still runs
assert [i for i, _ in got] == list(range(1, 401))
assert not os.path.exists(GATE)
open(GATE, "w").close()
assert ray.get(blocker, timeout=30)[0] == 0
print("ok")
''', timeout=130, **env)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "ok" in res.stdout


@pytest.mark.timeout(150)
def test_side_effects_of_one_caller_keep_their_order_on_one_executor(run_driver):
    res = run_driver(_PRELUDE + '''
ray.init(num_cpus=1)
ray.get(step.remote(-1))
os.remove(LOG)
refs = [step.remote(i) for i in range(2000)]
assert [i for i, _ in ray.get(refs, timeout=90)] == list(range(2000))
assert logged() == list(range(2000))
print("ok")
''', timeout=130, **_WINDOW_ENV)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "ok" in res.stdout


@pytest.mark.timeout(150)
def test_results_errors_and_output_of_tiny_tasks_in_windows(run_driver):
    res = run_driver('''
import numpy as np
import zray as ray
ray.init(num_cpus=2)

class Oops(Exception):
    pass

@ray.remote
def tiny(i):
    if i % 7 == 3:
        raise Oops(f"bad {i}")
    if i % 11 == 5:
        print(f"said {i}")
    return i

@ray.remote(num_returns=2)
def pair(i):
    return i, -i

@ray.remote
def big(i):
    return np.full(300_000, i, dtype=np.int64)  # (into the node's store)

@ray.remote
def holder(i):
    return [ray.put(i)]  # a result holding a ref

@ray.remote
def ident(i):
    return i

@ray.remote
def getter(refs):
    return ray.get(refs[0]) + 1  # waits for a result that may sit in a held DONE

for _ in range(3):
    ray.get([tiny.remote(0) for _ in range(300)])
    ray.get([getter.remote([ident.remote(0)]) for _ in range(100)])
for round_ in range(3):
    refs = [tiny.remote(i) for i in range(500)]
    for i, ref in enumerate(refs):
        if i % 7 == 3:
            try:
                ray.get(ref, timeout=60)
                raise SystemExit(f"task {i} did not raise")
            except Oops as e:
                assert f"bad {i}" in str(e)
        else:
            assert ray.get(ref, timeout=60) == i
    pairs = [pair.remote(i) for i in range(200)]
    assert ray.get([r for p in pairs for r in p], timeout=60) == [
        v for i in range(200) for v in (i, -i)]
    bigs = ray.get([big.remote(i) for i in range(20)], timeout=60)
    assert [int(b[0]) for b in bigs] == list(range(20)) and all(len(b) == 300_000 for b in bigs)
    inner = ray.get([holder.remote(i) for i in range(100)], timeout=60)
    assert ray.get([r[0] for r in inner], timeout=60) == list(range(100))
    vals = [ident.remote(10 * i) for i in range(50)]
    chained = [getter.remote([v]) for v in vals]
    assert ray.get(chained, timeout=60) == [10 * i + 1 for i in range(50)]
print("driver done")
''', timeout=130)
    assert res.returncode == 0, (res.stdout, res.stderr)
    said = re.findall(r"^\(tiny pid=\d+\) said (\d+)$", res.stdout, re.M)
    expected = [str(i) for i in range(500) if i % 11 == 5 and i % 7 != 3]
    assert sorted(said, key=int) == sorted(expected * 3, key=int), res.stdout[-2000:]
    assert "driver done" in res.stdout
