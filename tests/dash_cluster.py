"""A CLI-started cluster with a dashboard, for the dashboard, metrics and jobs tests:

    zray broker --port P            zray worker --address tcp://127.0.0.1:P  (x n)
    zray dashboard --address tcp://127.0.0.1:P --port 0

``DashCluster.url`` is the dashboard's URL, read from the line it prints. For the job
tests: ``job_client()`` (a JobSubmissionClient with the dashboard's token),
``wait_job_end(client, sid)`` and ``start_long_job(client, flag)``.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request

import psutil
from conftest import poll_until
from test_cli_cluster import _free_port, _Procs

import zray


class DashCluster:
    def __init__(self, tmp_path, workers: int = 2, cpus: int = 2):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs = _Procs(tmp_path)
        self.tmp_path = tmp_path
        self.url = ""
        self.workers = workers
        self.cpus = cpus

    def start(self):
        p = self.procs
        p.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(self.port)])
        for i in range(self.workers):
            p.start(f"worker{i}", ["worker", "--address", self.address,
                                   "--num-cpus", str(self.cpus)])
        p.start("dashboard", ["dashboard", "--address", self.address, "--port", "0"])

        def url():
            p.check_running()
            text = (self.tmp_path / "dashboard.log").read_text(errors="replace")
            m = re.search(r"zray dashboard at (http://\S+)", text)
            return m.group(1) if m else None

        self.url = poll_until(url, 60, interval=0.1, what="the dashboard's URL")

        def nodes():
            try:
                return len([n for n in self.get("/api/nodes") if n["alive"]]) == self.workers
            except (OSError, ValueError):
                return False

        poll_until(nodes, 60, interval=0.2, what=f"{self.workers} nodes on /api/nodes")
        return self

    def restart_dashboard(self):
        """SIGKILL the dashboard (its jobs die with it) and start a new one beside the
        same broker; waits for its new URL."""
        import signal

        old = self.procs.procs["dashboard"]
        os.kill(old.pid, signal.SIGKILL)
        old.wait(30)
        self.procs.start("dashboard", ["dashboard", "--address", self.address, "--port", "0"])

        def url():
            self.procs.check_running()
            text = (self.tmp_path / "dashboard.log").read_text(errors="replace")
            m = re.search(r"zray dashboard at (http://\S+)", text)
            return m.group(1) if m else None

        self.url = poll_until(url, 60, interval=0.1, what="the restarted dashboard's URL")
        return self

    def connect(self):
        if zray.is_initialized():
            zray.shutdown()
        zray.init(address=self.address)

    def _open(self, path: str) -> bytes:
        req = urllib.request.Request(self.url + path,
                                     headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def get(self, path: str):
        return json.loads(self._open(path))

    def text(self, path: str) -> str:
        return self._open(path).decode()

    def token(self) -> str:
        port = int(self.url.rsplit(":", 1)[1])
        path = os.path.join(self.procs.env["ZRAY_TMPDIR"], f"dashboard-{port}.token")
        with open(path) as f:
            return f.read().strip()

    def job_client(self):
        """A JobSubmissionClient for this dashboard, authorized with its token."""
        from zray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token()}"})

    def stop(self):
        if zray.is_initialized():
            zray.shutdown()
        self.procs.kill_all()


def http_error(url: str, method: str = "GET", body: bytes | None = None, headers=None,
               token: str | None = None):
    """(status, JSON body) of a request expected to fail (with ``token``: authorized)."""
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_job_end(client, sid: str, timeout: float = 90):
    """The JobStatus job ``sid`` ended with (SUCCEEDED, FAILED or STOPPED), once it did."""
    return poll_until(lambda: (s := client.get_job_status(sid)).is_terminal() and s, timeout,
                      interval=0.2, what=f"job {sid} to end")


def start_long_job(client, flag, **submit) -> tuple:
    """Submit a job that creates the file ``flag`` and then sleeps for ten minutes
    (``submit``: more submit_job arguments); once it runs: (its submission id, its
    driver's psutil.Process)."""
    sid = client.submit_job(entrypoint=f"python -c 'import time; open(\"{flag}\", \"w\")"
                                       ".close(); time.sleep(600)'", **submit)
    poll_until(flag.exists, 60, what="the long job to start")
    return sid, psutil.Process(int(client.get_job_info(sid).driver_info["pid"]))
