"""Jobs, as Ray's ``ray.job_submission``: ``JobSubmissionClient`` and ``JobStatus``.

The client speaks the dashboard's HTTP job API (zray/dashboard/jobs.py); the
job's driver runs on the head, spawned by the dashboard, with its output in a
log file and ``ZRAY_ADDRESS``/``RAY_ADDRESS`` set so ``zray.init()`` inside joins
the cluster.

Submitting or stopping a job runs code on the head, so it needs the dashboard's
token: read from ``$ZRAY_DASHBOARD_TOKEN``, else from the dashboard's owner-only
token file on this host (``<zray tmp dir>/dashboard-<port>.token``), unless
``headers`` carry an ``Authorization`` of their own. Reading is open.

``runtime_env``: a local ``working_dir`` is packed (its ``excludes`` and
``.gitignore`` files apply; size-limited) and uploaded to the dashboard unless it
has that content already (``GET`` then ``PUT /api/packages/gcs/_ray_pkg_<sha>.zip``,
as Ray does); the job runs in its unpacked copy on the head and its tasks get it
as their working_dir. Local ``py_modules`` (folders, .py files, modules) are
uploaded the same way. ``env_vars`` are set for the driver; the rest is applied by
the driver's ``zray.init()`` to the job's tasks and actors.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional
from urllib.parse import urlsplit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
log = logging.getLogger("zray.job_submission")


class JobStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value

    def is_terminal(self) -> bool:
        """True once the job will not change any more."""
        return self.value in ("STOPPED", "SUCCEEDED", "FAILED")


@dataclass
class JobDetails:
    """What the dashboard knows of one submitted job (Ray's JobDetails fields)."""

    type: str
    status: JobStatus
    entrypoint: str
    submission_id: Optional[str] = None
    job_id: Optional[str] = None
    message: Optional[str] = None
    error_type: Optional[str] = None
    start_time: Optional[int] = None
    end_time: Optional[int] = None
    metadata: dict = field(default_factory=dict)
    runtime_env: dict = field(default_factory=dict)
    driver_info: Optional[dict] = None
    driver_exit_code: Optional[int] = None


JobInfo = JobDetails


def _details(d: dict) -> JobDetails:
    known = {k: d.get(k) for k in JobDetails.__dataclass_fields__ if k in d}
    known["status"] = JobStatus(d["status"])
    return JobDetails(**known)


class JobSubmissionClient:
    """Submit and manage jobs through a cluster's dashboard."""

    def __init__(self, address: Optional[str] = None, create_cluster_if_needed: bool = False,
                 cookies: Optional[dict] = None, metadata: Optional[dict] = None,
                 headers: Optional[dict] = None, verify: Any = True):
        if create_cluster_if_needed:
            raise ValueError("create_cluster_if_needed=True is not supported by zray: start "
                             "the cluster and `zray dashboard` first")
        if cookies:
            raise ValueError("cookies are not supported by zray's dashboard; leave them out")
        if verify is not True:
            raise ValueError("verify: zray's dashboard serves plain HTTP (no TLS to verify); "
                             "leave it out")
        address = address or os.environ.get("ZRAY_DASHBOARD_ADDRESS") or _ray_address()
        if "://" not in address:
            address = "http://" + address
        parts = urlsplit(address)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"address must be the dashboard's http://host:port, got {address!r}")
        self.address = address.rstrip("/")
        self.metadata = dict(metadata or {})
        self.headers = dict(headers or {})
        if not any(k.lower() == "authorization" for k in self.headers):
            token = os.environ.get("ZRAY_DASHBOARD_TOKEN") or _local_token(parts.port or 80)
            if token:
                self.headers["Authorization"] = f"Bearer {token}"
        self._call("GET", "/api/version")  # fail now if nothing listens there

    # ------------------------------------------------------------ HTTP
    def _call(self, method: str, path: str, body: Optional[dict] = None, *,
              raw: Optional[bytes] = None, missing_ok: bool = False):
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = ("application/zip" if raw is not None
                                       else "application/json")
        req = urllib.request.Request(self.address + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60 if raw is None else 600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if missing_ok and e.code == 404:
                return None
            try:
                msg = json.loads(e.read()).get("error", "")
            except ValueError:
                msg = e.reason
            raise RuntimeError(f"Request failed with status code {e.code}: {msg}") from None
        except urllib.error.URLError as e:
            raise ConnectionError(f"Failed to connect to the dashboard at {self.address}: "
                                  f"{e.reason}") from None

    # ------------------------------------------------------------ Ray's API
    def submit_job(self, *, entrypoint: str, job_id: Optional[str] = None,
                   runtime_env: Optional[dict] = None, metadata: Optional[dict] = None,
                   submission_id: Optional[str] = None,
                   entrypoint_num_cpus: Optional[float] = None,
                   entrypoint_num_gpus: Optional[float] = None,
                   entrypoint_memory: Optional[int] = None,
                   entrypoint_resources: Optional[dict] = None) -> str:
        """Start ``entrypoint`` (a shell command) on the head; returns its submission id."""
        runtime_env = dict(runtime_env or {})
        wd = runtime_env.get("working_dir")
        if wd is not None and not (isinstance(wd, str) and "://" in wd):
            # a local folder: packed and uploaded to the dashboard, as Ray does
            runtime_env["working_dir"] = self._upload_working_dir(
                wd, runtime_env.get("excludes") or ())
        mods = runtime_env.get("py_modules")
        if isinstance(mods, (list, tuple)):
            # local modules too: each folder or .py file is uploaded (remote URIs pass)
            runtime_env["py_modules"] = [
                m if isinstance(m, str) and "://" in m
                else self._upload_module(m, runtime_env.get("excludes") or ()) for m in mods]
        body = {"entrypoint": entrypoint, "runtime_env": runtime_env,
                "metadata": {**self.metadata, **(metadata or {})},
                "submission_id": submission_id or job_id}
        for name, v in (("entrypoint_num_cpus", entrypoint_num_cpus),
                        ("entrypoint_num_gpus", entrypoint_num_gpus),
                        ("entrypoint_memory", entrypoint_memory),
                        ("entrypoint_resources", entrypoint_resources)):
            if v is not None:
                body[name] = v
        return self._call("POST", "/api/jobs/", body)["submission_id"]

    def _upload_working_dir(self, path, excludes) -> str:
        """Pack a local working_dir (zray/_renv.py: excludes, .gitignore, size limit) and
        upload it unless the dashboard has it already (by content); its package URI."""
        from zray._renv import pack

        if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
            raise ValueError(f"runtime_env working_dir {path!r}: not a local directory "
                             "(give a folder; it is uploaded to the cluster)")
        return self._upload(pack(path, "working_dir", excludes), f"working_dir {path}")

    def _upload_module(self, module, excludes) -> str:
        """A local py_modules entry (a package folder, a .py file or a module object),
        packed with its name at the root and uploaded as working_dirs are."""
        from zray._renv import _module_path, pack

        path = _module_path(module)
        if not isinstance(path, (str, os.PathLike)) or not (
                os.path.isdir(path) or (os.path.isfile(path) and str(path).endswith(".py"))):
            raise ValueError(f"runtime_env py_modules entry {path!r}: a job takes a local "
                             "package folder, .py file or module (uploaded to the cluster); "
                             ".whl and .zip files are not supported for jobs")
        return self._upload(pack(path, "py_modules", excludes), f"py_modules {path}")

    def _upload(self, pkg, what: str) -> str:
        from zray.dashboard.packages import PROTOCOL, package_uri

        uri = package_uri(pkg.sha)
        route = f"/api/packages/{PROTOCOL}/{uri.split('://', 1)[1]}"
        if self._call("GET", route, missing_ok=True) is not None:
            log.info("%s is on the cluster already as %s", what, uri)
        else:
            self._call("PUT", route, raw=pkg.data)
            log.info("uploaded %s as %s (%d bytes)", what, uri, len(pkg.data))
        return uri

    def stop_job(self, job_id: str) -> bool:
        """Stop a running job (SIGTERM, then SIGKILL); False if it was not running."""
        return self._call("POST", f"/api/jobs/{_id(job_id)}/stop", {})["stopped"]

    def delete_job(self, job_id: str) -> bool:
        """Forget a finished job and its logs."""
        return self._call("DELETE", f"/api/jobs/{_id(job_id)}")["deleted"]

    def get_job_info(self, job_id: str) -> JobDetails:
        return _details(self._call("GET", f"/api/jobs/{_id(job_id)}"))

    def list_jobs(self) -> list:
        return [_details(d) for d in self._call("GET", "/api/jobs/")]

    def get_job_status(self, job_id: str) -> JobStatus:
        return self.get_job_info(job_id).status

    def get_job_logs(self, job_id: str) -> str:
        """Everything the job's driver printed so far (stdout and stderr)."""
        return self._call("GET", f"/api/jobs/{_id(job_id)}/logs")["logs"]

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        """Yield the job's output as it comes, until the job ends."""
        offset = 0
        while True:
            r = await asyncio.to_thread(self._call, "GET",
                                        f"/api/jobs/{_id(job_id)}/logs?offset={offset}")
            if r["logs"]:
                yield r["logs"]
            offset = r["offset"]
            if JobStatus(r["status"]).is_terminal() and not r["logs"]:
                return
            if not r["logs"]:
                await asyncio.sleep(0.2)

    def follow_logs(self, job_id: str):
        """``tail_job_logs`` without asyncio: yields output until the job ends."""
        offset = 0
        while True:
            r = self._call("GET", f"/api/jobs/{_id(job_id)}/logs?offset={offset}")
            if r["logs"]:
                yield r["logs"]
            offset = r["offset"]
            if JobStatus(r["status"]).is_terminal() and not r["logs"]:
                return
            if not r["logs"]:
                time.sleep(0.2)


def _id(job_id) -> str:
    if not isinstance(job_id, str) or not job_id or "/" in job_id or "?" in job_id:
        raise ValueError(f"bad job id {job_id!r}")
    return job_id


def _ray_address() -> str:
    a = os.environ.get("RAY_ADDRESS", "")
    return a if a.startswith("http://") else DEFAULT_ADDRESS


def _local_token(port: int) -> Optional[str]:
    from zray.dashboard.server import read_token

    try:
        return read_token(port)
    except OSError:
        return None


__all__ = ["JobDetails", "JobInfo", "JobStatus", "JobSubmissionClient"]
