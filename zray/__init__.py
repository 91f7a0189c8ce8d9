"""zray: Ray Core's API on a ZeroMQ broker.

``import zray as ray`` and run Ray Core programs unchanged: ``init``,
``@remote`` functions and classes, ``get``, ``put``, ``wait``, ``cancel``,
``kill``, named actors, resources and scheduling strategies.
"""

from zray import exceptions
from zray._api import (
    RuntimeContext,
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_actor,
    get_gpu_ids,
    get_runtime_context,
    init,
    is_initialized,
    kill,
    memory_summary,
    nodes,
    put,
    remote,
    shutdown,
    timeline,
    wait,
)
from zray._refs import DynamicObjectRefGenerator, ObjectRef, ObjectRefGenerator
from zray.actor import ActorClass, ActorHandle, exit_actor, method

__version__ = "0.1.0"

__all__ = [
    "ActorClass", "ActorHandle", "DynamicObjectRefGenerator", "ObjectRef", "ObjectRefGenerator", "RuntimeContext",
    "available_resources", "cancel", "cluster_resources", "exceptions", "exit_actor", "get",
    "get_actor", "get_gpu_ids", "get_runtime_context", "init", "is_initialized", "kill",
    "memory_summary", "method", "nodes", "put", "remote", "shutdown", "timeline", "wait", "__version__",
]
