"""Process helpers shared by the benchmarks that start their own CLI clusters."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
