"""The embedded local cluster: a broker and one node agent as child processes.

The session directory is made under init's ``_temp_dir`` when given.

Both children get ``ZRAY_EXIT_WITH_PARENT`` so they ask the kernel for
SIGKILL when the driver dies (even by SIGKILL); the node agent's executors die
with the agent the same way. The broker listens on an ``ipc://`` socket inside
a private (0700) session directory, so only this user can reach it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from zray._procutil import new_session_dir


def _pythonpath() -> str:
    # Children must import zray/brokerd/workerd from where this driver did.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


class LocalCluster:
    def __init__(self, num_cpus: float, gpu_ids: list, resources: dict,
                 prestart: int | None = None, labels: dict | None = None, memory=None,
                 object_store_memory: int | None = None, temp_dir: str | None = None):
        self.session_dir = new_session_dir(temp_dir)
        self.node_id = os.urandom(8)  # the driver shares this node's object store
        self.address = f"ipc://{self.session_dir}/broker.sock"
        env = dict(os.environ)
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
                self.procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                                   stdout=out, stderr=subprocess.STDOUT,
                                                   close_fds=True))

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self, timeout: float = 3.0) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(1)
        self.procs = []
