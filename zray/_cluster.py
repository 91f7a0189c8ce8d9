"""The embedded local cluster: a broker and one node agent as child processes.

The session directory is made under init's ``_temp_dir`` when given.

Both children get ``ZRAY_EXIT_WITH_PARENT`` so they ask the kernel for
SIGKILL when the driver dies (even by SIGKILL); the node agent's executors die
with the agent the same way. The broker listens on an ``ipc://`` socket inside
a private (0700) session directory, so only this user can reach it.

The kernel's parent-death signal follows the *thread* that forked the child,
not its process: a cluster started by ``init()`` on a thread that then ends
would be killed with that thread. So the children are always started from
one long-lived thread of this process (``_Spawner``), which lives until the
process exits.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import subprocess
import sys
import threading

from zray._procutil import bytecode_env, new_session_dir
from zray._store import check_roots


def _pythonpath() -> str:
    # Children must import zray/brokerd/workerd from where this driver did.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


class _Spawner:
    """A daemon thread that starts processes for whoever asks, so that their
    parent-death signal is tied to a thread that lives as long as this process."""

    _lock = threading.Lock()
    _instance = None

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.pid = os.getpid()
        threading.Thread(target=self._run, name="zray-spawner", daemon=True).start()

    @classmethod
    def popen(cls, *args, **kwargs) -> subprocess.Popen:
        with cls._lock:
            if cls._instance is None or cls._instance.pid != os.getpid():  # none, or forked
                cls._instance = _Spawner()
            spawner = cls._instance
        fut: concurrent.futures.Future = concurrent.futures.Future()
        spawner.jobs.put((fut, args, kwargs))
        return fut.result()

    def _run(self):
        while True:
            fut, args, kwargs = self.jobs.get()
            try:
                fut.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as e:  # noqa: B036 - handed to the caller
                fut.set_exception(e)


def _check_env() -> None:
    """The broker's and executors' environment knobs (ZRAY_EXEC_*): a bad one is a
    ValueError naming it here, not a broker or executors that die at start."""
    from brokerd import window
    from workerd import held
    from workerd import lease as leases

    window.read_env()
    from brokerd import placement

    placement.read_env()
    held.read_env()
    leases.read_env()


class LocalCluster:
    def __init__(self, num_cpus: float, gpu_ids: list, resources: dict,
                 prestart: int | None = None, labels: dict | None = None, memory=None,
                 object_store_memory: int | None = None, temp_dir: str | None = None):
        # Refuse a store another user could plant objects in before making anything.
        check_roots()
        _check_env()
        self.session_dir = new_session_dir(temp_dir)
        self.node_id = os.urandom(8)  # the driver shares this node's object store
        self.address = f"ipc://{self.session_dir}/broker.sock"
        env = bytecode_env(dict(os.environ))
        env.update({
            "ZRAY_EXIT_WITH_PARENT": str(os.getpid()),
            "ZRAY_SESSION_DIR": self.session_dir,
            "ZRAY_ADDRESS": self.address,
            "PYTHONPATH": _pythonpath(),
            "ZRAY_NODE_CONFIG": json.dumps({
                "num_cpus": num_cpus, "gpu_ids": gpu_ids, "resources": resources,
                "prestart": prestart, "labels": labels or {}, "memory": memory,
                "node_id": self.node_id.hex(), "object_store_memory": object_store_memory,
            }),
        })
        logs = os.path.join(self.session_dir, "logs")
        self.procs = []
        for name, cmd in (("broker", [sys.executable, "-m", "brokerd", self.address, self.session_dir]),
                          ("node", [sys.executable, "-m", "workerd"])):
            with open(os.path.join(logs, f"{name}.out"), "ab") as out:
                self.procs.append(_Spawner.popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                                 stdout=out, stderr=subprocess.STDOUT,
                                                 close_fds=True))

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self, timeout: float = 3.0) -> None:
        # The node first, the broker once it is gone: its executors' last messages reach a
        # live broker (with the broker gone first, each one that had anything unsent
        # waited out its socket's linger before it could exit).
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(1)
        self.procs = []
