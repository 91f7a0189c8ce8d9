"""Validation of ``@remote`` / ``.options()`` arguments, and their wire form.

Every option a task, actor or method accepts is either carried out or refused
here with an error that names it (never accepted and ignored). What travels
in a spec's ``options`` (``wire_options``, ``method_wire_options``):

* tasks: ``max_retries``, ``retry_exceptions`` (True or a pickled tuple),
  ``max_calls`` (the executor process exits after that many calls of the
  function), ``strategy``, ``label_selector``, ``fallback_strategy``
  ([{"label_selector": ...}, ...]), ``env_vars``; ``renv``, the runtime
  environment a process must have to run it, merged over the job's or the running
  task's (zray/_renv.py);

``strategy`` is "SPREAD" or a dict: ``{"type": "node_affinity", "node_id", "soft"}``,
``{"type": "node_label", "hard", "soft"}`` (lists of [key, op, values]) or
``{"type": "placement_group", "pg_id", "bundle_index", "capture"}`` (also what the
deprecated ``placement_group=`` options mean, and what a child inherits from a
parent that captures child tasks: zray/util/placement_group.py);
* actor creations: the above that apply, plus what ``zray/actor.py`` adds
  (``concurrency_groups``, ``max_concurrency``, ...);
* actor calls: ``concurrency_group``, ``max_task_retries``, ``retry_exceptions``
  of the method, only where set (a plain call sends none); ``counted`` on a
  call to an actor with ``max_pending_calls`` (zray/actor.py).

``object_store_memory`` is refused for tasks and, as in Ray, accepted with a
DeprecationWarning for actors (it reserves nothing there either; nodes do
report their store size as the ``object_store_memory`` resource).

``accelerator_type`` becomes a resource ``accelerator_type:<name>`` of 0.001,
as in Ray: a node offers it when it has that accelerator (``zray worker``
detects NVIDIA GPUs' type, or ``--resources``).
"""

from __future__ import annotations

import re
import warnings

import cloudpickle

from zray import _protocol as P
from zray import _renv, _runtime

_COMMON = {
    "num_cpus", "num_gpus", "resources", "memory", "accelerator_type", "scheduling_strategy",
    "runtime_env", "name", "max_retries", "retry_exceptions", "placement_group",
    "placement_group_bundle_index", "placement_group_capture_child_tasks", "label_selector",
    "enable_task_events", "object_store_memory", "_labels", "fallback_strategy",
}
TASK_OPTIONS = _COMMON | {"num_returns", "max_calls", "_generator_backpressure_num_objects"}
ACTOR_OPTIONS = (_COMMON - {"max_retries", "retry_exceptions"}) | {
    "namespace", "lifetime", "get_if_exists", "max_concurrency", "max_restarts",
    "max_task_retries", "max_pending_calls", "concurrency_groups", "allow_out_of_order_execution",
}
METHOD_OPTIONS = {"num_returns", "concurrency_group", "max_task_retries", "retry_exceptions",
                  "name", "enable_task_events", "_generator_backpressure_num_objects"}
ACCELERATOR_PREFIX = "accelerator_type:"  # the resource a node with that accelerator offers

# Label syntax (Kubernetes', as Ray's): a name or value is up to 63 characters,
# alphanumeric at both ends, with - _ . inside; a key may have a DNS-subdomain prefix/.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_LABEL_RE = re.compile(_LABEL)
_PREFIX_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# A selector value: "v" (equals), "!v" (differs or absent), "in(a, b)", "!in(a, b)".
_SELECTOR_RE = re.compile(rf"!?(?:in\(\s*{_LABEL}(?:\s*,\s*{_LABEL})*\s*\)|{_LABEL})")
RESERVED_LABEL_PREFIX = "ray.io/"


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
            if k in ("CPU", "GPU", "memory", "object_store_memory"):
                opt = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(k, k)
                raise ValueError(f"Use the {opt} option instead of resources[{k!r}]")
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
        _renv.check(renv)
    nm = options.get("name")
    if nm is not None and not isinstance(nm, str):
        raise ValueError(f"name must be a str, got {nm!r}")
    for key in ("max_calls", "max_pending_calls"):
        v = options.get(key)
        if v is not None and (type(v) is not int or v < (0 if key == "max_calls" else -1)):
            low = "0" if key == "max_calls" else "-1"
            raise ValueError(f"{key} must be an int >= {low}, got {v!r}")
    rex = options.get("retry_exceptions")
    if rex is not None and not isinstance(rex, bool) and not (
            isinstance(rex, (list, tuple))
            and all(isinstance(c, type) and issubclass(c, Exception) for c in rex)):
        raise ValueError(f"retry_exceptions must be a bool or a list of exception classes, "
                         f"got {rex!r}")
    at = options.get("accelerator_type")
    if at is not None and (not isinstance(at, str) or not at):
        raise ValueError(f"accelerator_type must be a non-empty str, got {at!r}")
    check_label_selector(options.get("label_selector"))
    fb = options.get("fallback_strategy")
    if fb is not None:
        if not isinstance(fb, list):
            raise ValueError(f"fallback_strategy must be a list of dicts, got {type(fb).__name__}")
        for f in fb:
            if not isinstance(f, dict) or not f:
                raise ValueError("Each element in fallback_strategy must be a non-empty "
                                 "dictionary.")
            for key in f:
                if key != "label_selector":
                    raise ValueError(f"Unsupported option found in fallback_strategy: "
                                     f"{key!r}. Only ['label_selector'] is currently "
                                     "supported.")
            check_label_selector(f["label_selector"])
    groups = options.get("concurrency_groups")
    if groups is not None:
        if not isinstance(groups, dict):
            raise ValueError("concurrency_groups must be a dict of group name to its max "
                             f"concurrency, e.g. {{'io': 2}}; got {type(groups).__name__}")
        for name, n in groups.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"concurrency_groups: a group name must be a non-empty str, "
                                 f"got {name!r}")
            if type(n) is not int or n < 1:
                raise ValueError(f"concurrency_groups[{name!r}] must be an int >= 1, got {n!r}")
    cg = options.get("concurrency_group")
    if cg is not None and (not isinstance(cg, str) or not cg):
        raise ValueError(f"concurrency_group must be a non-empty str, got {cg!r}")
    strategy_to_wire(options.get("scheduling_strategy"))
    return options


def validate_task(options: dict, in_options: bool) -> dict:
    """Options of a remote function (``@remote`` when ``in_options`` is False, or
    ``.options()``), checked as Ray checks them."""
    validate(options, TASK_OPTIONS, "remote functions")
    if in_options and "max_calls" in options:
        raise ValueError("Setting 'max_calls' is not supported in '.options()': it belongs "
                         "to the function (set it in @remote).")
    if options.get("object_store_memory") is not None:
        raise ValueError("Setting 'object_store_memory' is not implemented for tasks "
                         "(it is an actor option)")
    return options


def validate_actor(options: dict, in_options: bool) -> dict:
    """Options of an actor class (``@remote`` or ``.options()``), checked as Ray checks them."""
    validate(options, ACTOR_OPTIONS, "actors")
    if in_options and "concurrency_groups" in options:
        raise ValueError("Setting 'concurrency_groups' is not supported in '.options()': "
                         "they belong to the class (set them in @remote).")
    if options.get("get_if_exists") and not options.get("name"):
        raise ValueError("The actor name must be specified to use `get_if_exists`.")
    if "object_store_memory" in options:
        # Ray 2.60 accepts it with this warning and reserves nothing: same here.
        warnings.warn("Setting 'object_store_memory' for actors is deprecated since it does "
                      "not reserve any object store memory (as in Ray); the object store "
                      "spills to disk when full.", DeprecationWarning, stacklevel=3)
    return options


def check_label_key(key, what: str = "label") -> None:
    """Raise ValueError unless ``key`` is a valid label key (``[prefix/]name``)."""
    if not isinstance(key, str):
        raise ValueError(f"{what} keys must be str, got {key!r}")
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _PREFIX_RE.fullmatch(prefix)):
        raise ValueError(f"{what} key {key!r}: the prefix must be DNS labels joined by dots")
    if len(name) > 63 or not _LABEL_RE.fullmatch(name):
        raise ValueError(f"{what} key {key!r}: a name is 1-63 characters, alphanumeric at "
                         "both ends, with - _ . between")


def check_label_selector(selector) -> None:
    """Raise ValueError unless ``selector`` is None or {label key: selector value}."""
    if selector is None:
        return
    if not isinstance(selector, dict):
        raise ValueError(f"label_selector must be a dict of label key to value, got "
                         f"{type(selector).__name__}")
    for key, value in selector.items():
        check_label_key(key, "label_selector")
        if not isinstance(value, str) or (value and not _SELECTOR_RE.fullmatch(value)):
            raise ValueError(f"label_selector[{key!r}] = {value!r}: expected a label value, "
                             "'!value', 'in(a, b)' or '!in(a, b)'")


def check_node_labels(labels) -> dict:
    """A node's labels ({key: value}, as ``zray worker --labels`` or ``init(labels=)``
    give them), checked; keys starting with ``ray.io/`` are reserved."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ValueError(f"labels must be a dict of str to str, got {type(labels).__name__}")
    for key, value in labels.items():
        check_label_key(key, "labels")
        if key.startswith(RESERVED_LABEL_PREFIX):
            raise ValueError(f"labels key {key!r}: the prefix {RESERVED_LABEL_PREFIX!r} is "
                             "reserved for labels zray sets itself")
        if not isinstance(value, str) or (value and (
                len(value) > 63 or not _LABEL_RE.fullmatch(value))):
            raise ValueError(f"labels[{key!r}] = {value!r}: a value is up to 63 characters, "
                             "alphanumeric at both ends, with - _ . between")
    return dict(labels)


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
    at = options.get("accelerator_type")
    if at:
        res[ACCELERATOR_PREFIX + at] = 0.001
    return P.to_units(res)


def wire_options(options: dict, merged_env: dict | None) -> dict:
    out = {}
    mr = options.get("max_retries")
    out["max_retries"] = 3 if mr is None else mr
    rex = _retry_exceptions_wire(options.get("retry_exceptions"))
    if rex:
        out["retry_exceptions"] = rex
    mc = options.get("max_calls")
    if mc:
        out["max_calls"] = mc
    from zray.util.placement_group import strategy_from_options

    legacy = strategy_from_options(options)  # the deprecated placement_group= spelling
    strategy = strategy_to_wire(legacy or options.get("scheduling_strategy"))
    if strategy is not None:
        out["strategy"] = strategy
    if options.get("label_selector"):
        out["label_selector"] = dict(options["label_selector"])
    if options.get("fallback_strategy"):
        out["fallback_strategy"] = [{"label_selector": dict(f["label_selector"])}
                                    for f in options["fallback_strategy"]]
    env = dict(merged_env or {})
    env.update(((options.get("runtime_env") or {}).get("env_vars")) or {})
    if env:
        out["env_vars"] = env
    renv = options.get("runtime_env")
    parent = _runtime.job_renv
    if renv and set(renv) - {"env_vars"}:
        wire = _renv.to_wire(_renv.check(renv), parent, _runtime.client)
    else:
        wire = parent
    if wire:
        out["renv"] = wire
    return out


def _retry_exceptions_wire(rex):
    """True, a pickled tuple of exception classes, or None (nothing is retried)."""
    if not rex:
        return None
    return True if rex is True else cloudpickle.dumps(tuple(rex))


_NO_OPTS: dict = {}  # the options of a plain actor call (never mutated)


def method_wire_options(options: dict) -> dict:
    """What an actor call carries in its spec's options: its method's (or ``.options()``'s)
    concurrency group and retry settings, only where set."""
    out = {}
    if options.get("concurrency_group"):
        out["concurrency_group"] = options["concurrency_group"]
    if options.get("max_task_retries") is not None:
        out["max_task_retries"] = options["max_task_retries"]
    rex = _retry_exceptions_wire(options.get("retry_exceptions"))
    if rex:
        out["retry_exceptions"] = rex
    return out or _NO_OPTS
