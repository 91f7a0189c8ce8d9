"""``ray.util.state.list_runtime_envs``: the runtime environments set up on each node, with
Ray's RuntimeEnvState fields. Written to run on Ray too (``ZRAY_TEST_BACKEND=ray``) where
Ray's dashboard is installed (its state API goes through it)."""

import importlib

import pytest
from backend import BACKEND, pickle_by_value, ray
from conftest import poll_until

state = importlib.import_module(f"{BACKEND}.util.state")

pickle_by_value(__name__)


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    """The job's working_dir (Ray takes a local folder only at the job level)."""
    path = tmp_path_factory.mktemp("renv") / "project"
    path.mkdir()
    (path / "marker.txt").write_text("in the working dir")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, runtime_env={"working_dir": str(path)})
    try:
        yield path
    finally:
        ray.shutdown()


@ray.remote
def read_file():
    with open("marker.txt") as f:
        return f.read()


@pytest.mark.timeout(120)
@pytest.mark.skipif(BACKEND == "ray", reason="Ray's state API needs its dashboard "
                    "(ray[default]: aiohttp), which the Ray test venv does not have")
def test_list_runtime_envs_shows_a_working_dir_env(wd):
    assert ray.get(read_file.remote(), timeout=90) == "in the working dir"
    node_id = ray.get_runtime_context().get_node_id()

    def with_wd(detail):
        rows = state.list_runtime_envs(detail=detail)
        return [r for r in rows if "working_dir" in (r["runtime_env"] or {})]

    rows = poll_until(lambda: with_wd(False), 30, interval=0.2, what="the env to be listed")
    row = rows[0]
    assert row["success"] is True and row["node_id"] == node_id
    assert row["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")
    assert {"runtime_env", "success", "creation_time_ms", "node_id"} <= set(row)
    assert row.runtime_env == row["runtime_env"]  # (rows are attribute-readable, as Ray's)
    [full] = with_wd(True)[:1]
    assert full["error"] is None and full["ref_cnt"] >= 0
    assert state.list_runtime_envs(filters=[("node_id", "=", "0" * 56)]) == []
    with pytest.raises(Exception, match="no_such_column"):
        state.list_runtime_envs(filters=[("no_such_column", "=", 1)])


@pytest.mark.timeout(120)
@pytest.mark.skipif(BACKEND == "ray", reason="Ray's state API needs its dashboard "
                    "(ray[default]: aiohttp), which the Ray test venv does not have")
def test_a_failed_setup_is_listed_with_its_error(wd):
    bad = {"worker_process_setup_hook": "no_such_module_for_renv_state.setup"}
    with pytest.raises(ray.exceptions.RuntimeEnvSetupError):
        ray.get(read_file.options(runtime_env=bad).remote(), timeout=90)

    def failed():
        return [r for r in state.list_runtime_envs(detail=True,
                                                   filters=[("success", "=", False)])
                if (r["runtime_env"] or {}).get("worker_process_setup_hook")]

    [row] = poll_until(failed, 30, interval=0.2, what="the failed env to be listed")
    assert row["runtime_env"]["worker_process_setup_hook"] == bad["worker_process_setup_hook"]
    assert "no_such_module_for_renv_state" in row["error"]
    assert row["node_id"] == ray.get_runtime_context().get_node_id()
