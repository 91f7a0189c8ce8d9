"""Jobs as a user runs them: ``zray job submit -- python script.py`` and Ray's
``JobSubmissionClient`` against ``zray dashboard`` beside a CLI-started cluster.

The job's driver runs on the head (spawned by the dashboard), joins the cluster
through ZRAY_ADDRESS/RAY_ADDRESS, runs remote tasks, and its output lands in
the job's log.
"""

import asyncio
import json
import logging
import os
import subprocess
import textwrap

import pytest
from conftest import poll_until, wait_gone
from dash_cluster import DashCluster, http_error, start_long_job, wait_job_end
from test_cli_cluster import _zray_cmd

from zray.job_submission import JobStatus, JobSubmissionClient

SCRIPT = textwrap.dedent("""
    import os
    import zray

    zray.init()

    @zray.remote
    def square(x):
        return x * x, os.environ.get("JOB_COLOUR")

    print("squares", zray.get([square.remote(i) for i in range(4)]))
    print("cwd", os.path.basename(os.getcwd()))
    print("argv", os.environ.get("ZRAY_JOB_SUBMISSION_ID"))

    @zray.remote
    def sees_script():
        return os.path.exists("script.py")

    print("task sees the working_dir:", zray.get(sees_script.remote()))
""")


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    c = DashCluster(tmp_path_factory.mktemp("jobs"), workers=1)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(dash):
    return dash.job_client()


@pytest.mark.timeout(150)
def test_submit_runs_a_driver_on_the_cluster(dash, client, tmp_path):
    wd = tmp_path / "project"
    wd.mkdir()
    (wd / "script.py").write_text(SCRIPT)
    sid = client.submit_job(entrypoint="python script.py",
                            runtime_env={"working_dir": str(wd),
                                         "env_vars": {"JOB_COLOUR": "teal"}},
                            metadata={"owner": "test"}, submission_id="job-ok-1")
    assert sid == "job-ok-1"
    assert wait_job_end(client, sid) == JobStatus.SUCCEEDED, client.get_job_logs(sid)
    logs = client.get_job_logs(sid)
    assert "squares [(0, 'teal'), (1, 'teal'), (4, 'teal'), (9, 'teal')]" in logs, logs
    assert "argv job-ok-1" in logs
    # the folder was uploaded: the job ran in the head's unpacked copy of it
    assert "cwd project" not in logs and "cwd " in logs
    from zray.dashboard.jobs import _runtime_env_takes

    # with runtime_env working_dir support, the job's tasks run in it too (as in Ray)
    if _runtime_env_takes("working_dir", str(wd)):
        assert "task sees the working_dir: True" in logs, logs
    info = client.get_job_info(sid)
    assert info.status == JobStatus.SUCCEEDED and info.driver_exit_code == 0
    assert info.metadata == {"owner": "test"} and info.entrypoint == "python script.py"
    assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_"), info.runtime_env
    assert info.start_time <= info.end_time
    assert sid in {j.submission_id for j in client.list_jobs()}
    with pytest.raises(RuntimeError, match="already exists"):
        client.submit_job(entrypoint="true", submission_id=sid)


@pytest.mark.timeout(120)
def test_failed_and_stopped_jobs(dash, client, tmp_path):
    sid = client.submit_job(entrypoint="python -c 'import sys; print(\"bye\"); sys.exit(3)'")
    assert wait_job_end(client, sid) == JobStatus.FAILED
    info = client.get_job_info(sid)
    assert info.driver_exit_code == 3 and "exit code 3" in info.message
    assert "bye" in client.get_job_logs(sid)

    flag = tmp_path / "started"
    sid, proc = start_long_job(client, flag)
    assert client.stop_job(sid) is True
    assert wait_job_end(client, sid) == JobStatus.STOPPED
    assert wait_gone([proc], 30) == [], "the stopped job's process did not exit"
    assert client.stop_job(sid) is False
    assert client.delete_job(sid) is True
    with pytest.raises(RuntimeError, match="does not exist"):
        client.get_job_status(sid)


@pytest.mark.timeout(120)
def test_tail_job_logs_follows_until_the_end(dash, client):
    sid = client.submit_job(entrypoint="python -u -c 'import time\nfor i in range(5):\n"
                                       "    print(\"line\", i, flush=True); time.sleep(0.2)'")

    async def tail():
        return "".join([chunk async for chunk in client.tail_job_logs(sid)])

    text = asyncio.run(asyncio.wait_for(tail(), 60))
    assert [f"line {i}" for i in range(5)] == [ln for ln in text.splitlines() if ln.startswith("line")]
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED


@pytest.mark.timeout(60)
def test_bad_submissions_and_auth(dash, client, tmp_path):
    for kwargs, match in [({"entrypoint_num_cpus": 1}, "entrypoint_num_cpus"),
                          ({"runtime_env": {"conda": "env"}}, "conda"),
                          ({"runtime_env": {"working_dir": "gcs://_ray_pkg_" + "0" * 64
                                                           + ".zip"}}, "no such package"),
                          ({"runtime_env": {"env_vars": {"A": 1}}}, "env_vars"),
                          ({"submission_id": "../x"}, "submission_id")]:
        with pytest.raises(RuntimeError, match=match):
            client.submit_job(entrypoint="true", **kwargs)
    with pytest.raises(RuntimeError, match="entrypoint"):
        client.submit_job(entrypoint="  ")
    with pytest.raises(ValueError, match="not a local directory"):
        client.submit_job(entrypoint="true", runtime_env={"working_dir": str(tmp_path / "nope")})
    body = json.dumps({"entrypoint": "touch /tmp/should-not-run"}).encode()
    status, err = http_error(dash.url + "/api/jobs/", "POST", body)
    assert status == 401 and "token" in err["error"]
    status, err = http_error(dash.url + "/api/jobs/", "POST", body,
                             {"Authorization": "Bearer wrong"})
    assert status == 401
    with pytest.raises(ValueError, match="create_cluster_if_needed"):
        JobSubmissionClient(dash.url, create_cluster_if_needed=True)
    with pytest.raises(ConnectionError):
        JobSubmissionClient("http://127.0.0.1:9")


@pytest.mark.timeout(150)
def test_job_cli(dash, tmp_path):
    wd = tmp_path / "cliproj"
    wd.mkdir()
    (wd / "script.py").write_text(SCRIPT)
    env = dict(dash.procs.env, ZRAY_DASHBOARD_TOKEN=dash.token())

    def zray_job(*args, timeout=90):
        return subprocess.run(_zray_cmd() + ["job", *args], env=env, capture_output=True,
                              text=True, timeout=timeout)

    out = zray_job("submit", "--address", dash.url, "--working-dir", str(wd),
                   "--runtime-env-json", json.dumps({"env_vars": {"JOB_COLOUR": "red"}}),
                   "--submission-id", "cli-1", "--", "python", "script.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(9, 'red')" in out.stdout and "task sees the working_dir: True" in out.stdout
    assert "Job 'cli-1' SUCCEEDED" in out.stderr
    out = zray_job("status", "--address", dash.url, "cli-1")
    assert "SUCCEEDED" in out.stdout, out.stderr
    out = zray_job("logs", "--address", dash.url, "cli-1")
    assert "squares" in out.stdout
    out = zray_job("submit", "--address", dash.url, "--no-wait", "--submission-id", "cli-2",
                   "--", "python", "-c", "print('from cli-2')")
    assert out.returncode == 0 and "submitted" in out.stderr, out.stderr
    out = zray_job("logs", "--address", dash.url, "--follow", "cli-2")
    assert "from cli-2" in out.stdout, out.stdout + out.stderr
    # on the head, without $ZRAY_DASHBOARD_TOKEN, the CLI reads the owner-only token file
    env.pop("ZRAY_DASHBOARD_TOKEN")
    listed = [json.loads(line) for line in zray_job("list", "--address", dash.url).stdout.splitlines()]
    assert {"cli-1", "cli-2"} <= {j["submission_id"] for j in listed}
    out = zray_job("submit", "--address", dash.url, "--", "python", "-c", "raise SystemExit(2)")
    assert out.returncode == 1 and "FAILED" in out.stderr
    out = zray_job("status", "--address", dash.url, "no-such-job")
    assert out.returncode != 0 and "does not exist" in out.stderr


@pytest.mark.timeout(120)
def test_dashboard_stops_with_the_broker_and_takes_its_jobs(tmp_path):
    c = DashCluster(tmp_path, workers=0)
    try:
        c.start()
        _, job = start_long_job(c.job_client(), tmp_path / "started")
        dashboard = c.procs.procs["dashboard"]
        c.procs.procs["broker"].terminate()
        poll_until(lambda: dashboard.poll() is not None, 60, what="the dashboard to exit")
        assert wait_gone([job], 30) == [], "the job was not killed"
        assert "the broker at" in (tmp_path / "dashboard.log").read_text()
    finally:
        c.stop()


HELPER_SCRIPT = textwrap.dedent("""
    import os
    import zray

    zray.init()

    @zray.remote
    def use_helper(text):
        import helper  # only in the uploaded working_dir

        import mylib  # uploaded from py_modules
        import single

        return helper.shout(text), os.path.exists("big.bin"), mylib.NAME, single.NAME

    print("helper says", zray.get(use_helper.remote("hello from a task")))
    print("job cwd", os.getcwd())
""")


@pytest.mark.timeout(180)
def test_working_dir_is_uploaded_from_the_client(dash, client, tmp_path, caplog):
    """The client's folder does not exist on the head: `zray job submit --working-dir`
    packs and uploads it; a second submit of the same files uploads nothing."""
    src = tmp_path / "laptop" / "proj"
    src.mkdir(parents=True)
    (src / "helper.py").write_text("def shout(s):\n    return s.upper() + '!'\n")
    (src / "main.py").write_text(HELPER_SCRIPT)
    (src / ".gitignore").write_text("big.bin\n")
    (src / "big.bin").write_bytes(b"x" * 4096)
    libs = tmp_path / "laptop" / "libs"
    (libs / "mylib").mkdir(parents=True)
    (libs / "mylib" / "__init__.py").write_text("NAME = 'mylib'\n")
    (libs / "single.py").write_text("NAME = 'single'\n")
    renv = json.dumps({"py_modules": [str(libs / "mylib"), str(libs / "single.py")]})
    env = dict(dash.procs.env, ZRAY_DASHBOARD_TOKEN=dash.token())
    # run the CLI from a folder without the files, as a client elsewhere would
    out = subprocess.run(_zray_cmd() + ["job", "submit", "--address", dash.url, "--working-dir",
                                        str(src), "--runtime-env-json", renv,
                                        "--submission-id", "upload-1", "--",
                                        "python", "main.py"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "helper says ('HELLO FROM A TASK!', False, 'mylib', 'single')" in out.stdout, out.stdout
    logs = client.get_job_logs("upload-1")
    assert "helper says ('HELLO FROM A TASK!', False, 'mylib', 'single')" in logs
    cwd = next(ln.split(" ", 2)[2] for ln in logs.splitlines() if ln.startswith("job cwd "))
    assert not cwd.startswith(str(src)) and os.path.isfile(os.path.join(cwd, "helper.py"))
    assert not os.path.exists(os.path.join(cwd, "big.bin"))  # .gitignore'd: not uploaded
    assert os.stat(cwd).st_mode & 0o077 == 0  # the head's copy is owner-only
    uri = client.get_job_info("upload-1").runtime_env["working_dir"]
    assert uri.startswith("gcs://_ray_pkg_") and uri.endswith(".zip")

    # the same files from another path: the dashboard has them, nothing is uploaded
    moved = tmp_path / "moved"
    src.rename(moved)
    caplog.set_level(logging.INFO, logger="zray.job_submission")
    sid = client.submit_job(entrypoint="python main.py",
                            runtime_env={"working_dir": str(moved),
                                         "py_modules": json.loads(renv)["py_modules"]})
    assert wait_job_end(client, sid) == JobStatus.SUCCEEDED, client.get_job_logs(sid)
    assert client.get_job_info(sid).runtime_env["working_dir"] == uri
    assert "on the cluster already" in caplog.text and "uploaded " not in caplog.text
    assert "HELLO FROM A TASK!" in client.get_job_logs(sid)
    mods = client.get_job_info(sid).runtime_env["py_modules"]
    assert len(mods) == 2 and all(m.startswith("gcs://_ray_pkg_") for m in mods)
    with pytest.raises(ValueError, match="py_modules"):
        client.submit_job(entrypoint="true", runtime_env={"py_modules": [str(tmp_path / "no")]})


@pytest.mark.timeout(60)
def test_package_uploads_are_checked(dash, tmp_path):
    """A package must be what its name says, and unpacks only plain files inside its folder."""
    import hashlib
    import io
    import zipfile

    token = dash.token()

    def put(name, data):
        return http_error(f"{dash.url}/api/packages/gcs/{name}", "PUT", data, token=token)

    def zip_of(entries):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data, mode in entries:
                info = zipfile.ZipInfo(name)
                info.external_attr = mode << 16
                zf.writestr(info, data)
        return buf.getvalue()

    def named(data):
        return f"_ray_pkg_{hashlib.sha256(data).hexdigest()}.zip"

    ok = zip_of([("a.py", b"x = 1\n", 0o100644)])
    status, body = put("_ray_pkg_not-a-hash.zip", ok)
    assert status == 400 and "bad package name" in body["error"]
    status, body = put("_ray_pkg_" + "1" * 64 + ".zip", ok)
    assert status == 400 and "content hash" in body["error"]
    for entries, why in [([("../evil.py", b"x", 0o100644)], "plain relative path"),
                         ([("/abs.py", b"x", 0o100644)], "plain relative path"),
                         ([("link", b"/etc/passwd", 0o120777)], "symbolic links"),
                         ([("a/b.py", b"x", 0o100644), ("a/b.py/c", b"x", 0o100644)],
                          "both a file and a folder")]:
        data = zip_of(entries)
        status, body = put(named(data), data)
        assert status == 400 and why in body["error"], (entries, body)
        status, body = http_error(f"{dash.url}/api/packages/gcs/{named(data)}", token=token)
        assert status == 404  # nothing of a refused package stays
    status, body = http_error(f"{dash.url}/api/packages/gcs/{named(ok)}", "PUT", ok)
    assert status == 401  # uploads need the token
    status, body = http_error(f"{dash.url}/api/packages/gcs/{named(ok)}", "PUT", b"",
                              {"Content-Length": str(1 << 40)}, token=token)
    assert status == 413 and "limit" in body["error"]  # refused before reading
    status, body = put(named(ok), ok)
    assert status == 200 and body == {"stored": True}
    status, body = http_error(f"{dash.url}/api/packages/gcs/{named(ok)}", token=token)
    assert status == 200 and body == {"exists": True}


@pytest.mark.timeout(150)
def test_job_records_survive_a_dashboard_restart(tmp_path):
    """The records (and logs) outlive the dashboard; a job running when it died is FAILED."""
    c = DashCluster(tmp_path, workers=0)
    try:
        c.start()
        client = c.job_client()
        done = client.submit_job(entrypoint="python -c 'print(\"finished before\")'",
                                 submission_id="before-restart", metadata={"k": "v"})
        assert wait_job_end(client, done) == JobStatus.SUCCEEDED
        running, job = start_long_job(client, tmp_path / "started")
        group = [job] + job.children(recursive=True)  # the shell's children too
        assert any("time.sleep(600)" in " ".join(p.cmdline()) for p in group), group
        c.restart_dashboard()
        left = wait_gone(group, 30)
        assert left == [], f"the running job and its children outlived the dashboard: {left}"
        client = c.job_client()
        jobs = {j.submission_id: j for j in client.list_jobs()}
        assert set(jobs) == {done, running}
        info = client.get_job_info(done)
        assert info.status == JobStatus.SUCCEEDED and info.metadata == {"k": "v"}
        assert info.driver_exit_code == 0 and info.start_time <= info.end_time
        assert "finished before" in client.get_job_logs(done)
        info = client.get_job_info(running)
        assert info.status == JobStatus.FAILED
        assert "dashboard stopped while the job was RUNNING" in info.message
        assert info.end_time >= info.start_time
        # the file is owner-only, and new jobs are recorded as before
        records = [p for p in tmp_path.rglob("jobs.json")]
        assert len(records) == 1 and records[0].stat().st_mode & 0o077 == 0
        sid = client.submit_job(entrypoint="true")
        assert wait_job_end(client, sid) == JobStatus.SUCCEEDED
        assert json.loads(records[0].read_text())["jobs"][-1]["submission_id"] == sid
        with pytest.raises(RuntimeError, match="already exists"):
            client.submit_job(entrypoint="true", submission_id=done)
    finally:
        c.stop()


@pytest.mark.timeout(150)
def test_package_cache_evicts_least_recently_used_but_not_in_use(tmp_path):
    """Past ZRAY_DASHBOARD_PACKAGES_MB, storing a package evicts the least recently used
    ones, never one a running job was submitted with."""
    c = DashCluster(tmp_path, workers=0)
    c.procs.env["ZRAY_DASHBOARD_PACKAGES_MB"] = "0.1"  # ~100 KB: two 40 KB packages
    try:
        c.start()
        client = c.job_client()

        def folder(name):
            d = tmp_path / name
            d.mkdir()
            (d / "data.bin").write_bytes(name.encode() * (40_000 // len(name)))
            return d

        long, _ = start_long_job(client, tmp_path / "started",
                                 runtime_env={"working_dir": str(folder("busy"))})
        busy_uri = client.get_job_info(long).runtime_env["working_dir"]
        uris = []
        for name in ("one", "two", "three"):
            sid = client.submit_job(entrypoint="true",
                                    runtime_env={"working_dir": str(folder(name))})
            assert wait_job_end(client, sid) == JobStatus.SUCCEEDED, client.get_job_logs(sid)
            uris.append(client.get_job_info(sid).runtime_env["working_dir"])

        def present(uri):
            return http_error(f"{c.url}/api/packages/gcs/{uri.split('://')[1]}",
                              token=c.token())[0] == 200

        # "busy" is in use; "one" and "two" made way for the newer packages
        assert [present(u) for u in [busy_uri] + uris] == [True, False, False, True]
        assert client.stop_job(long)
        assert wait_job_end(client, long) == JobStatus.STOPPED
        # an evicted package is uploaded again when a job needs it
        sid = client.submit_job(entrypoint="cat data.bin",
                                runtime_env={"working_dir": str(tmp_path / "one")})
        assert wait_job_end(client, sid) == JobStatus.SUCCEEDED
        assert client.get_job_logs(sid).startswith("oneone")
        assert present(uris[0])
    finally:
        c.stop()
