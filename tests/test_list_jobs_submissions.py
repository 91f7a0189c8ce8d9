"""``list_jobs`` shows the jobs submitted through the job API beside the drivers started
by hand, as Ray's does: one SUBMISSION row per submitted job (with its driver's job id
once that driver connected, its entrypoint, status and metadata), one DRIVER row per
driver no submission started.

A CLI cluster with ``zray dashboard``; jobs go through Ray's ``JobSubmissionClient``;
this process is a driver too and lists the jobs with ``zray.util.state.list_jobs``.
"""

import textwrap

import pytest
from conftest import poll_until
from dash_cluster import DashCluster, wait_job_end

import zray
from zray.util import state

DRIVER = textwrap.dedent("""
    import zray
    zray.init()

    @zray.remote
    def one():
        return 1

    print("sum", sum(zray.get([one.remote() for _ in range(3)])))
""")


@pytest.mark.timeout(180)
def test_list_jobs_merges_submissions_and_drivers(tmp_path):
    c = DashCluster(tmp_path, workers=1)
    try:
        c.start()
        client = c.job_client()
        wd = tmp_path / "project"
        wd.mkdir()
        (wd / "driver.py").write_text(DRIVER)
        with_driver = client.submit_job(entrypoint="python driver.py", submission_id="with-driver",
                                        runtime_env={"working_dir": str(wd)},
                                        metadata={"team": "blue"})
        no_driver = client.submit_job(entrypoint="exit 4", submission_id="no-driver")
        for sid in (with_driver, no_driver):
            wait_job_end(client, sid)
        assert "sum 3" in client.get_job_logs(with_driver)

        zray.init(address=c.address)
        me = zray.get_runtime_context().get_job_id()

        def rows():
            got = {r["submission_id"] or r["job_id"]: r for r in state.list_jobs()}
            done = (got.get(with_driver, {}).get("status") == "SUCCEEDED"
                    and got.get(no_driver, {}).get("status") == "FAILED")
            return done and got

        got = poll_until(rows, 30, interval=0.2, what="both submissions in list_jobs")
        sub = got[with_driver]
        assert sub["type"] == "SUBMISSION" and sub["entrypoint"] == "python driver.py"
        assert sub["metadata"] == {"team": "blue"} and sub["driver_exit_code"] == 0
        assert sub["job_id"] and sub["driver_info"]["id"], sub  # its driver, merged in
        assert sub["start_time"] <= sub["end_time"]
        # its driver is not listed a second time as a DRIVER job
        assert [r for r in got.values() if r["job_id"] == sub["job_id"]] == [sub]
        failed = got[no_driver]
        assert failed["type"] == "SUBMISSION" and failed["job_id"] is None
        assert failed["driver_exit_code"] == 4 and failed["entrypoint"] == "exit 4"
        mine = got[me]
        assert mine["type"] == "DRIVER" and mine["status"] == "RUNNING"
        assert mine["submission_id"] is None
        # filters work on the new columns, as in Ray
        only = state.list_jobs(filters=[("type", "=", "SUBMISSION")])
        assert {r["submission_id"] for r in only} == {with_driver, no_driver}
    finally:
        c.stop()
