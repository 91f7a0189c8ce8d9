"""Jobs whose driver is gone: a bounded record the state API lists (``list_jobs``).

::

    driver REQ register_job --> Engine.jobs[job] = {namespace, driver, start_ms}
    driver EXIT (or silent past DRIVER_TIMEOUT_S) --> Engine.driver_gone
        --> EndedJobs.add(job, info, pid, node, normal) --> list_jobs: status SUCCEEDED

As in Ray, a driver job (type DRIVER) is RUNNING while its driver is connected and
SUCCEEDED once it is gone, however it went; ``message`` says whether it left
normally (an EXIT) or fell silent. Only the newest ``ZRAY_MAX_ENDED_JOBS`` (1,000)
ended jobs are kept. Owns nothing but its own records; the engine calls it.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional


def _max_ended_jobs() -> int:
    text = os.environ.get("ZRAY_MAX_ENDED_JOBS", "1000")
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"ZRAY_MAX_ENDED_JOBS must be an integer >= 0, got {text!r}")
    return value


MAX_ENDED_JOBS = _max_ended_jobs()


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class EndedJob:
    job_id: bytes
    namespace: str
    driver_id: bytes
    pid: Optional[int]
    node_id: Optional[bytes]
    start_ms: Optional[int]
    end_ms: int
    normal: bool  # the driver said EXIT (else it fell silent)


class EndedJobs:
    """The newest ended jobs, oldest first."""

    def __init__(self, limit: int = MAX_ENDED_JOBS):
        self.limit = max(0, limit)
        self.jobs: OrderedDict = OrderedDict()  # job id -> EndedJob

    def add(self, job_id: bytes, info: dict, pid, node_id, normal: bool) -> None:
        self.jobs.pop(job_id, None)
        self.jobs[job_id] = EndedJob(job_id, info.get("namespace", ""), info.get("driver", b""),
                                     pid, node_id, info.get("start_ms"), now_ms(), normal)
        while len(self.jobs) > self.limit:
            self.jobs.popitem(last=False)

    def rows(self) -> list:
        return [{"job_id": j.job_id.hex(), "type": "DRIVER", "status": "SUCCEEDED",
                 "namespace": j.namespace,
                 "driver_info": {"id": j.driver_id.hex(), "pid": j.pid,
                                 "node_id": j.node_id.hex() if j.node_id else None},
                 "start_time": j.start_ms, "end_time": j.end_ms,
                 "message": "the driver exited" if j.normal else
                            "the driver fell silent; its job was released"}
                for j in self.jobs.values()]
