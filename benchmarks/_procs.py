"""Process helpers shared by the benchmarks that start their own CLI clusters."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess


def stop_all(procs: list, tmp: str) -> None:
    """Stop the process groups of ``procs`` (SIGTERM, then SIGKILL after 10 s), newest
    first, and remove their scratch directory ``tmp``."""
    for p in reversed(procs):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    shutil.rmtree(tmp, ignore_errors=True)
