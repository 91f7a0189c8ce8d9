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
# Connects this process when something needs a client and none is connected
# (Ray initialises on first use): zray._api.init, registered by zray/_api.py
# at import; None where the API was never imported.
auto_init: Optional[Callable[[], Any]] = None


def require_client():
    """The connected client, connecting through ``auto_init`` first if there is none."""
    if client is None:
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
