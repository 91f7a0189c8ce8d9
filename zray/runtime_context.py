"""``get_runtime_context()``: who and where the calling code is, with Ray's names.

In a driver the answers come from its client and ``init()``'s arguments. In an
executor they come from the spec of what runs there, which the executor keeps
(``ExecutorProcess`` in workerd/executor.py): ``spec`` is the task or sync actor
call it runs now, ``actor_spec`` the creation of the actor it hosts. Calls of
threaded and async actors run beside each other with no spec of their own, so
in them the task's names are None and ``is_canceled()`` is found through the
asyncio task (async) or is always False (threaded).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any, Optional

from zray import _protocol as P
from zray import _runtime

_WORKER_ONLY = "This method is only available when the process is a worker (in a task or actor)."


def get_gpu_ids() -> list:
    """GPU ids assigned to the current task or actor."""
    ex = _runtime.executor
    if ex is not None:
        ids = getattr(ex, "gpu_ids", None) or []
        return [int(g) if str(g).isdigit() else g for g in ids]
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [int(g) if g.isdigit() else g for g in cvd.split(",")] if cvd else []


def _executor():
    return _runtime.executor


def _spec():
    """The spec of the task or sync actor call running in this executor; None in a driver
    and in a call of a threaded or async actor (those run beside each other)."""
    ex = _runtime.executor
    if ex is None:
        return None
    if (_actor_mode(ex) in ("threaded", "async")
            and threading.current_thread() is not threading.main_thread()):
        return None
    return getattr(ex, "spec", None)


def _actor_mode(ex) -> str:
    """"sync", "threaded" or "async" (workerd.actors.ActorMode) once the actor is built."""
    mode = getattr(getattr(ex, "actor", None), "mode", None)
    return getattr(mode, "value", "")


def _actor_spec():
    """The creation spec of the actor this executor hosts (or is creating), else None."""
    ex = _runtime.executor
    return getattr(ex, "actor_spec", None) if ex is not None else None


def _user_class(cls):
    """The class the user decorated (zray.actor adds Ray's built-in methods in a subclass)."""
    return getattr(cls, "__zray_user_class__", cls)


# actor id -> whether this process's actor is a restart (asked once: see below)
_reconstructed: dict = {}


class RuntimeContext:
    """What get_runtime_context() returns: ids of the current job, node, task, actor,
    and what the current task or actor was given."""

    def _client(self):
        return _runtime.require_client()

    # ------------------------------------------------------------------ ids
    def get_job_id(self) -> str:
        return self._client().job_id.hex()

    def get_node_id(self) -> str:
        c = self._client()
        return c.node_id.hex() if c.node_id else ""

    def get_task_id(self) -> Optional[str]:
        t = self._client().current_task_id
        return t.hex() if t else None

    def get_actor_id(self) -> Optional[str]:
        a = self._client().current_actor_id
        return a.hex() if a else None

    def get_worker_id(self) -> str:
        return self._client().cid.hex()

    def get_namespace(self) -> str:
        return _runtime.current_namespace()

    def get_placement_group_id(self) -> Optional[str]:
        """The id (hex) of the placement group this task or actor runs in, else None."""
        from zray.util.placement_group import get_current_placement_group

        pg = get_current_placement_group()
        return pg.id.hex() if pg is not None else None

    @property
    def namespace(self) -> str:
        return _runtime.current_namespace()

    @property
    def job_id(self):
        return self.get_job_id()

    @property
    def node_id(self):
        return self.get_node_id()

    @property
    def task_id(self):
        return self.get_task_id()

    @property
    def actor_id(self):
        return self.get_actor_id()

    def get(self) -> dict:
        return {"job_id": self.get_job_id(), "node_id": self.get_node_id(),
                "task_id": self.get_task_id(), "actor_id": self.get_actor_id(),
                "namespace": self.get_namespace()}

    # ------------------------------------------------- the current task
    def get_assigned_resources(self) -> dict:
        """The resources the current task holds, or those the current actor holds for its
        life (an actor without num_cpus holds no CPU while it runs, as in Ray)."""
        if _executor() is None:
            raise RuntimeError(_WORKER_ONLY)
        actor_spec = _actor_spec()
        if actor_spec is not None:
            return P.from_units(actor_spec.options.get("hold") or {})
        spec = _spec()
        return P.from_units(spec.resources) if spec is not None else {}

    def get_accelerator_ids(self) -> dict:
        """Accelerator ids by kind, as strings; zray knows GPUs only."""
        return {"GPU": [str(g) for g in get_gpu_ids()]}

    def get_task_name(self) -> Optional[str]:
        """The task's name (``.options(name=...)`` or the function's); ``Class.method`` for
        actor calls, ``Class.__init__`` (``name:Class.__init__`` for a named actor) for an
        actor's creation; None in a driver."""
        spec = _spec()
        if spec is None:
            return None
        if spec.kind != P.ACTOR_CREATE:
            return spec.name
        name = spec.options.get("name")
        return f"{name}:{spec.name}.__init__" if name else f"{spec.name}.__init__"

    def get_task_function_name(self) -> Optional[str]:
        """``module.qualname`` of the function (or ``module.Class.method``) that runs."""
        ex, spec = _executor(), _spec()
        if spec is None:
            return None
        if spec.kind == P.TASK:
            fn = ex.fns.get(spec.fid)
            return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', spec.name)}"
        actor_spec = _actor_spec()
        cls = _user_class(ex.fns.get(actor_spec.fid)) if actor_spec is not None else None
        method = spec.fid if spec.kind == P.ACTOR_CALL else "__init__"
        if not isinstance(cls, type):
            return f"{spec.name}.{method}"
        return f"{cls.__module__}.{cls.__qualname__}.{method}"

    def is_canceled(self) -> bool:
        """True once zray.cancel() asked to cancel the task or actor call that runs now
        (a sync actor method can poll this and return early). Always False in a call of
        a threaded actor: the executor does not know which call a thread runs."""
        ex = _executor()
        if ex is None:
            raise RuntimeError(_WORKER_ONLY)
        task_id = self._client().current_task_id
        mode = _actor_mode(ex)
        if mode == "threaded":
            return False
        if mode == "async":  # which call is this? the one whose asyncio task runs
            try:
                current = asyncio.current_task()
            except RuntimeError:
                current = None
            task_id = next((tid for tid, t in list(ex.actor.async_tasks.items())
                            if t is current), b"")
        return bool(task_id) and task_id in ex.cancelled

    @property
    def runtime_env(self):
        """The runtime_env of the current job, task or actor, as a RuntimeEnv (packages
        appear as ``pkg_<sha256>.zip``, as Ray shows its URIs)."""
        from zray.runtime_env import RuntimeEnv

        return RuntimeEnv._view(json.loads(self.get_runtime_env_string()))

    def get_runtime_env_string(self) -> str:
        """The runtime_env of the current job, task or actor as a JSON string."""
        spec = _actor_spec() or _spec()
        if spec is None:
            return json.dumps(_runtime.job_runtime_env or {}, default=repr)
        from zray._renv import user_view

        out = user_view(spec.options.get("renv"))
        env = spec.options.get("env_vars")
        if env:
            out["env_vars"] = env
        return json.dumps(out)

    def get_node_labels(self) -> dict:
        """The labels of this process's node ({} for a driver on no node)."""
        client = self._client()
        if not client.node_id:
            return {}
        want = client.node_id.hex()
        for n in client.request("nodes"):
            if n["NodeID"] == want:
                return dict(n.get("Labels") or {})
        return {}

    # ------------------------------------------------- the current actor
    def get_actor_name(self) -> Optional[str]:
        """The current actor's name ("" if it has none); None outside an actor."""
        spec = _actor_spec()
        if spec is None:
            return None
        return str(spec.options.get("name") or "")

    @property
    def current_actor(self) -> Any:
        """The handle of the actor this code runs in."""
        ex = _executor()
        client = _runtime.client
        if ex is None or client is None or not client.current_actor_id:
            raise RuntimeError("This method is only available in an actor.")
        from zray.actor import current_actor_handle

        return current_actor_handle(client.current_actor_id, ex)

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """True in an actor that was restarted after its process died (max_restarts)."""
        ex = _executor()
        client = _runtime.client
        if ex is None or client is None or not client.current_actor_id:
            return False
        actor_id = client.current_actor_id
        cached = _reconstructed.get(actor_id)
        if cached is None:
            # A restart runs the creation again in a new process: the count cannot
            # change while this process lives, so one question to the broker is enough.
            state = client.request("actor_state", {"actor_id": actor_id})
            cached = _reconstructed[actor_id] = bool(state and state.get("restarts", 0) > 0)
        return cached


def get_runtime_context() -> RuntimeContext:
    """Ids of the current job, node, task and actor, and what the current task was given."""
    return RuntimeContext()
