"""Process-global state: the connected client of this process, if any."""

from __future__ import annotations

client = None  # zray._client.Client while connected
cluster = None  # zray._cluster.LocalCluster when init() started one
worker_mode = False  # True inside an executor process


def require_client():
    if client is None:
        from zray import _api

        _api.init()  # Ray auto-initialises on first use
    return client


job_runtime_env: dict = {}
executor = None  # workerd.executor.ExecutorProcess inside an executor process


def job_env_vars() -> dict:
    return dict(job_runtime_env.get("env_vars") or {})
namespace = ""
context = None
