"""The state API (Ray's ``ray.util.state``): what the cluster holds and did, as plain
dicts and lists with Ray's field names. See ``zray.util.state.api``."""

from zray.util.state.api import (
    get_actor,
    get_node,
    get_task,
    list_actors,
    list_jobs,
    list_nodes,
    list_objects,
    list_placement_groups,
    list_tasks,
    summarize_actors,
    summarize_objects,
    summarize_tasks,
)
from zray.util.state.exception import RayStateApiException

__all__ = [
    "RayStateApiException", "get_actor", "get_node", "get_task", "list_actors", "list_jobs",
    "list_nodes", "list_objects", "list_placement_groups", "list_tasks", "summarize_actors",
    "summarize_objects", "summarize_tasks",
]
