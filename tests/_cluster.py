"""A cluster of CLI processes for tests: ``zray broker`` and named ``zray worker``
daemons on this host, this test process their driver.

::

    with cli_cluster(tmp_path, env={"ZRAY_NODE_TIMEOUT_S": "2"}) as c:   # broker + driver
        c.add_worker("w0", cpus=2, labels={"zone": "a"})   # --resources {"w0": 1}: a task
        ...                                                # can ask for that node by name
    # on leaving: the driver disconnects, every process gets SIGTERM and must be gone
    # (clean_stop=True) or is SIGKILLed; their logs are printed if the block raised

Used by the test modules that start the same 3-node clusters (node blobs, placement
groups, scheduling) as module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import json
import signal

from conftest import describe, kill_tree, poll_until, wait_gone
from test_cli_cluster import _free_port, _Procs

import zray


class CliCluster:
    def __init__(self, tmp_path, env: dict | None = None, unset=()):
        self.tmp_path = tmp_path
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs = _Procs(tmp_path)
        for name in unset:
            self.procs.env.pop(name, None)
        self.procs.env.update(env or {})
        self.node_of: dict = {}  # worker name -> node id (hex)

    def start(self) -> CliCluster:
        """The broker, and this process connected to it as the driver."""
        if zray.is_initialized():
            zray.shutdown()
        self.procs.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(self.port)])
        self.procs.connect_driver(self.address, 30)
        return self

    def add_worker(self, name: str, cpus: float = 1, gpus: int | None = None,
                   labels: dict | None = None, extra=()) -> str:
        """Start worker ``name`` (custom resource ``{name: 1}``); its node id once it joined."""
        args = ["worker", "--address", self.address, "--num-cpus", str(cpus)]
        if gpus is not None:
            args += ["--gpus", str(gpus)]
        args += ["--resources", json.dumps({name: 1})]
        if labels is not None:
            args += ["--labels", json.dumps(labels)]
        self.procs.start(name, args + list(extra))

        def joined():
            self.procs.check_running()
            for n in zray.nodes():
                if n["Alive"] and n["Resources"].get(name):
                    return n["NodeID"]
            return None

        self.node_of[name] = poll_until(joined, 60, interval=0.1, what=f"{name} to join")
        return self.node_of[name]

    def kill_worker(self, name: str) -> None:
        """SIGKILL worker ``name`` and its executors."""
        p = self.procs.procs.pop(name)
        kill_tree(p.pid)
        p.wait(10)

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        """Disconnect, SIGTERM every process and check that all of them (executors too)
        are gone."""
        zray.shutdown()
        everything = self.procs.descendants()
        for p in self.procs.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.procs.values():
            p.wait(15)
        left = wait_gone(everything, 10)
        assert left == [], f"left behind: {describe(left)}"


@contextlib.contextmanager
def cli_cluster(tmp_path, cls=CliCluster, clean_stop: bool = True, **kwargs):
    """A started ``cls`` (CliCluster or a subclass; ``kwargs`` go to it); stopped on
    leaving (``clean_stop``: with SIGTERM, checking that nothing is left), SIGKILLed
    whatever happens."""
    c = cls(tmp_path, **kwargs)
    try:
        c.start()
        yield c
        if clean_stop:
            c.stop()
    except BaseException:
        print(c.procs.logs())
        raise
    finally:
        if zray.is_initialized():
            zray.shutdown()
        c.procs.kill_all()
