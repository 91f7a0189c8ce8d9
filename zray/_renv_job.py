"""A job's runtime_env (``init(runtime_env=...)``): packed, uploaded and set up at init.

The job's working_dir and py_modules are packed and uploaded once, at init (as
Ray does); the wire form (zray/_renv.py) is what every task and actor of the job
inherits unless it gives its own. With ``config.eager_install`` (Ray's default)
a no-op task per alive node, pinned there with zero CPUs, binds an executor to
the environment and sets it up at once, so the job's first real task finds it
ready.
"""

from __future__ import annotations

from zray import _runtime
from zray._remote import RemoteFunction
from zray._renv import check, to_wire
from zray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def _eager_setup():
    """The no-op task that sets a job's environment up on a node ahead of its tasks."""
    return None


def start_job(runtime_env) -> None:
    """init(runtime_env=...): pack and upload the job's packages now (as Ray does) and
    keep the wire form its tasks and actors inherit; with ``eager_install`` (the
    default) a no-op task per node starts setting the environment up at once."""
    renv = check(runtime_env)
    wire = to_wire(renv, None, _runtime.client)
    _runtime.job_renv = wire
    if wire is None or not (renv.get("config") or {}).get("eager_install", True):
        return
    for node in _runtime.client.request("nodes"):
        if node.get("Alive"):
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            RemoteFunction(_eager_setup, {"num_cpus": 0, "max_retries": 0,
                                          "scheduling_strategy": strategy}).remote()
