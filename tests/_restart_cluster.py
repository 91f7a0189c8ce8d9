"""A restartable CLI cluster for the broker-restart tests: ``zray broker --state-dir``
and ``zray worker`` processes on this host, this test process their driver. The
broker is SIGKILLed and started again on the same port and state directory, as
systemd would.

::

    with restartable_cluster(tmp_path, env={"ZRAY_RESTART_GRACE_S": "8"}) as c:
        c.start(worker=2)     # "broker" on c.port and c.state, a 2-CPU "worker", the driver
        ...                   # (or c.start_broker(), c.procs.start(...) one by one)
        c.restart_broker()      # SIGKILL "broker", start "broker2", wait until it listens
        c.kill("worker")                             # SIGKILL a worker (and its executors)
        orphan = c.start_driver(SOURCE, "orphan")   # another driver, once it printed "ready"
    # on leaving: the driver disconnects; if the block passed, every process still in
    # c.procs must be running; then all of them (and other drivers) are killed and must
    # be gone; their logs are printed if the block raised

Used by tests/test_restart.py, tests/test_restart_pg.py, tests/test_restart_lineage.py
(zray only: Ray has no broker to restart).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from conftest import kill_tree, poll_until, wait_gone
from test_cli_cluster import _free_port, _Procs

import zray


class RestartableCluster:
    def __init__(self, tmp_path, env: dict | None = None):
        self.tmp_path = tmp_path
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.state = tmp_path / "state"
        self.procs = _Procs(tmp_path)
        self.procs.env.update(env or {})
        self.adopted: list = []  # other drivers (start_driver)

    def start(self, **workers) -> None:
        """Broker "broker", workers ``name=cpus``, this process connected as the driver;
        returns once every worker joined."""
        self.start_broker()
        for name, cpus in workers.items():
            self.procs.start(name, ["worker", "--address", self.address,
                                    "--num-cpus", str(cpus)])
        self.procs.connect_driver(self.address, 60)
        poll_until(lambda: len([n for n in zray.nodes() if n["Alive"]]) == len(workers), 60,
                   interval=0.1, what=f"{len(workers)} worker(s) to join")

    def start_broker(self, name: str = "broker"):
        """Start broker ``name`` on this cluster's port and state directory."""
        return self.procs.start(name, ["broker", "--host", "127.0.0.1", "--port",
                                       str(self.port), "--state-dir", str(self.state)])

    def kill_broker(self, name: str = "broker") -> None:
        """SIGKILL broker ``name`` (no goodbye to anyone: a crash)."""
        broker = self.procs.procs.pop(name)
        os.kill(broker.pid, signal.SIGKILL)
        broker.wait(10)

    def restart_broker(self, old: str = "broker", new: str = "broker2") -> None:
        """SIGKILL broker ``old``, start ``new`` on the same port and state, and wait
        until it listens."""
        self.kill_broker(old)
        self.start_broker(new)

        def listening():
            self.procs.check_running()
            return "listening on" in (self.tmp_path / f"{new}.log").read_text(errors="replace")

        poll_until(listening, 60, interval=0.05, what=f"the new broker ({new}) to listen")

    def start_driver(self, source: str, name: str):
        """Another driver: ``source`` run with the cluster's address as ``sys.argv[1]``,
        in its own session; its Popen once it printed "ready" (killed with the rest)."""
        script = self.tmp_path / f"{name}.py"
        script.write_text(source)
        proc = subprocess.Popen([sys.executable, str(script), self.address],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=self.procs.env, start_new_session=True)
        self.adopted.append(proc)
        line = proc.stdout.readline().strip()
        assert line == "ready", f"driver {name} said {line!r}"
        return proc

    def kill(self, name_or_proc) -> None:
        """SIGKILL a worker of ``procs`` (by name: it leaves ``procs``) or a driver from
        ``start_driver``, with its children."""
        if isinstance(name_or_proc, str):
            name_or_proc = self.procs.procs.pop(name_or_proc)
        kill_tree(name_or_proc.pid)
        name_or_proc.wait(10)


@contextlib.contextmanager
def restartable_cluster(tmp_path, env: dict | None = None):
    """A RestartableCluster with nothing started yet (this process's own cluster, if
    any, shut down first); cleaned up on leaving, whatever happens."""
    if zray.is_initialized():
        zray.shutdown()
    c = RestartableCluster(tmp_path, env)
    try:
        try:
            yield c
        finally:
            zray.shutdown()
        c.procs.check_running()
    except BaseException:
        print(c.procs.logs())
        raise
    finally:
        for p in c.adopted:
            if p.poll() is None:
                kill_tree(p.pid)
                p.wait(10)
        everything = c.procs.descendants()
        c.procs.kill_all()
        wait_gone(everything, 20)
