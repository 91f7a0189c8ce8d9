"""The broker's and executors' environment knobs (ZRAY_EXEC_WINDOW, ZRAY_EXEC_HOLD,
ZRAY_EXEC_SHORT_S, ZRAY_EXEC_LONG_S): a bad value is an error naming the variable, at
``zray.init`` and at ``zray broker`` / ``zray worker``, never raised to a default
silently (0 used to become 1) nor a cluster whose executors die at start."""

import subprocess

import pytest
from conftest import driver_env, kill_tree
from test_cli_cluster import _free_port, _zray_cmd

_INIT = """
import zray
try:
    zray.init(num_cpus=1)
except ValueError as e:
    print("REFUSED:", e)
else:
    @zray.remote
    def f(i):
        return i * 2
    print("RESULTS:", sum(zray.get([f.remote(i) for i in range(20)], timeout=60)))
    zray.shutdown()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,value,what", [
    ("ZRAY_EXEC_WINDOW", "0", "a task count (1..1024)"),
    ("ZRAY_EXEC_WINDOW", "eight", "a task count (1..1024)"),
    ("ZRAY_EXEC_HOLD", "0", "a count of DONEs (1..1024)"),
    ("ZRAY_EXEC_HOLD", "2.5", "a count of DONEs (1..1024)"),
    ("ZRAY_EXEC_SHORT_S", "-1", "a time in seconds"),
    ("ZRAY_EXEC_LONG_S", "nan", "a time in seconds"),
    ("ZRAY_TASK_LEASES", "yes", "0 or 1"),
    ("ZRAY_TASK_LEASE_IDLE_MS", "0", "milliseconds (1..60000)"),
    ("ZRAY_SCHED_RETRY_S", "0", "a time in seconds"),
])
def test_init_refuses_a_bad_knob(run_driver, name, value, what):
    r = run_driver(_INIT, timeout=90, **{name: value})
    assert r.returncode == 0, r.stderr
    assert f"REFUSED: {name} must be {what}" in r.stdout, (r.stdout, r.stderr)
    assert repr(value) in r.stdout


@pytest.mark.timeout(120)
def test_good_knobs_run_tasks(run_driver):
    r = run_driver(_INIT, timeout=90, ZRAY_EXEC_WINDOW="1", ZRAY_EXEC_HOLD="1",
                   ZRAY_EXEC_SHORT_S="0", ZRAY_EXEC_LONG_S="5")
    assert r.returncode == 0, r.stderr
    assert "RESULTS: 380" in r.stdout, (r.stdout, r.stderr)


def _cli(args, timeout=60, **env):
    proc = subprocess.Popen(_zray_cmd() + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, env=driver_env(**env),
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"zray {args[0]} did not exit with a bad knob:\n{out}")
    return proc.returncode, out


@pytest.mark.timeout(120)
def test_cli_broker_and_worker_refuse_a_bad_knob(tmp_path):
    code, out = _cli(["broker", "--host", "127.0.0.1", "--port", str(_free_port()),
                      "--state-dir", str(tmp_path / "state")], ZRAY_EXEC_LONG_S="soon",
                     ZRAY_TMPDIR=str(tmp_path / "t1"))
    assert code != 0 and "ZRAY_EXEC_LONG_S must be a time in seconds" in out, out
    # (the worker checks before it connects: no broker is needed to see the refusal)
    code, out = _cli(["worker", "--address", f"tcp://127.0.0.1:{_free_port()}",
                      "--num-cpus", "1"], ZRAY_EXEC_HOLD="0", ZRAY_TMPDIR=str(tmp_path / "t2"))
    assert code != 0 and "ZRAY_EXEC_HOLD must be a count of DONEs (1..1024), got '0'" in out, out
