"""Jobs: driver scripts the dashboard runs on the head for ``zray job submit`` and
``JobSubmissionClient``.

::

    POST /api/jobs/ {entrypoint, runtime_env, submission_id, metadata, entrypoint_*}
      --> JobManager.submit: checks every field, then starts
            /bin/sh -c ENTRYPOINT   (cwd: runtime_env working_dir: a package the client
                                     uploaded (gcs://_ray_pkg_<sha>.zip, packages.py),
                                     unpacked on this host, or a dir on this host;
                                     env: ZRAY_ADDRESS/RAY_ADDRESS = the cluster,
                                     ZRAY_JOB_RUNTIME_ENV = the rest of runtime_env, and working_dir
                                     itself where runtime_env supports it)
          stdout+stderr --> <jobs dir>/job-<submission_id>.log (owner-only)
      --> a waiter thread per job: PENDING -> RUNNING -> SUCCEEDED | FAILED | STOPPED

A job's process is started from ``_cluster._Spawner``'s long-lived thread through
``job_shim`` (the kernel kills it if the dashboard dies, even by SIGKILL). It runs
in its own process group, which ``stop`` signals (SIGTERM, then SIGKILL after
``STOP_GRACE_S``) and which the dashboard kills when it exits.

The records (Ray's JobDetails fields) are kept in ``<jobs dir>/jobs.json``
(owner-only, rewritten whole at each change) beside the jobs' logs, in the
dashboard's state dir (server.py: under the broker's session dir), so a restarted
dashboard lists, shows and serves the logs of the jobs its predecessor ran. A job
that was PENDING or RUNNING then died with it: it is loaded as FAILED, saying so.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

from zray._procutil import private_dir
from zray.dashboard.packages import is_package_uri

log = logging.getLogger("zray.dashboard")

STOP_GRACE_S = 3.0
TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")
STATUSES = ("PENDING", "RUNNING") + TERMINAL
RECORDS = "jobs.json"  # the job records in the jobs dir, kept across dashboard restarts
RECORD_FIELDS = {"type", "job_id", "submission_id", "status", "entrypoint", "message",
                 "error_type", "start_time", "end_time", "metadata", "runtime_env",
                 "driver_info", "driver_exit_code"}
_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")
SUBMIT_FIELDS = {"entrypoint", "submission_id", "runtime_env", "metadata", "job_id",
                 "entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
                 "entrypoint_resources"}


class JobError(ValueError):
    """A bad submission or request (HTTP 400)."""


class JobManager:
    def __init__(self, address: str, jobs_dir: str, packages=None):
        self.address = address
        self.dir = private_dir(jobs_dir)
        self.packages = packages  # PackageStore of uploaded working_dirs (packages.py)
        self.jobs: dict = {}  # submission_id -> info dict (Ray's JobDetails fields)
        self.procs: dict = {}
        self.lock = threading.Lock()
        self.db = os.path.join(self.dir, RECORDS)
        # called with every record after each change (server.py: sent to the broker,
        # whose list_jobs shows them: brokerd/submissions.py); with ``lock`` held
        self.on_change = None
        self._load()
        if packages is not None:
            packages.in_use = self.packages_in_use

    def packages_in_use(self) -> set:
        """The sha256s of the uploaded packages of PENDING and RUNNING jobs."""
        with self.lock:
            uris = []
            for info in self.jobs.values():
                if info["status"] not in TERMINAL:
                    renv = info.get("runtime_env") or {}
                    uris.append(renv.get("working_dir"))
                    uris.extend(renv.get("py_modules") or ())
        return {u.rsplit("_", 1)[1][:-4] for u in uris if is_package_uri(u)}

    # ------------------------------------------------------------ records on disk
    def _load(self) -> None:
        """The records a previous dashboard left. A job it was running died with it (its
        process group is killed when the dashboard dies): FAILED, saying so."""
        try:
            with open(self.db, "rb") as f:
                saved = json.loads(f.read())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("job records %s unreadable (%s): starting without them", self.db, e)
            return
        if not isinstance(saved, dict) or not isinstance(saved.get("jobs"), list):
            log.warning("job records %s malformed: starting without them", self.db)
            return
        now = int(time.time() * 1000)
        died = 0
        for info in saved["jobs"]:
            sid = info.get("submission_id") if isinstance(info, dict) else None
            if (not isinstance(sid, str) or not _ID.match(sid)
                    or info.get("status") not in STATUSES or set(info) - RECORD_FIELDS):
                log.warning("job records %s: skipping a malformed record", self.db)
                continue
            info = dict(info, log_path=os.path.join(self.dir, f"job-{sid}.log"))
            if info["status"] not in TERMINAL:
                died += 1
                info.update(status="FAILED", end_time=now, error_type=None,
                            message="the dashboard stopped while the job was "
                                    f"{info['status']}; its processes were killed with it")
            self.jobs[sid] = info
        if died:
            self._save()
        log.info("loaded %d job records from %s (%d were running: now FAILED)",
                 len(self.jobs), self.db, died)

    def _save(self) -> None:
        """Write every record (owner-only, replaced whole). Call with ``lock`` held."""
        from zray._procutil import write_private_file

        records = [{k: v for k, v in info.items() if not k.startswith("_") and k != "log_path"}
                   for info in self.jobs.values()]
        tmp = f"{self.db}.{os.getpid()}.tmp"
        try:
            write_private_file(tmp, json.dumps({"version": 1, "jobs": records}))
            os.replace(tmp, self.db)
        except OSError as e:
            log.error("could not save the job records to %s: %s", self.db, e)
        self.changed(records)

    def changed(self, records=None) -> None:
        if self.on_change is None:
            return
        if records is None:
            with self.lock:
                records = [{k: v for k, v in info.items() if not k.startswith("_")
                            and k != "log_path"} for info in self.jobs.values()]
        try:
            self.on_change(records)
        except Exception:  # (the broker is away: the next change tells it again)
            log.exception("could not send the job records to the broker")

    def submit(self, body: dict) -> str:
        if not isinstance(body, dict):
            raise JobError("the request body must be a JSON object")
        unknown = set(body) - SUBMIT_FIELDS
        if unknown:
            raise JobError(f"unknown job field(s) {sorted(unknown)}")
        entrypoint = body.get("entrypoint")
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            raise JobError("entrypoint must be a non-empty string (a shell command)")
        for name in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory"):
            if body.get(name) not in (None, 0):
                raise JobError(f"{name} is not supported by zray: the job's driver runs on the "
                               "head and reserves no resources; leave it out")
        if body.get("entrypoint_resources"):
            raise JobError("entrypoint_resources is not supported by zray; leave it out")
        if body.get("job_id") is not None:
            raise JobError("job_id is deprecated in Ray; pass submission_id")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise JobError("metadata must be a dict of str to str")
        runtime_env = body.get("runtime_env") or {}
        cwd, env_rest = self._check_runtime_env(runtime_env)
        sid = body.get("submission_id") or f"raysubmit_{uuid.uuid4().hex[:16]}"
        if not isinstance(sid, str) or not _ID.match(sid):
            raise JobError(f"bad submission_id {sid!r}: use letters, digits, _ . - (1-128)")
        log_path = os.path.join(self.dir, f"job-{sid}.log")
        with self.lock:
            if sid in self.jobs:
                raise JobError(f"a job with submission_id {sid!r} already exists")
            self.jobs[sid] = {
                "type": "SUBMISSION", "job_id": None, "submission_id": sid,
                "status": "PENDING", "entrypoint": entrypoint, "message": "starting",
                "error_type": None, "start_time": int(time.time() * 1000), "end_time": None,
                "metadata": metadata, "runtime_env": runtime_env, "driver_info": None,
                "driver_exit_code": None, "log_path": log_path,
            }
            self._save()
        env = dict(os.environ)
        env.update({"ZRAY_ADDRESS": self.address, "RAY_ADDRESS": self.address,
                    "ZRAY_JOB_SUBMISSION_ID": sid, "RAY_JOB_SUBMISSION_ID": sid,
                    "PYTHONUNBUFFERED": "1",
                    # `python` in the entrypoint is the interpreter zray runs in
                    "PATH": os.pathsep.join([os.path.dirname(sys.executable),
                                             env.get("PATH", os.defpath)])})
        env.pop("ZRAY_JOB_RUNTIME_ENV", None)
        env.pop("ZRAY_DASHBOARD_TOKEN", None)  # the job is code, not a dashboard client
        if env_rest:
            env["ZRAY_JOB_RUNTIME_ENV"] = json.dumps(env_rest)
        for k, v in (runtime_env.get("env_vars") or {}).items():
            env[k] = v
        from zray._cluster import _Spawner

        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                shim = [sys.executable, "-m", "zray.dashboard.job_shim", str(os.getpid()), entrypoint]
                proc = _Spawner.popen(shim, cwd=cwd, env=env,
                                      stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      close_fds=True)
        except OSError as e:
            self._end(sid, "FAILED", f"could not start the entrypoint: {e}", None)
            return sid
        with self.lock:
            self.procs[sid] = proc
            info = self.jobs[sid]
            if info["status"] == "PENDING":
                info.update(status="RUNNING", message="running",
                            driver_info={"id": sid, "pid": str(proc.pid),
                                         "node_ip_address": "127.0.0.1"})
                self._save()
        threading.Thread(target=self._wait, args=(sid, proc), daemon=True,
                         name=f"job-{sid}").start()
        log.info("job %s started (pid %d): %s", sid, proc.pid, entrypoint)
        return sid

    def _check_runtime_env(self, runtime_env) -> tuple:
        """(cwd for the driver, the runtime_env its zray.init() applies to the job)."""
        if not isinstance(runtime_env, dict):
            raise JobError("runtime_env must be a JSON object")
        rest = dict(runtime_env)
        cwd = None
        wd = rest.pop("working_dir", None)
        if is_package_uri(wd):  # uploaded by the client (JobSubmissionClient)
            if self.packages is None:
                raise JobError(f"runtime_env working_dir {wd}: this dashboard keeps no packages")
            wd = self.packages.resolve(wd)
        if wd is not None:
            if not isinstance(wd, str) or "://" in wd:
                raise JobError(f"runtime_env working_dir {wd!r}: zray jobs take a local "
                               "directory (uploaded by the client) or a directory on the "
                               "head (remote URIs are not supported)")
            if not os.path.isdir(wd):
                raise JobError(f"runtime_env working_dir {wd!r} is not a directory on the head")
            cwd = os.path.abspath(wd)
            if _runtime_env_takes("working_dir", cwd):
                # this zray ships runtime_env working_dirs (zray/_renv.py): the driver's
                # init() packs it for the job's tasks and actors too, as in Ray
                rest["working_dir"] = cwd
        mods = rest.get("py_modules")
        if isinstance(mods, list) and any(is_package_uri(m) for m in mods):
            if self.packages is None:
                raise JobError("runtime_env py_modules: this dashboard keeps no packages")
            rest["py_modules"] = [self.packages.resolve_module(m) if is_package_uri(m) else m
                                  for m in mods]
        env_vars = rest.get("env_vars")
        if env_vars is not None and (not isinstance(env_vars, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())):
            raise JobError("runtime_env env_vars must be a dict of str to str")
        if rest:
            from zray._options import validate

            try:
                validate({"runtime_env": rest}, {"runtime_env"}, "job submission")
            except (ValueError, TypeError) as e:
                raise JobError(str(e)) from None
        return cwd, rest

    def _wait(self, sid: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self.lock:
            stopping = self.jobs[sid].get("_stopping")
        if stopping:
            self._end(sid, "STOPPED", "Job was intentionally stopped.", code)
        elif code == 0:
            self._end(sid, "SUCCEEDED", "Job finished successfully.", code)
        else:
            self._end(sid, "FAILED", f"Job entrypoint command failed with exit code {code}",
                      code, "JOB_ENTRYPOINT_COMMAND_ERROR")

    def _end(self, sid, status, message, code, error_type=None):
        with self.lock:
            info = self.jobs[sid]
            info.update(status=status, message=message, driver_exit_code=code,
                        end_time=int(time.time() * 1000), error_type=error_type)
            self.procs.pop(sid, None)
            self._save()
        log.info("job %s %s (%s)", sid, status, message)

    def get(self, sid: str) -> dict:
        with self.lock:
            info = self.jobs.get(sid)
            if info is None:
                raise KeyError(sid)
            return {k: v for k, v in info.items() if not k.startswith("_") and k != "log_path"}

    def list(self) -> list:
        with self.lock:
            sids = list(self.jobs)
        return [self.get(s) for s in sids]

    def logs(self, sid: str, offset: int = 0) -> tuple:
        """(text from byte ``offset``, the next offset) of the job's output."""
        with self.lock:
            info = self.jobs.get(sid)
        if info is None:
            raise KeyError(sid)
        try:
            with open(info["log_path"], "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return "", offset
        # Cut at the last whole UTF-8 character so a follower never sees half of one.
        cut = len(data)
        while cut and (data[cut - 1] & 0xC0) == 0x80:
            cut -= 1
        if cut and data[cut - 1] >= 0xC0:
            cut -= 1
        return data[:cut].decode("utf-8", "replace"), offset + cut

    def stop(self, sid: str) -> bool:
        """Signal a running job's process group: True if it was running."""
        with self.lock:
            info = self.jobs.get(sid)
            if info is None:
                raise KeyError(sid)
            proc = self.procs.get(sid)
            if proc is None or info["status"] in TERMINAL:
                return False
            info["_stopping"] = True
        _signal_group(proc, signal.SIGTERM)
        threading.Thread(target=self._kill_later, args=(proc,), daemon=True).start()
        return True

    @staticmethod
    def _kill_later(proc):
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)

    def delete(self, sid: str) -> bool:
        with self.lock:
            info = self.jobs.get(sid)
            if info is None:
                raise KeyError(sid)
            if info["status"] not in TERMINAL:
                raise JobError(f"job {sid} is {info['status']}: stop it before deleting it")
            del self.jobs[sid]
            self._save()
        try:
            os.unlink(info["log_path"])
        except OSError:
            pass
        return True

    def shutdown(self):
        """Kill every job still running (their process groups), and wait for them."""
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            _signal_group(p, signal.SIGKILL)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _runtime_env_takes(key: str, value) -> bool:
    """Whether this zray's runtime_env accepts ``key`` (working_dir comes with runtime_env
    support for it; without it a job's working_dir is its driver's cwd only)."""
    from zray._options import validate

    try:
        validate({"runtime_env": {key: value}}, {"runtime_env"}, "job submission")
        return True
    except (ValueError, TypeError):
        return False


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
