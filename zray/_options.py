"""Validation of ``@remote`` / ``.options()`` arguments, and their wire form."""

from __future__ import annotations

import cloudpickle

from zray import _protocol as P

_COMMON = {
    "num_cpus", "num_gpus", "resources", "memory", "accelerator_type", "scheduling_strategy",
    "runtime_env", "name", "max_retries", "retry_exceptions", "placement_group",
    "placement_group_bundle_index", "placement_group_capture_child_tasks", "label_selector",
    "_metadata", "enable_task_events", "object_store_memory", "_labels",
}
TASK_OPTIONS = _COMMON | {"num_returns", "max_calls", "_generator_backpressure_num_objects"}
ACTOR_OPTIONS = (_COMMON - {"max_retries", "retry_exceptions"}) | {
    "namespace", "lifetime", "get_if_exists", "max_concurrency", "max_restarts",
    "max_task_retries", "max_pending_calls", "concurrency_groups", "allow_out_of_order_execution",
}
METHOD_OPTIONS = {"num_returns", "concurrency_group", "max_task_retries", "retry_exceptions",
                  "name", "enable_task_events", "_generator_backpressure_num_objects"}
_RUNTIME_ENV_KEYS = {"env_vars"}


def validate(options: dict, allowed: set, what: str) -> dict:
    for key in options:
        if key not in allowed:
            raise ValueError(f"Invalid option keyword {key!r} for {what}. "
                             f"Valid ones are: {', '.join(sorted(k for k in allowed if not k.startswith('_')))}.")
    for key in ("num_cpus", "num_gpus", "memory", "object_store_memory"):
        v = options.get(key)
        if v is not None:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"{key} must be a number, got {v!r}")
            if v < 0:
                raise ValueError(f"{key} must be >= 0, got {v}")
    if options.get("num_gpus") and options["num_gpus"] > 1 and options["num_gpus"] % 1:
        raise ValueError(f"num_gpus above 1 must be a whole number, got {options['num_gpus']}")
    res = options.get("resources")
    if res is not None:
        if not isinstance(res, dict):
            raise ValueError(f"resources must be a dict, got {type(res).__name__}")
        for k, v in res.items():
            if k in ("CPU", "GPU", "memory"):
                raise ValueError(f"Use the {k.lower() if k != 'memory' else 'memory'} option "
                                 f"(num_cpus/num_gpus/memory) instead of resources[{k!r}]")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"resources[{k!r}] must be a number >= 0, got {v!r}")
    nr = options.get("num_returns")
    if nr is not None and nr not in ("streaming", "dynamic") and not (
            isinstance(nr, int) and nr >= 0):
        raise ValueError(f"num_returns must be an int >= 0, 'streaming' or 'dynamic', got {nr!r}")
    mr = options.get("max_retries")
    if mr is not None and (not isinstance(mr, int) or mr < -1):
        raise ValueError(f"max_retries must be an int >= -1, got {mr!r}")
    for key in ("max_restarts", "max_task_retries"):
        v = options.get(key)
        if v is not None and (not isinstance(v, int) or v < -1):
            raise ValueError(f"{key} must be an int >= -1, got {v!r}")
    mc = options.get("max_concurrency")
    if mc is not None and (not isinstance(mc, int) or mc < 1):
        raise ValueError(f"max_concurrency must be an int >= 1, got {mc!r}")
    lt = options.get("lifetime")
    if lt is not None and lt not in ("detached", "non_detached"):
        raise ValueError(f"lifetime must be 'detached' or 'non_detached', got {lt!r}")
    renv = options.get("runtime_env")
    if renv:
        if not isinstance(renv, dict):
            raise ValueError("runtime_env must be a dict")
        unknown = set(renv) - _RUNTIME_ENV_KEYS
        if unknown:
            raise ValueError(f"runtime_env keys {sorted(unknown)} are not supported by zray yet "
                             f"(supported: {sorted(_RUNTIME_ENV_KEYS)})")
        ev = renv.get("env_vars") or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in ev.items()):
            raise ValueError("runtime_env['env_vars'] must map str to str")
    strategy_to_wire(options.get("scheduling_strategy"))
    return options


def strategy_to_wire(s):
    if s is None or s == "DEFAULT":
        return None
    if s == "SPREAD":
        return "SPREAD"
    to_wire = getattr(s, "_to_wire", None)
    if to_wire is not None:
        return to_wire()
    raise ValueError(f"scheduling_strategy must be 'DEFAULT', 'SPREAD' or a strategy object, got {s!r}")


def resource_units(options: dict, default_cpus: float) -> dict:
    res = {}
    cpus = options.get("num_cpus")
    res["CPU"] = default_cpus if cpus is None else cpus
    if options.get("num_gpus"):
        res["GPU"] = options["num_gpus"]
    if options.get("memory"):
        res["memory"] = options["memory"]
    for k, v in (options.get("resources") or {}).items():
        res[k] = v
    return P.to_units(res)


def wire_options(options: dict, merged_env: dict | None) -> dict:
    out = {}
    mr = options.get("max_retries")
    out["max_retries"] = 3 if mr is None else mr
    rex = options.get("retry_exceptions")
    if rex:
        out["retry_exceptions"] = True if rex is True else cloudpickle.dumps(tuple(rex))
    strategy = strategy_to_wire(options.get("scheduling_strategy"))
    if strategy is not None:
        out["strategy"] = strategy
    env = dict(merged_env or {})
    env.update(((options.get("runtime_env") or {}).get("env_vars")) or {})
    if env:
        out["env_vars"] = env
    return out
