"""Process-global state: the connected client of this process, if any.

A driver fills it in ``zray.init()`` (zray/_api.py); an executor process sets
``client``, ``worker_mode`` and ``executor`` when it starts (workerd/executor.py).
Everything else (refs, remote functions, actor handles) reads it from here.

This module imports nothing from zray, so that the modules below the public
API can use it without importing the API back: the first call that needs a
client while none is connected goes through ``auto_init``, which zray/_api.py
registers when it is imported.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

# The zray._client.Client this process talks to the cluster through; None
# until init() connects (a driver) or the executor starts (an executor).
client = None
# The zray._cluster.LocalCluster that init() started when given no address.
cluster = None
# True inside an executor process, where init() and shutdown() do nothing.
worker_mode = False
# The workerd.executor.ExecutorProcess inside an executor process, else None.
executor = None
# The namespace of named actors: init(namespace=...), or "anon-<client id>".
namespace = ""
# The RayContext init() returned, handed back by init(ignore_reinit_error=True).
context = None
# init(runtime_env=...): its env_vars go with every task and actor of the job.
job_runtime_env: dict = {}
# The wire form of the runtime_env tasks and actors inherit (zray/_renv.py): the job's
# (init), or in an executor the running task's; None when there is nothing to set up.
job_renv: Optional[dict] = None
# Connects this process when something needs a client and none is connected
# (Ray initialises on first use): zray._api.init, registered by zray/_api.py
# at import; None where the API was never imported.
auto_init: Optional[Callable[[], Any]] = None
# True in a child that user code forked (os.fork) from a process with a client:
# the client's sockets and threads are the parent's, so the child has no client
# and does not auto-init one (see _after_fork_in_child).
forked = False
_fork_parent = 0  # pid of the process that last forked, as seen by its child


def require_client():
    """The connected client, connecting through ``auto_init`` first if there is none."""
    if client is None:
        if forked:
            from zray.exceptions import RaySystemError

            raise RaySystemError(
                f"zray cannot be used in a process forked from a zray process (pid "
                f"{_fork_parent}): the connection belongs to the parent. Use the 'spawn' "
                f"start method, or call zray.init() in the child.")
        if auto_init is None:
            raise RuntimeError("zray is not connected in this process and has no auto-init "
                               "hook (zray._api was never imported): call zray.init() first")
        auto_init()
    return client


def current_namespace() -> str:
    """The namespace named actors are created in and looked up in: the driver's, and
    inside a task or actor that of the job it belongs to (asked of the broker once per
    job and cached)."""
    if not worker_mode:
        return namespace
    c = require_client()
    ns = _job_namespaces.get(c.job_id)
    if ns is None:
        info = c.request("job_info", {"job": c.job_id}) or {}
        ns = _job_namespaces[c.job_id] = str(info.get("namespace") or "")
    return ns


# Executor: job id -> that job's namespace (see current_namespace).
_job_namespaces: dict = {}


def job_env_vars() -> dict:
    """The job's environment variables, from init(runtime_env={"env_vars": ...})."""
    return dict(job_runtime_env.get("env_vars") or {})


def _before_fork():
    global _fork_parent
    _fork_parent = os.getpid()


def _after_fork_in_child():
    """The child of an os.fork() by user code: let go of the parent's client without
    touching its sockets (no goodbye to the broker, no shutdown of its cluster at
    exit). A child of an executor also dies with it, as the executor's own
    processes do, so that no task leaves processes behind past shutdown()."""
    global client, cluster, context, forked
    if client is None:
        return
    client.forked_away()
    client = cluster = context = None
    forked = True
    if worker_mode:
        from zray._procutil import die_with_parent

        die_with_parent(_fork_parent)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
