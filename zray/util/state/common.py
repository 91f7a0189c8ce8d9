"""What the state API's rows hold and how filters select them: shared by the API (which
checks a call before sending it) and the broker (which checks what arrives).

Filters are Ray's: ``[(key, "=" | "!=", value), ...]``, all must hold; the key is one
of the resource's columns; values compare as lower-case text, so string filters are
case-insensitive as in Ray.
"""

from __future__ import annotations

# Columns per resource: (shown without detail, shown with detail only). Filters may name
# any of them.
COLUMNS = {
    "tasks": (("task_id", "attempt_number", "name", "state", "job_id", "actor_id", "type",
               "func_or_class_name", "parent_task_id", "node_id", "worker_id", "worker_pid",
               "error_type"),
              ("error_message", "required_resources", "creation_time_ms", "start_time_ms",
               "end_time_ms", "events", "language")),
    "actors": (("actor_id", "class_name", "state", "job_id", "name", "node_id", "pid",
                "ray_namespace"),
               ("is_detached", "num_restarts", "death_cause", "required_resources",
                "repr_name")),
    "nodes": (("node_id", "node_ip", "is_head_node", "state", "state_message", "node_name",
               "resources_total", "labels"),
              ("resources_available", "pid", "executors", "store_limit", "end_time_ms",
               "log_dir")),
    "objects": (("object_id", "object_size", "task_status", "reference_type", "call_site",
                 "type", "pid", "ip"),
                ("state", "locations", "spilled")),
    "jobs": (("job_id", "type", "status", "namespace", "driver_info", "start_time", "end_time",
              "message", "submission_id", "entrypoint", "error_type", "metadata",
              "runtime_env", "driver_exit_code"), ()),
    "placement_groups": (("placement_group_id", "name", "creator_job_id", "state"),
                         ("bundles", "is_detached", "stats", "strategy")),
    "cluster_events": (("event_id", "severity", "time", "source_type", "message"),
                       ("custom_fields",)),
    "workers": (("worker_id", "is_alive", "worker_type", "exit_type", "node_id", "ip", "pid"),
                ("exit_detail", "job_id", "state", "actor_id", "current_task_id")),
    "runtime_envs": (("runtime_env", "success", "creation_time_ms", "node_id"),
                     ("ref_cnt", "error")),
}
MAX_LIMIT = 10_000  # rows per reply (Ray's RAY_MAX_LIMIT_FROM_DATA_SOURCE default)
DEFAULT_LIMIT = 100
DEFAULT_RPC_TIMEOUT = 30


def check_filters(resource: str, filters) -> list:
    """[[key, "=" | "!=", value], ...] from the wire: each key one of the resource's
    columns, each value a str, int, float, bool or None."""
    if filters is None:
        return []
    if type(filters) is not list or len(filters) > 64:
        raise ValueError("filters must be a list of (key, predicate, value)")
    cols = COLUMNS[resource][0] + COLUMNS[resource][1]
    out = []
    for f in filters:
        if type(f) not in (list, tuple) or len(f) != 3:
            raise ValueError(f"a filter is (key, predicate, value), got {f!r:.80}")
        key, op, value = f
        if key not in cols:
            raise ValueError(f"{key!r:.40} is not a column of {resource}; filter on one of "
                             f"{', '.join(cols)}")
        if op not in ("=", "!="):
            raise ValueError(f"unsupported predicate {op!r:.20}: use '=' or '!='")
        if value is not None and type(value) not in (str, int, float, bool):
            raise ValueError(f"filter value for {key} must be a str or number, got "
                             f"{type(value).__name__}")
        out.append((key, op == "=", _norm(value)))
    return out


def _norm(v) -> str:
    """Values compare as lower-case text (Ray: string filters are case-insensitive)."""
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).lower()


def matches(row: dict, filters: list) -> bool:
    for key, equal, value in filters:
        if (_norm(row.get(key)) == value) != equal:
            return False
    return True

