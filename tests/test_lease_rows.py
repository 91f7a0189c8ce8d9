"""A leased task's row in the state API looks like the broker path's (issue 14).

Tasks that run on a leased executor (zray/_lease.py, workerd/lease.py) never pass
through the broker; the executor reports them in its books (REQ lease_books,
brokerd/leases.py) and list_tasks / get_task build their rows from that. The same
driver runs twice, with ``ZRAY_TASK_LEASES=0`` (every task through the broker) and
``=1`` (each task under test went on a lease): a task that returns, one that raises,
one retried after an error its ``retry_exceptions`` covers, and a task submitted by a
task. Every field list_tasks shows (detail too) must be the same but for ids, times and
the error's text (it names the process): the attempt number, the parent task id (the
submitting task's, none for the driver's), the error type, the states of its events.
"""

import json

import pytest

pytestmark = pytest.mark.timeout(300)

DRIVER = r'''
import json, os, sys, time
import zray as ray
from zray import _lease, _runtime
from zray.util.state import list_tasks

ray.init(num_cpus=2)
LEASES = os.environ["ZRAY_TASK_LEASES"] == "1"


def sent():
    leases = _runtime.client.leases
    return leases.sent if leases is not None else 0


@ray.remote
def leaf(x):
    return x + 1


@ray.remote
def maybe_raise(flag):
    if flag:
        raise ValueError("boom")
    return "ok"


@ray.remote
def raise_once(path):
    if path and not os.path.exists(path):
        open(path, "w").close()
        raise ValueError("first try")
    return "ok"


@ray.remote
def parent(n):
    from zray import _runtime

    def sent():
        leases = _runtime.client.leases
        return leases.sent if leases is not None else 0

    for i in range(n):  # a streak: this executor takes a lease for its own children
        ray.get(leaf.remote(i), timeout=60)
    before = sent()
    ref = leaf.remote(100)
    assert ray.get(ref, timeout=60) == 101
    return ref.task_id().hex(), ray.get_runtime_context().get_task_id(), sent() - before


def run_case(fn, streak_args, args, opts, expect_error=False):
    """A streak of sync calls (the lease), then the call under test; again until it
    went on a lease (one is refused while the pool starts, then asked for again
    REFUSED_BACKOFF_S later; a loaded machine may let one idle out)."""
    deadline = time.monotonic() + 60
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        for _ in range(_lease.STREAK + 2):
            ray.get(fn.options(**opts).remote(*streak_args), timeout=60)
        before = sent()
        ref = fn.options(**opts).remote(*args(attempt))
        try:
            ray.get(ref, timeout=60)
            assert not expect_error
        except ValueError:
            assert expect_error
        if not LEASES or sent() == before + 1:
            return ref.task_id().hex()
    raise AssertionError(f"{fn} never went on a lease")


tmp = sys.argv[1]
ids = {
    "returned": run_case(leaf, (0,), lambda a: (1,), {}),
    "raised": run_case(maybe_raise, (False,), lambda a: (True,), {}, expect_error=True),
    "retried": run_case(raise_once, ("",), lambda a: (os.path.join(tmp, f"once{a}"),),
                        {"max_retries": 2, "retry_exceptions": True}),
}
deadline = time.monotonic() + 90
while True:
    child, outer, on_lease = ray.get(parent.options(scheduling_strategy="DEFAULT").remote(10),
                                     timeout=120)
    if on_lease == 1 or not LEASES:
        break
    assert time.monotonic() < deadline, "the child never went on its parent's lease"
ids["child"] = child

rows = {}
deadline = time.monotonic() + 60
for case, task_id in ids.items():  # (leased tasks' books come about once a second)
    while True:
        got = list_tasks(filters=[("task_id", "=", task_id)], detail=True)
        if got and got[0]["state"] in ("FINISHED", "FAILED"):
            rows[case] = got[0]
            break
        assert time.monotonic() < deadline, (case, got)
        time.sleep(0.1)
print("ROWS", json.dumps({"rows": rows, "parent": outer}))
ray.shutdown()
'''

IDS_AND_TIMES = {"task_id", "job_id", "node_id", "worker_id", "worker_pid", "parent_task_id",
                 "creation_time_ms", "start_time_ms", "end_time_ms", "error_message", "events"}


def _rows(run_driver, tmp_path, leases: str) -> dict:
    (tmp_path / leases).mkdir()
    res = run_driver(DRIVER.replace("sys.argv[1]", repr(str(tmp_path / leases))),
                     timeout=240, ZRAY_TASK_LEASES=leases, ZRAY_TASK_LEASE_IDLE_MS="3000")
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.split("ROWS ", 1)[1].splitlines()[0])


def test_leased_rows_match_broker_path_rows(run_driver, tmp_path):
    broker, leased = _rows(run_driver, tmp_path, "0"), _rows(run_driver, tmp_path, "1")
    for case in ("returned", "raised", "retried", "child"):
        b, ls = broker["rows"][case], leased["rows"][case]
        assert set(b) == set(ls)
        same = {k: b[k] for k in b if k not in IDS_AND_TIMES}
        assert same == {k: ls[k] for k in same}, case
        assert [e["state"] for e in b["events"]] == [e["state"] for e in ls["events"]], case
        assert ls["worker_pid"], case  # (a leased row names the process that ran it)
    for rows in (broker, leased):
        r = rows["rows"]
        assert [r[c]["attempt_number"] for c in ("returned", "raised", "retried", "child")] \
            == [0, 0, 1, 0]
        assert [r[c]["parent_task_id"] for c in ("returned", "raised", "retried")] == [None] * 3
        assert r["child"]["parent_task_id"] == rows["parent"]
        assert r["raised"]["state"] == "FAILED"
        assert r["raised"]["error_type"] == "TASK_EXECUTION_EXCEPTION"
        assert r["raised"]["error_message"].startswith("raised: ValueError")
        assert r["raised"]["error_message"].rstrip().endswith("ValueError: boom")
        assert r["retried"]["state"] == "FINISHED"
        assert [e["state"] for e in r["retried"]["events"]] == [
            "PENDING_NODE_ASSIGNMENT", "RUNNING", "PENDING_NODE_ASSIGNMENT", "RUNNING",
            "FINISHED"]
