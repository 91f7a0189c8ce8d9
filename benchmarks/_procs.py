"""Process helpers shared by the benchmarks that start their own CLI clusters."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


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


class CliCluster:
    """A cluster of CLI processes from one source tree, in a scratch dir of its own.

    ``zray broker`` on a free loopback port, CURVE on with a key file of its own
    (``ZRAY_INSECURE`` and ``ZRAY_ADDRESS`` are dropped from the environment), every
    process in a session of its own with ``PYTHONPATH=<tree>`` and the scratch dir as its
    working directory (so that ``-m``/``-c`` never import the tree they are run from).
    Leaving the ``with`` block stops every process it started and removes the dir::

        with CliCluster(tree, "zbt-") as c:
            broker = c.start_broker()
            c.start_worker("--num-cpus", "1")
            subprocess.run([sys.executable, script, c.address], env=c.env, cwd=c.tmp)
    """

    def __init__(self, tree: str, prefix: str, env: dict | None = None, drop: tuple = (),
                 log_name: str = "cluster.log"):
        """``env``: variables set for every process; ``drop``: variables removed."""
        self.tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.env = dict(os.environ)
        for key in ("ZRAY_ADDRESS", "ZRAY_INSECURE", *drop):
            self.env.pop(key, None)
        self.env.update(PYTHONPATH=os.path.abspath(tree), ZRAY_TMPDIR=self.tmp,
                        PYTHONUNBUFFERED="1", ZRAY_KEY_FILE=os.path.join(self.tmp, "cluster.key"))
        self.env.update(env or {})
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.cli = [sys.executable, "-m", "zray.cli"]
        self.log_path = os.path.join(self.tmp, log_name)
        self.procs: list = []

    def start(self, args: list, env: dict | None = None, log: bool = False,
              **kw) -> subprocess.Popen:
        """Start ``args`` in the cluster's environment (``env``: instead of it), its output
        appended to the cluster's log if ``log``; stopped with the cluster."""
        if log:
            with open(self.log_path, "ab") as f:
                return self.start(args, env, stdout=f, stderr=subprocess.STDOUT, **kw)
        p = subprocess.Popen(args, env=self.env if env is None else env,
                             start_new_session=True, stdin=subprocess.DEVNULL, cwd=self.tmp, **kw)
        self.procs.append(p)
        return p

    def start_broker(self, python: list | None = None, timeout: float = 30) -> subprocess.Popen:
        """``zray broker`` (run as ``python + [-m zray.cli ...]`` if given: a profiler),
        once its key file exists (up to ``timeout`` s)."""
        args = (python or [sys.executable]) + ["-m", "zray.cli", "broker", "--host",
                                                "127.0.0.1", "--port", str(self.port)]
        broker = self.start(args, log=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.env["ZRAY_KEY_FILE"]):
            if broker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not start: {self.log_tail()}")
            time.sleep(0.05)
        return broker

    def start_worker(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        """``zray worker --address <broker> *args``, its output in the cluster's log."""
        return self.start(self.cli + ["worker", "--address", self.address, *args],
                          env=env, log=True)

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_all(self.procs, self.tmp)

    def __enter__(self) -> "CliCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
