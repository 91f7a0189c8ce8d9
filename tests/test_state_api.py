"""The state API (``zray.util.state``) against real clusters: an embedded one for tasks,
actors, objects and jobs; a CLI-started two-node cluster for nodes (one leaves) and for
an explicit ``address``; a driver whose broker keeps a tiny event log for the
``raise_on_missing_output`` contract.
"""

import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
from conftest import poll_until, wait_gone

import zray
from zray.util import state

pytestmark = pytest.mark.timeout(180)


@zray.remote
def square(x):
    return x * x


@zray.remote
def explode():
    raise ValueError("boom")


@zray.remote
def wait_for_file(path):
    import time

    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.path.exists(path)


@zray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n


def test_list_tasks_fields_states_and_filters(ray_local, tmp_path):
    assert zray.get([square.remote(i) for i in range(3)]) == [0, 1, 4]
    bad = explode.remote()
    with pytest.raises(zray.exceptions.RayTaskError):
        zray.get(bad)
    flag = str(tmp_path / "go")
    blocked = wait_for_file.remote(flag)

    def running():
        rows = state.list_tasks(filters=[("state", "=", "RUNNING"),
                                         ("func_or_class_name", "=", "wait_for_file")])
        return rows
    rows = poll_until(running, 60, what="wait_for_file to be RUNNING")
    assert len(rows) == 1
    row = rows[0]
    assert row["task_id"] == blocked.task_id().hex()
    assert row["type"] == "NORMAL_TASK" and row["name"] == "wait_for_file"
    assert row["worker_pid"] and row["node_id"] and row["worker_id"]
    assert row["job_id"] == zray.get_runtime_context().get_job_id()

    def squares_finished():  # (a DONE may reach the broker after the value its owner)
        rows = [t for t in state.list_tasks(limit=1000) if t["func_or_class_name"] == "square"]
        return len(rows) >= 3 and all(t["state"] == "FINISHED" for t in rows) and rows
    squares = poll_until(squares_finished, 30, what="the squares to be FINISHED")
    assert "error_message" not in squares[0]  # a detail column
    failed = state.list_tasks(filters=[("state", "=", "failed")])  # case-insensitive
    assert [t["task_id"] for t in failed] == [bad.task_id().hex()]
    assert failed[0]["error_type"] == "TASK_EXECUTION_EXCEPTION"
    not_failed = state.list_tasks(filters=[("state", "!=", "FAILED")], limit=1000)
    assert bad.task_id().hex() not in {t["task_id"] for t in not_failed}

    # get_task by ObjectRef or hex id: every column, with its state history
    got = state.get_task(bad)
    assert got == state.get_task(bad.task_id().hex())
    assert got["state"] == "FAILED" and got["required_resources"] == {"CPU": 1.0}
    assert [e["state"] for e in got["events"]][-2:] == ["RUNNING", "FAILED"]
    assert got["start_time_ms"] <= got["end_time_ms"]
    assert state.get_task("00" * 12) is None

    open(flag, "w").close()
    assert zray.get(blocked, timeout=60) is True
    # the value can reach its owner before the executor's DONE reaches the broker
    done = poll_until(lambda: (t := state.get_task(blocked))["state"] == "FINISHED" and t, 30,
                      what="the task to be FINISHED")
    assert done["worker_pid"] is None
    json.dumps(state.list_tasks(detail=True, limit=1000))  # plain JSON


def test_limit_warns_and_bad_arguments_name_the_problem(ray_local):
    zray.get([square.remote(i) for i in range(5)])
    with pytest.warns(UserWarning, match="Limit last 2 entries"):
        rows = state.list_tasks(limit=2)
    assert len(rows) == 2
    with pytest.raises(ValueError, match="'colour' is not a column of tasks"):
        state.list_tasks(filters=[("colour", "=", "red")])
    with pytest.raises(ValueError, match="predicate"):
        state.list_tasks(filters=[("state", ">", "RUNNING")])
    with pytest.raises(ValueError, match="limit"):
        state.list_actors(limit=0)
    with pytest.raises(ValueError, match="not a hex string"):
        state.get_actor("not-an-id")
    with pytest.raises(ValueError, match="timeout"):
        state.list_nodes(timeout=-1)


def test_actors_listed_got_killed_and_summarized(ray_local):
    c = Counter.options(name="state_counter").remote()
    assert zray.get([c.incr.remote() for _ in range(3)]) == [1, 2, 3]
    actor_id = c._actor_id.hex()
    rows = state.list_actors(filters=[("class_name", "=", "Counter")])
    assert [r["actor_id"] for r in rows] == [actor_id]
    assert rows[0]["state"] == "ALIVE" and rows[0]["name"] == "state_counter"
    assert rows[0]["pid"] > 0 and rows[0]["node_id"]
    # Calls that went straight to the actor are reported by its executor about once a
    # second (zray/_direct.py): poll until all three are listed.
    calls = poll_until(
        lambda: (c := state.list_tasks(filters=[("actor_id", "=", actor_id),
                                                ("type", "=", "ACTOR_TASK")])) and len(c) >= 3
        and c, 30, what="the three calls listed")
    assert len(calls) == 3 and {t["name"] for t in calls} == {"Counter.incr"}

    zray.kill(c)
    dead = poll_until(lambda: (a := state.get_actor(actor_id)) and a["state"] == "DEAD" and a,
                      30, what="the actor to be DEAD")
    assert dead["death_cause"]["actor_died_error_context"]["error_message"]
    summary = state.summarize_actors()["cluster"]
    assert summary["summary"]["Counter"]["state_counts"].get("DEAD", 0) >= 1
    assert summary["total_actors"] >= 1
    def calls_finished():
        c = state.summarize_tasks()["cluster"]
        return c["summary"]["Counter.incr"]["state_counts"].get("FINISHED", 0) >= 3 and c
    tasks = poll_until(calls_finished, 30, what="the calls to be FINISHED")
    assert tasks["summary"]["Counter.incr"]["type"] == "ACTOR_TASK"
    assert tasks["dropped_events"] == 0


def test_objects_and_jobs(ray_local):
    big = zray.put(b"x" * 300_000)
    small = zray.put(7)
    rows = {r["object_id"]: r for r in state.list_objects(limit=10_000, detail=True)}
    assert rows[big.hex()]["object_size"] >= 300_000
    assert rows[big.hex()]["type"] == "DRIVER" and rows[big.hex()]["pid"] == os.getpid()
    assert rows[big.hex()]["locations"]  # a store object lives on a node
    assert small.hex() in rows
    summary = state.summarize_objects()["cluster"]
    assert summary["total_objects"] >= 2 and summary["total_size_mb"] >= 0.3
    jobs = state.list_jobs()
    me = zray.get_runtime_context().get_job_id()
    mine = [j for j in jobs if j["job_id"] == me][0]
    assert mine["status"] == "RUNNING" and mine["end_time"] is None and mine["start_time"] > 0


def test_ended_driver_jobs_are_listed_as_succeeded(ray_local):
    """As in Ray: a driver job is RUNNING while its driver is connected, SUCCEEDED once
    it exited, with its start and end times (ms since the epoch)."""
    import time

    from conftest import driver_env

    before = int(time.time() * 1000)
    code = ("import os, sys, zray\n"
            "zray.init(address=sys.argv[1], namespace='gone-ns')\n"
            "print('JOB', zray.get_runtime_context().get_job_id(), os.getpid(), flush=True)\n"
            "zray.get(zray.remote(lambda: 1).remote())\n")
    out = subprocess.run([sys.executable, "-c", code, zray._runtime.client.address],
                         env=driver_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id, pid = [ln.split()[1:] for ln in out.stdout.splitlines() if ln.startswith("JOB ")][0]
    # the broker handles the driver's EXIT on its own time: wait for it
    rows = poll_until(lambda: [r for r in state.list_jobs(filters=[("job_id", "=", job_id)])
                               if r["status"] == "SUCCEEDED"], 60, what="the job to end")
    assert len(rows) == 1, state.list_jobs()
    row = rows[0]
    assert row["type"] == "DRIVER"
    assert row["namespace"] == "gone-ns" and row["driver_info"]["pid"] == int(pid)
    assert before <= row["start_time"] <= row["end_time"] <= int(time.time() * 1000)
    assert row["message"] == "the driver exited"
    assert state.list_jobs(filters=[("status", "=", "SUCCEEDED"), ("job_id", "=", job_id)])
    me = zray.get_runtime_context().get_job_id()
    assert [j["status"] for j in state.list_jobs() if j["job_id"] == me] == ["RUNNING"]
    json.dumps(rows)


def test_ended_jobs_record_is_bounded():
    from brokerd.jobhistory import EndedJobs

    ended = EndedJobs(limit=3)
    for i in range(5):
        ended.add(bytes([i]) * 4, {"namespace": f"ns{i}", "driver": b"d", "start_ms": i},
                  100 + i, None, normal=i != 4)
    rows = ended.rows()
    assert [r["namespace"] for r in rows] == ["ns2", "ns3", "ns4"]  # the newest three
    assert rows[-1]["message"] == "the driver fell silent; its job was released"
    assert all(r["status"] == "SUCCEEDED" and r["end_time"] >= r["start_time"] for r in rows)


def test_placement_groups_listed_with_state_and_bundles(ray_local):
    from zray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 1}], strategy="PACK", name="state-api-pg")
    zray.get(pg.ready(), timeout=60)
    pg_hex = pg.id.hex()
    rows = state.list_placement_groups(filters=[("placement_group_id", "=", pg_hex)])
    assert [(r["name"], r["state"]) for r in rows] == [("state-api-pg", "CREATED")]
    assert set(rows[0]) == {"placement_group_id", "name", "creator_job_id", "state"}
    assert rows[0]["creator_job_id"] == zray.get_runtime_context().get_job_id()
    detail = state.list_placement_groups(filters=[("name", "=", "state-api-pg")], detail=True)
    bundle = detail[0]["bundles"][0]
    assert bundle["unit_resources"] == {"CPU": 1.0} and bundle["node_id"]
    assert detail[0]["strategy"] == "PACK" and detail[0]["is_detached"] is False
    json.dumps(detail)
    remove_placement_group(pg)
    poll_until(lambda: [r["state"] for r in state.list_placement_groups(
        filters=[("placement_group_id", "=", pg_hex)])] == ["REMOVED"], 30, what="REMOVED row")


def test_rows_are_json_and_warning_free(ray_local):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (state.list_nodes, state.list_actors, state.list_objects, state.list_jobs):
            json.dumps(fn(detail=True, limit=10_000))
    for fn in (state.summarize_tasks, state.summarize_actors, state.summarize_objects):
        json.dumps(fn())


def test_nodes_on_a_cli_cluster_with_explicit_address(tmp_path):
    from test_cli_cluster import _free_port, _Procs

    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = _Procs(tmp_path)
    try:
        procs.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(port)])
        procs.start("a", ["worker", "--address", address, "--num-cpus", "1",
                          "--resources", '{"nodeA": 1}'])
        procs.start("b", ["worker", "--address", address, "--num-cpus", "1"])

        def two():
            procs.check_running()
            try:
                rows = state.list_nodes(address=address, timeout=5)
            except ConnectionError:
                return None
            return rows if len(rows) == 2 else None

        nodes = poll_until(two, 60, interval=0.2, what="two nodes")
        assert {n["state"] for n in nodes} == {"ALIVE"}
        assert sum(n["is_head_node"] for n in nodes) == 1
        node_a = [n for n in nodes if n["resources_total"].get("nodeA")][0]
        assert state.get_node(node_a["node_id"], address=address)["resources_available"]
        assert state.list_nodes(address=address, filters=[("state", "=", "DEAD")]) == []
        gone = procs.descendants()
        procs.procs["a"].send_signal(signal.SIGTERM)
        procs.procs["a"].wait(30)
        dead = poll_until(lambda: state.list_nodes(address=address,
                                                   filters=[("state", "=", "DEAD")]),
                          60, interval=0.2, what="node A to be DEAD")
        assert [n["node_id"] for n in dead] == [node_a["node_id"]]
        assert state.get_node(node_a["node_id"], address=address)["end_time_ms"] > 0
        assert len(state.list_nodes(address=address)) == 2
        lost = [e for e in state.list_cluster_events(address=address)
                if e["message"].startswith("node " + node_a["node_id"])]
        assert lost and lost[0]["severity"] == "ERROR", lost
        from test_cli_cluster import _zray_cmd

        for resource, expect in (("cluster-events", node_a["node_id"]),
                                 ("workers", "WORKER")):
            out = subprocess.run(_zray_cmd() + ["list", resource, "--address", address],
                                 capture_output=True, text=True, env=procs.env, timeout=60)
            assert out.returncode == 0 and expect in out.stdout, (out.stdout, out.stderr)
        for p in procs.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.procs.values():
            p.wait(30)
        assert not wait_gone(gone, 15)
    finally:
        procs.kill_all()


def test_dropped_events_raise_unless_missing_output_is_accepted(run_driver):
    out = run_driver("""
import warnings, zray
from zray.util import state
from zray.util.state import RayStateApiException
zray.init(num_cpus=1)

@zray.remote
def f(i):
    return i

zray.get([f.remote(i) for i in range(80)])
try:
    state.list_tasks()
    print("NO RAISE")
except RayStateApiException as e:
    print("RAISED", "raise_on_missing_output=False" in str(e))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    rows = state.list_tasks(raise_on_missing_output=False, limit=1000)
    print("ROWS", 0 < len(rows) < 80, any("dropped" in str(x.message) for x in w))
print("SUMMARY", state.summarize_tasks(raise_on_missing_output=False)["cluster"]["dropped_events"] > 0)
zray.shutdown()
""", timeout=120, ZRAY_EVENT_LOG_LEN="30")
    assert out.returncode == 0, out.stderr
    assert "RAISED True" in out.stdout, out.stdout
    assert "ROWS True True" in out.stdout, out.stdout
    assert "SUMMARY True" in out.stdout, out.stdout


def test_state_calls_need_a_cluster(tmp_path):
    env = {"ZRAY_TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c",
         "from zray.util import state\n"
         "try:\n state.list_nodes()\nexcept ConnectionError as e:\n print('ERR', e)\n"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert "ERR" in out.stdout and "no running zray cluster" in out.stdout, out


@zray.remote
class Talker:
    def say(self, text):
        print(text, flush=True)
        return os.getpid()


@zray.remote
def shout(text):
    print(text, flush=True)
    return zray.get_runtime_context().get_task_id()


def test_workers_and_get_by_id(ray_local):
    t = Talker.remote()
    actor_pid = zray.get(t.say.remote("hello"))
    me = zray.get_runtime_context().get_job_id()
    workers = state.list_workers(limit=10_000, detail=True)
    drivers = [w for w in workers if w["worker_type"] == "DRIVER" and w["pid"] == os.getpid()]
    assert len(drivers) == 1 and drivers[0]["is_alive"] and drivers[0]["job_id"] == me
    actor_rows = [w for w in workers if w["pid"] == actor_pid]
    assert len(actor_rows) == 1, workers
    row = actor_rows[0]
    assert row["worker_type"] == "WORKER" and row["state"] == "actor" and row["node_id"]
    assert row["actor_id"] == t._actor_id.hex()
    assert state.get_worker(row["worker_id"])["pid"] == actor_pid
    assert state.get_worker("00" * 8) is None
    assert state.get_job(me)["status"] == "RUNNING"
    ref = zray.put(b"y" * 200_000)
    assert [r["object_id"] for r in state.get_objects(ref.hex())] == [ref.hex()]
    with pytest.raises(ValueError, match="hex digits"):
        state.get_worker("abcd")


def test_list_logs_and_get_log(ray_local):
    t = Talker.remote()
    actor_pid = zray.get(t.say.remote("first line from the actor"))
    groups = state.list_logs()
    assert "node.log" in groups["node"], groups
    assert any(n.startswith("executor-") for n in groups["worker"]), groups
    only = state.list_logs(glob_filter="node*")
    assert set(only) == {"node"}, only
    node_id = zray.get_runtime_context().get_node_id()
    assert state.list_logs(node_id=node_id) == groups

    def has(gen_args, text):
        return text in "".join(state.get_log(**gen_args))

    poll_until(lambda: has({"actor_id": t._actor_id.hex()}, "first line from the actor"), 30,
               what="the actor's line in its log")
    assert has({"pid": actor_pid}, "first line from the actor")
    task_hex = zray.get(shout.remote("a line of one task"))
    poll_until(lambda: has({"task_id": task_hex}, "a line of one task"), 30,
               what="the task's line")
    tail = "".join(state.get_log(filename="node.log", node_id=node_id, tail=3))
    assert 1 <= tail.count("\n") <= 3

    follow = state.get_log(actor_id=t._actor_id.hex(), follow=True, tail=1, _interval=0.05)
    assert "first line from the actor" in next(follow)  # the last line, then what follows
    zray.get(t.say.remote("said after follow began"))
    seen = ""
    while "said after follow began" not in seen:  # bounded by the test's timeout
        seen += next(follow)
    follow.close()

    for bad, match in (({"filename": "node.log", "suffix": "err"}, "suffix='err'"),
                       ({"filename": "node.log", "pid": 1}, "exactly one"),
                       ({}, "exactly one"),
                       ({"submission_id": "raysubmit_x"}, "JobSubmissionClient"),
                       ({"filename": "node.log", "encoding": "no-such-codec"}, "encoding"),
                       ({"filename": "node.log", "errors": "no-such-handler"}, "errors"),
                       ({"filename": "node.log", "tail": -5}, "tail")):
        with pytest.raises(ValueError, match=match):
            state.get_log(**bad)
    with pytest.raises(state.RayStateApiException, match="No such file"):
        list(state.get_log(filename="no-such.log", node_id=node_id))


@zray.remote(max_restarts=1)
class Fragile:
    def pid(self):
        return os.getpid()


def test_cluster_events_say_what_died(ray_local):
    a = Fragile.remote()
    pid = zray.get(a.pid.remote())
    worker = [w for w in state.list_workers(limit=10_000) if w["pid"] == pid][0]["worker_id"]
    os.kill(pid, signal.SIGKILL)
    def restarted():
        try:
            return zray.get(a.pid.remote(), timeout=30) != pid
        except zray.exceptions.ActorUnavailableError:  # restarting: ask again
            return False

    poll_until(restarted, 60, what="the actor to restart")
    aid = a._actor_id.hex()
    def both():
        events = [e for e in state.list_cluster_events(limit=10_000, detail=True)
                  if e["custom_fields"].get("id") in (aid, worker)]
        ids = {e["custom_fields"]["id"] for e in events}
        return events if ids == {aid, worker} else None

    events = poll_until(both, 30, what="the actor's and its worker's events")
    restarting = [e for e in events if e["custom_fields"].get("id") == aid]
    assert restarting and restarting[0]["severity"] == "WARNING", events
    assert "RESTARTING" in restarting[0]["message"]
    assert any(e["source_type"] == "RAYLET" and e["custom_fields"]["id"] == worker
               for e in events), events
    times = [e["time"] for e in state.list_cluster_events(limit=10_000)]
    assert times == sorted(times)
    zray.kill(a)
    poll_until(lambda: any(e["severity"] == "ERROR" and "DEAD" in e["message"] and aid in
                           e["message"] for e in state.list_cluster_events(limit=10_000)),
               30, what="the actor's death event")


@zray.remote
class Direct:
    def ok(self, i):
        return i

    def bad(self):
        raise ValueError("no")


def test_direct_actor_calls_are_in_the_task_list(ray_local):
    """Calls that went straight to the actor (no broker message each) are listed as the
    broker's own are: their executor reports them in batches."""
    a = Direct.remote()
    assert zray.get(a.ok.remote(0)) == 0  # the route is known from here on
    assert zray.get([a.ok.remote(i) for i in range(1, 51)]) == list(range(1, 51))
    with pytest.raises(zray.exceptions.RayTaskError):
        zray.get(a.bad.remote())
    aid = a._actor_id.hex()

    def listed():
        rows = state.list_tasks(filters=[("actor_id", "=", aid), ("type", "=", "ACTOR_TASK")],
                                limit=10_000, raise_on_missing_output=False)
        done = [r for r in rows if r["state"] == "FINISHED" and r["name"] == "Direct.ok"]
        failed = [r for r in rows if r["state"] == "FAILED" and r["name"] == "Direct.bad"]
        return (done, failed) if len(done) >= 51 and failed else None

    done, failed = poll_until(listed, 30, what="the 52 calls in the task list")
    assert len({r["task_id"] for r in done}) == len(done)
    assert all(r["node_id"] for r in done + failed)
    # what it raised is the call's own error, as for a broker-path call (it said WORKER_DIED)
    assert [r["error_type"] for r in failed] == ["TASK_EXECUTION_EXCEPTION"] * len(failed)
    summary = state.summarize_tasks(raise_on_missing_output=False)["cluster"]["summary"]
    assert summary["Direct.ok"]["state_counts"]["FINISHED"] >= 51


@zray.remote
class Forger:
    def report(self, args):
        from zray import _runtime

        try:
            _runtime.client.request("direct_stats", args, timeout=30)
            return "accepted"
        except ValueError as e:
            return str(e)


def test_bad_direct_call_reports_are_refused(ray_local):
    """An actor's process reports its direct calls to the broker: what it sends is checked
    field by field, and a bad report changes nothing in the task list."""
    f = Forger.remote()
    tid = os.urandom(12)
    bad = [{"calls": 1, "failed": 0, "events": "x"},
           {"calls": 1, "failed": 0, "events": [[tid, "n", 1.0, 2.0]]},
           {"calls": 1, "failed": 0, "events": [[b"short", "n", 1.0, 2.0, False]]},
           {"calls": 1, "failed": 0, "events": [[tid, 5, 1.0, 2.0, False]]},
           {"calls": 1, "failed": 0, "events": [[tid, "n", "t", 2.0, False]]},
           {"calls": 1, "failed": 0, "events": [], "dropped": -1},
           {"calls": 1, "failed": 0, "events": [[tid, "n", 1.0, 2.0, False]] * 5001},
           {"calls": -1, "failed": 0},
           {"calls": 2, "failed": 0, "events": [[tid, "n", 1.0, 2.0, False],
                                                [tid, "n", 1.0, 2.0, None]]}]
    for args in bad:
        assert "direct_stats" in zray.get(f.report.remote(args), timeout=60), args
    rows = state.list_tasks(filters=[("task_id", "=", tid.hex())], raise_on_missing_output=False)
    assert rows == []
    assert zray.get(f.report.remote({"calls": 1, "failed": 0,
                                     "events": [[tid, "Forger.ok", 1.0, 2.0, False]]}),
                    timeout=60) == "accepted"
