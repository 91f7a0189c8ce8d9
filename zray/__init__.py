"""zray: Ray Core's API on a ZeroMQ broker.

``import zray as ray`` and run Ray Core programs unchanged: ``init``,
``@remote`` functions and classes, ``get``, ``put``, ``wait``, ``cancel``,
``kill``, named actors, resources and scheduling strategies.
"""

import sys as _sys

import cloudpickle

from zray import exceptions, runtime_env, util
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
from zray._ids import ActorID, JobID, NodeID, TaskID, WorkerID
from zray._refs import DynamicObjectRefGenerator, ObjectRef, ObjectRefGenerator
from zray.actor import ActorClass, ActorHandle, exit_actor, method

ObjectID = ObjectRef  # Ray's name for the id of an object is its ObjectRef class
# ``zray.cloudpickle`` is the cloudpickle zray serializes with, as ``ray.cloudpickle`` is
# Ray's (so ``import zray.cloudpickle`` and ``from zray import cloudpickle`` both work).
_sys.modules.setdefault(__name__ + ".cloudpickle", cloudpickle)

__version__ = "0.1.0"

__all__ = [
    "ActorClass", "ActorHandle", "ActorID", "DynamicObjectRefGenerator", "JobID", "NodeID",
    "ObjectID", "ObjectRef", "ObjectRefGenerator", "RuntimeContext", "TaskID", "WorkerID",
    "cloudpickle", "util", "runtime_env",
    "available_resources", "cancel", "cluster_resources", "exceptions", "exit_actor", "get",
    "get_actor", "get_gpu_ids", "get_runtime_context", "init", "is_initialized", "kill",
    "memory_summary", "method", "nodes", "put", "remote", "shutdown", "timeline", "wait", "__version__",
]
