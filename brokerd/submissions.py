"""Jobs submitted through the dashboard's job API, as the broker's ``list_jobs`` shows them.

::

    dashboard (zray/dashboard/jobs.py): a job record changes
        --REQ job_submissions {jobs: [record, ...]}--> SubmissionTable.update (checked)
    a job's driver: REQ register_job {..., submission_id}  --> link(job id, submission id)
    REQ state_list jobs --> brokerd/state.py: rows(driver rows) --> the SUBMISSION rows
        (with their driver's job_id and driver_info), then the DRIVER rows of the drivers
        that no submission started

Ray's ``list_jobs`` lists both kinds: a job submitted through the job API is one row
of type SUBMISSION (its ``job_id`` is its driver's once that driver connected), a
driver started by hand one row of type DRIVER. The records are the dashboard's (it
runs the jobs and keeps them across its own restarts); the broker only keeps the
latest copy it was sent, bounded by ``MAX_SUBMISSIONS``, and shows it. Only a CLI
client (the dashboard's connection) may send them; every field is checked here.

Owns: the submission records and the job id -> submission id links.
"""

from __future__ import annotations

import re

MAX_SUBMISSIONS = 10_000
MAX_TEXT = 64 * 1024  # entrypoint, message: longer ones are cut
_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")
STATUSES = ("PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")
# field -> the types a record may give it (None: may be null)
FIELDS = {
    "submission_id": (str,), "status": (str,), "entrypoint": (str,),
    "message": (str, type(None)), "error_type": (str, type(None)),
    "start_time": (int, type(None)), "end_time": (int, type(None)),
    "metadata": (dict, type(None)), "runtime_env": (dict, type(None)),
    "driver_exit_code": (int, type(None)),
}


def _check(rec) -> dict:
    if not isinstance(rec, dict):
        raise ValueError("a job submission record must be a dict")
    out = {}
    for name, types in FIELDS.items():
        v = rec.get(name)
        if type(v) not in types:
            raise ValueError(f"job submission record: {name} must be "
                             f"{' or '.join(t.__name__ for t in types)}, got {type(v).__name__}")
        out[name] = v
    if not _ID.match(out["submission_id"]):
        raise ValueError("job submission record: bad submission_id")
    if out["status"] not in STATUSES:
        raise ValueError(f"job submission record: status must be one of {STATUSES}")
    md = out["metadata"]
    if md is not None and not all(type(k) is str and type(v) is str for k, v in md.items()):
        raise ValueError("job submission record: metadata must map str to str")
    for name in ("entrypoint", "message"):
        if out[name] is not None and len(out[name]) > MAX_TEXT:
            out[name] = out[name][:MAX_TEXT]
    return out


class SubmissionTable:
    def __init__(self):
        self.jobs: dict = {}  # submission id -> checked record
        self.job_of: dict = {}  # submission id -> the hex job id of its driver

    def update(self, records) -> int:
        """The dashboard's records (all of them, or the ones that changed)."""
        if not isinstance(records, list) or len(records) > MAX_SUBMISSIONS:
            raise ValueError(f"jobs must be a list of at most {MAX_SUBMISSIONS} records")
        checked = [_check(r) for r in records]  # (all or none)
        for rec in checked:
            self.jobs.pop(rec["submission_id"], None)
            self.jobs[rec["submission_id"]] = rec
        while len(self.jobs) > MAX_SUBMISSIONS:
            sid = next(iter(self.jobs))
            del self.jobs[sid]
            self.job_of.pop(sid, None)
        return len(checked)

    def link(self, job_id: bytes, submission_id) -> None:
        """A driver said it runs for ``submission_id`` (RAY_JOB_SUBMISSION_ID)."""
        if isinstance(submission_id, str) and _ID.match(submission_id):
            if len(self.job_of) >= MAX_SUBMISSIONS and submission_id not in self.job_of:
                self.job_of.pop(next(iter(self.job_of)))
            self.job_of[submission_id] = job_id.hex()

    def rows(self, driver_rows: list) -> list:
        """Ray's list_jobs rows: the submissions (merged with their driver's row), then
        the drivers no submission started."""
        by_job = {r["job_id"]: r for r in driver_rows}
        merged = set()
        out = []
        for sid, rec in self.jobs.items():
            job = self.job_of.get(sid)
            driver = by_job.get(job) if job else None
            if driver is not None:
                merged.add(job)
            out.append({"job_id": job, "type": "SUBMISSION", **rec,
                        "namespace": driver["namespace"] if driver else None,
                        "driver_info": driver["driver_info"] if driver else None})
        linked = set(self.job_of.values())
        return out + [r for r in driver_rows if r["job_id"] not in merged
                      and r["job_id"] not in linked]
