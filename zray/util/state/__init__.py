"""The state API (Ray's ``ray.util.state``): what the cluster holds and did, as plain
dicts and lists with Ray's field names. See ``zray.util.state.api``."""

from zray.util.state.api import (
    get_actor,
    get_job,
    get_node,
    get_objects,
    get_placement_group,
    get_task,
    get_worker,
    list_actors,
    list_cluster_events,
    list_jobs,
    list_nodes,
    list_objects,
    list_placement_groups,
    list_runtime_envs,
    list_tasks,
    list_workers,
    summarize_actors,
    summarize_objects,
    summarize_tasks,
)
from zray.util.state.exception import RayStateApiException
from zray.util.state.logs import get_log, list_logs

__all__ = [
    "RayStateApiException", "get_actor", "get_job", "get_log", "get_node", "get_objects",
    "get_placement_group", "get_task", "get_worker", "list_actors", "list_cluster_events",
    "list_jobs", "list_logs", "list_nodes", "list_objects", "list_placement_groups", "list_runtime_envs", "list_tasks", "list_workers",
    "summarize_actors", "summarize_objects", "summarize_tasks",
]
