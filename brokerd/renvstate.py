"""Rows of ``list_runtime_envs`` (Ray's RuntimeEnvState): one per runtime_env and node.

::

    executors bound to an environment (Executor.env: its key, brokerd/placement.py)
    + tasks that failed setting one up (RuntimeEnvSetupError, in the event log)
        --rows(engine)--> {runtime_env, success, creation_time_ms, node_id, ref_cnt, error}

A node sets up a runtime_env in the executor processes that run its tasks
(workerd/renv.py): the environments a node has are those its executors were bound
to, and ``ref_cnt`` counts the live ones (Ray: the actors and tasks using it).
``runtime_env`` is the user's form of the wire spec (zray/_renv.py): uploaded
packages by their ``gcs://_ray_pkg_<sha256>.zip`` URI, pip/uv, the setup hook and
``config``. ``success`` is False, with ``error``, where a task failed setting it up
on that node (while the event log still holds that failure). ``creation_time_ms``
(the setup's latency) is not measured by zray: None. Environments of only env_vars
need no process of their own and are not listed (Ray's agent sets up none either).

Owns nothing; reads the engine's executors, tasks, actors and event log.
"""

from __future__ import annotations

MAX_SPECS_SCANNED = 100_000  # specs of finished tasks read to find an environment's spec
# How workerd/renv.py's RuntimeEnvSetupError messages begin.
_SETUP_ERRORS = ("runtime_env setup", "worker_process_setup_hook failed",
                 "bad setup_timeout_seconds", "in runtime_env", "package pkg_")


def _user_form(renv: dict) -> dict:
    """The runtime_env as a user wrote it, from its wire form."""
    out: dict = {}

    def uri(pkg):
        return f"gcs://_ray_pkg_{pkg[0]}.zip" if isinstance(pkg, list) and pkg else None

    if renv.get("working_dir"):
        out["working_dir"] = uri(renv["working_dir"])
    if renv.get("py_modules"):
        out["py_modules"] = [uri(p) for p in renv["py_modules"]]
    pip = renv.get("pip")
    if isinstance(pip, dict):
        name = "uv" if pip.get("installer") == "uv" else "pip"
        out[name] = {"packages": list(pip.get("packages") or [])}
        if name == "pip":
            out[name]["pip_check"] = bool(pip.get("pip_check"))
    hook = renv.get("hook")
    if hook is not None:
        out["worker_process_setup_hook"] = hook if isinstance(hook, str) else "<function>"
    if renv.get("timeout") is not None:
        out["config"] = {"setup_timeout_seconds": renv["timeout"]}
    return out


def _setup_failure(reason) -> bool:
    """Is a failed task's reason (its error text) a RuntimeEnvSetupError of
    workerd/renv.py? (The broker never unpickles the exception: its text says.)"""
    return bool(reason) and any(p in reason for p in _SETUP_ERRORS)


def _renv_of(spec):
    renv = spec.options.get("renv") if spec is not None else None
    return renv if isinstance(renv, dict) and isinstance(renv.get("key"), str) else None


def rows(engine) -> list:
    live: dict = {}  # (key, node id) -> live executors bound to it
    for node in list(engine.nodes.nodes.values()):
        for ex in list(node.executors.values()):
            if ex.env and ex.state.value != "dead":
                k = (ex.env, node.node_id)
                live[k] = live.get(k, 0) + 1
    errors: dict = {}  # (key, node id) -> the newest setup error
    specs = engine.moves.specs
    renvs: dict = {}  # key -> wire form
    ran_on: dict = {}  # task id -> the node of its last move that named one
    for ev in list(engine.moves.events):
        _t, kind, rid, _old, new, reason, node_id, _name = ev
        if kind != "task":
            continue
        if node_id:
            ran_on[rid] = node_id
        else:
            node_id = ran_on.get(rid)  # (a task's FAILED move names no node)
        if new == "failed" and node_id and _setup_failure(reason):
            renv = _renv_of(specs.get(rid))
            if renv is not None:
                renvs.setdefault(renv["key"], renv)
                errors[(renv["key"], node_id)] = reason.removeprefix("raised: ")[:2000]
    wanted = {k for k, _ in live} - set(renvs)
    for spec in [t.spec for t in list(engine.tasks.values())] + [
            a.create.spec for a in list(engine.actors.actors.values())]:
        if not wanted:
            break
        renv = _renv_of(spec)
        if renv is not None and renv["key"] in wanted:
            renvs[renv["key"]] = renv
            wanted.discard(renv["key"])
    if wanted:  # (finished tasks: their specs, newest first)
        for i, rid in enumerate(reversed(list(specs))):
            if not wanted or i >= MAX_SPECS_SCANNED:
                break
            renv = _renv_of(specs.get(rid))
            if renv is not None and renv["key"] in wanted:
                renvs[renv["key"]] = renv
                wanted.discard(renv["key"])
    out = []
    for key, node_id in sorted(set(live) | set(errors)):
        renv = renvs.get(key)
        err = errors.get((key, node_id))
        out.append({"runtime_env": _user_form(renv) if renv else {}, "success": err is None,
                    "creation_time_ms": None, "node_id": node_id.hex(),
                    "ref_cnt": live.get((key, node_id), 0), "error": err})
    return out
