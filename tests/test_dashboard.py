"""The dashboard as a user sees it: a two-node cluster started with the CLI, a
``zray dashboard`` beside it, its JSON API, and the page in a real headless
Chromium (Debian's, driven by playwright; no browser download).

    zray broker / zray worker x2 / zray dashboard --port 0
    driver: a task that runs until the test lets it go, a task that raises
    GET /api/nodes, /api/tasks, /api/actors ...      what the page shows
    chromium: the page lists 2 nodes, the running task, the failed task's error,
              and logs no console error (screenshot in the test's tmp dir)
"""

import os
import shutil
import subprocess
import textwrap

import psutil
import pytest
from conftest import poll_until
from dash_cluster import DashCluster, http_error

import zray


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    c = DashCluster(tmp_path_factory.mktemp("dash"))
    try:
        c.start()
        c.connect()
        yield c
    finally:
        c.stop()


@zray.remote
def wait_for_file(path):
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.05)
    return "released"


@zray.remote
def explode():
    raise ValueError("the reactor is on fire")


@zray.remote
def shout(text):
    print(text, flush=True)
    return zray.get_runtime_context().get_node_id()


@zray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n


@pytest.mark.timeout(120)
def test_api_nodes_lists_both_nodes_with_their_resources(dash):
    nodes = dash.get("/api/nodes")
    assert len(nodes) == 2, nodes
    for n in nodes:
        assert n["alive"] and n["cpu"]["total"] == 2, n
        assert n["store"]["limit"] > 0 and n["memory"]["total"] > 0, n
    assert {n["node_id"] for n in nodes} == {n["NodeID"] for n in zray.nodes()}
    cluster = dash.get("/api/cluster")
    assert cluster["address"] == dash.address and cluster["clients"] >= 1


@pytest.mark.timeout(120)
def test_tasks_by_state_with_errors_and_actors(dash, tmp_path):
    flag = str(tmp_path / "go")
    running = wait_for_file.remote(flag)
    failed = explode.remote()
    with pytest.raises(ValueError):
        zray.get(failed, timeout=60)
    counter = Counter.options(name="dash-counter").remote()
    assert zray.get(counter.inc.remote(), timeout=60) == 1

    def states():
        t = dash.get("/api/tasks")
        by_name = {}
        for row in t["tasks"]:
            by_name.setdefault(row["name"], row)
        ok = (by_name.get("wait_for_file", {}).get("state") == "running"
              and by_name.get("explode", {}).get("state") == "failed")
        return by_name if ok else None

    by_name = poll_until(states, 60, interval=0.2, what="a running and a failed task")
    assert "the reactor is on fire" in by_name["explode"]["error"]
    assert by_name["explode"]["duration_s"] is not None
    assert by_name["wait_for_file"]["node_id"] in {n["node_id"] for n in dash.get("/api/nodes")}
    only_failed = dash.get("/api/tasks?state=failed")["tasks"]
    assert only_failed and all(r["state"] == "failed" for r in only_failed)
    actors = [a for a in dash.get("/api/actors") if a["name"] == "dash-counter"]
    assert len(actors) == 1 and actors[0]["state"] == "alive", actors
    assert actors[0]["class_name"].endswith("Counter") and actors[0]["restarts"] == 0
    # the state API's rows (Ray's names) under /api/v0/, with filters
    failed_rows = dash.get("/api/v0/tasks?filter=state=FAILED&filter=name=explode&detail=1")
    assert failed_rows["rows"] and all(r["state"] == "FAILED" for r in failed_rows["rows"])
    assert "the reactor is on fire" in failed_rows["rows"][0]["error_message"]
    actor_rows = dash.get("/api/v0/actors?filter=name=dash-counter")["rows"]
    assert [r["state"] for r in actor_rows] == ["ALIVE"]
    assert dash.get("/api/v0/tasks/summarize")["cluster"]["total_tasks"] >= 2
    status, body = http_error(dash.url + "/api/v0/tasks?filter=colour=blue", token=dash.token())
    assert status == 400 and "colour" in body["error"]
    open(flag, "w").close()
    assert zray.get(running, timeout=60) == "released"
    zray.kill(counter)


@pytest.mark.timeout(60)
def test_objects_drivers_logs_and_bad_requests(dash):
    ref = zray.put(b"x" * 300_000)
    poll_until(lambda: ref.hex() in {o["object_id"] for o in
                                     dash.get("/api/objects?top=500")["largest"]},
               30, interval=0.2, what="the put object on /api/objects")
    assert any(d["driver_pid"] == os.getpid() for d in dash.get("/api/drivers"))
    logs = dash.get("/api/logs")
    assert "broker.log" in {f["name"] for f in logs if f["source"] == "head"}
    assert "broker" in dash.get("/api/logs?source=head&name=broker.log")["text"]
    # each node's agent and executor logs (the nodes run on this host)
    marker = f"printed-by-a-task-{os.getpid()}"
    node_id = zray.get(shout.remote(marker), timeout=60)
    node_logs = [f for f in logs if f["source"] == f"node:{node_id}"]
    assert any(f["name"] == "node.log" for f in node_logs), logs

    def printed():
        for f in dash.get("/api/logs"):
            if f["source"] == f"node:{node_id}" and f["name"].startswith("executor-"):
                q = f"/api/logs?source=node:{node_id}&name={f['name']}"
                if marker in dash.get(q)["text"]:
                    return f["name"]
        return None

    poll_until(printed, 30, interval=0.2, what="the task's line in its executor's log")
    status, body = http_error(dash.url + "/api/logs?source=nowhere&name=x.log", token=dash.token())
    assert status == 404 and "nowhere" in body["error"]
    status, body = http_error(dash.url + "/api/logs?name=../../etc/passwd", token=dash.token())
    assert status == 400 and "bad log file name" in body["error"]
    status, body = http_error(dash.url + "/api/nope", token=dash.token())
    assert status == 404 and "no route" in body["error"]
    status, body = http_error(dash.url + "/api/tasks?limit=many", token=dash.token())
    assert status == 400 and "limit" in body["error"]
    assert dash.get("/api/placement_groups") == []


@pytest.mark.timeout(60)
def test_everything_but_the_page_needs_the_token(dash):
    import urllib.request

    with urllib.request.urlopen(dash.url + "/", timeout=30) as r:
        assert r.status == 200 and b"zray" in r.read()
    for path in ("/api/nodes", "/api/logs?source=head&name=broker.log", "/metrics",
                 "/api/v0/tasks", "/api/jobs/"):
        status, body = http_error(dash.url + path)
        assert status == 401 and "token" in body["error"], (path, body)
        status, body = http_error(dash.url + path, headers={"Authorization": "Bearer nope"})
        assert status == 401, path
    status, body = http_error(dash.url + "/?token=nope")
    assert status == 401 and "wrong dashboard token" in body["error"]
    status, body = http_error(dash.url + "/api/nodes",
                              headers={"Cookie": f"zray_dashboard_token={dash.token()}"})
    assert status == 200 and len(body) == 2


@pytest.mark.timeout(60)
def test_dashboard_listens_on_loopback_only(dash):
    proc = psutil.Process(dash.procs.procs["dashboard"].pid)
    listening = [c.laddr for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
    assert dash.url.startswith("http://127.0.0.1:")


def _chromium():
    path = shutil.which("chromium") or "/usr/bin/chromium"
    return path if os.path.exists(path) else None


@pytest.mark.timeout(180)
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_in_headless_chromium(dash, tmp_path):
    from playwright.sync_api import sync_playwright

    flag = str(tmp_path / "go")
    running = wait_for_file.remote(flag)
    with pytest.raises(ValueError):
        zray.get(explode.remote(), timeout=60)
    errors = []
    shot = tmp_path / "dashboard.png"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=_chromium(), headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.on("console", lambda m: m.type == "error" and errors.append(m.text))
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"{dash.url}/?token={dash.token()}", wait_until="load")
                assert page.url == dash.url + "/"  # the token became a cookie
                page.wait_for_function("document.querySelectorAll('tr.node-row').length == 2",
                                       timeout=60_000)
                page.screenshot(path=str(tmp_path / "cluster.png"), full_page=True)
                page.click("a[data-page='tasks']")
                page.wait_for_selector("tr.task-running", timeout=60_000)
                page.wait_for_selector("tr.task-failed", timeout=60_000)
                assert "the reactor is on fire" in page.inner_text("tr.task-failed")
                assert "wait_for_file" in page.inner_text("tr.task-running")
                page.screenshot(path=str(shot), full_page=True)
                for name in ("actors", "placement groups", "objects", "jobs", "logs"):
                    page.click(f"a[data-page='{name}']")
                    page.wait_for_function(
                        "document.getElementById('status').textContent.startsWith('updated')"
                        " && document.querySelector('nav a.active').dataset.page == "
                        f"{name!r}", timeout=30_000)
                page.click("a[data-page='logs']")
                page.click("a[data-log='broker.log']")
                page.wait_for_selector("pre.log", timeout=30_000)
                page.screenshot(path=str(tmp_path / "logs.png"), full_page=False)
            finally:
                browser.close()
    finally:
        open(flag, "w").close()
    assert shot.exists() and shot.stat().st_size > 10_000
    assert not errors, errors
    assert zray.get(running, timeout=60) == "released"


@pytest.mark.timeout(120)
def test_init_include_dashboard_serves_the_local_cluster(run_driver, tmp_path):
    from test_cli_cluster import _free_port

    port = _free_port()
    out = run_driver(textwrap.dedent(f"""
        import json, time, urllib.request
        import zray
        ctx = zray.init(num_cpus=1, include_dashboard=True, dashboard_port={port})
        assert ctx.dashboard_url == "127.0.0.1:{port}", ctx.dashboard_url
        from zray.dashboard.server import read_token
        deadline = time.monotonic() + 60
        while True:
            try:
                token = read_token({port})  # written owner-only once it listens
                if token is None:
                    raise OSError("no token file yet")
                req = urllib.request.Request("http://127.0.0.1:{port}/api/nodes",
                                             headers={{"Authorization": "Bearer " + token}})
                with urllib.request.urlopen(req, timeout=5) as r:
                    nodes = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert len(nodes) == 1 and nodes[0]["cpu"]["total"] == 1, nodes
        zray.shutdown()
        print("OK")
    """), timeout=100)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "OK" in out.stdout
    # the dashboard stopped with the cluster

    def dashboard_gone():
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "zray.dashboard" in cmd and str(port) in cmd:
                return False
        return True

    poll_until(dashboard_gone, 15, what="the embedded dashboard to stop")


@pytest.mark.timeout(60)
def test_dashboard_options_are_checked():
    if zray.is_initialized():
        zray.shutdown()
    for kw, match in [({"include_dashboard": True, "dashboard_port": 70000}, "dashboard_port"),
                      ({"include_dashboard": "yes"}, "include_dashboard"),
                      ({"dashboard_port": 8265}, "include_dashboard=True"),
                      ({"include_dashboard": False, "dashboard_host": "0.0.0.0"},
                       "dashboard_host")]:
        with pytest.raises(ValueError, match=match):
            zray.init(num_cpus=1, **kw)
        assert not zray.is_initialized()
    with pytest.raises(ValueError, match="running cluster"):
        zray.init(address="tcp://127.0.0.1:9", include_dashboard=True)
    env = dict(os.environ, ZRAY_DASHBOARD_PORT="eighty")
    from test_cli_cluster import _zray_cmd

    out = subprocess.run(_zray_cmd() + ["dashboard", "--address", "tcp://127.0.0.1:9"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "ZRAY_DASHBOARD_PORT" in out.stderr, out.stderr
