"""The public driver API: init/shutdown, remote, get/put/wait/cancel, actors, cluster info."""

from __future__ import annotations

import atexit
import inspect
import logging
import operator
import os
import time
from typing import Any, Optional, Sequence

from zray import _procutil, _runtime, exceptions
from zray import _protocol as P
from zray._client import _READY as _READY_STATES
from zray._refs import _NIL_OID, ObjectRef, ObjectRefGenerator, check_session
from zray.runtime_context import RuntimeContext, get_gpu_ids, get_runtime_context  # noqa: F401

log = logging.getLogger("zray")

_RAY_INIT_KWARGS = {
    "include_dashboard", "dashboard_host", "dashboard_port", "logging_level", "logging_format",
    "log_to_driver", "configure_logging", "local_mode", "_temp_dir", "_system_config",
    "object_store_memory", "_memory", "labels", "job_config", "storage", "_node_ip_address",
    "_plasma_directory", "enable_resource_isolation", "runtime_env", "namespace",
    "ignore_reinit_error", "num_cpus", "num_gpus", "resources", "address", "_redis_password",
    "_metrics_export_port", "dashboard_agent_listen_port", "logging_config", "_enable_object_reconstruction",
}


class RayContext(dict):
    """What init() returns: address information, usable as a dict or a context manager."""

    def __init__(self, address: str, session_dir: str, node_id: str):
        super().__init__(address=address, session_dir=session_dir, node_id=node_id,
                         dashboard_url=None)
        self.address_info = dict(self)
        self.dashboard_url = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutdown()

    def disconnect(self):
        shutdown()


def _resolve_address(address: Optional[str], temp_dir: Optional[str] = None) -> Optional[str]:
    if address in (None, "", "local"):
        env = os.environ.get("ZRAY_ADDRESS") if address is None else None
        return env or None
    if address == "auto":
        env = os.environ.get("ZRAY_ADDRESS")
        if env:
            return env
        # Only trusted from a private dir: a planted address would hand our tasks
        # (and our process, through the replies we unpickle) to someone else's broker.
        base = (os.path.join(temp_dir, f"zray-{os.getuid()}") if temp_dir
                else _procutil.user_tmp_dir())
        path = os.path.join(_procutil.private_dir(base), "address")
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            raise ConnectionError("address='auto' but no running zray cluster was found "
                                  "(no ZRAY_ADDRESS and no address file from `zray broker`)") from None
    if address.startswith("ray://"):
        address = "tcp://" + address[len("ray://"):]
    if "://" not in address:
        address = "tcp://" + address
    return address


_SOCKET_PATH_MAX = 107  # bytes in a unix socket path (the broker's ipc:// socket)
_SESSION_NAME_LEN = 64  # "/zray-UID/session_YYYYmmdd-HHMMSS_xxxxxxxx/broker.sock", a margin


def _logging_level(level) -> int:
    """init(logging_level=...): a level number or name, as Ray takes it."""
    if isinstance(level, bool) or not isinstance(level, (int, str)):
        raise ValueError(f"logging_level must be a logging level (int or name such as "
                         f"'info'), got {level!r}")
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ValueError(f"logging_level: unknown level {level!r}")
        return number
    return level


def _set_logging_level(level: int) -> None:
    """Set the level of zray's loggers in this process, with a stderr handler of their own
    (Python's last-resort handler would drop everything below WARNING)."""
    logger = logging.getLogger("zray")
    logger.setLevel(level)
    if not any(getattr(h, "_zray", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
        handler._zray = True
        logger.addHandler(handler)
        logger.propagate = False


# init() options of Ray that zray does not carry out: accepted only at Ray's default
# value (so code that spells the default out runs); anything else is refused by name.
_INIT_DEFAULT_ONLY = {
    "logging_format": (None,), "configure_logging": (True, None), "logging_config": (None,),
    "_system_config": (None, {}), "storage": (None,), "_node_ip_address": (None,),
    "_plasma_directory": (None,), "enable_resource_isolation": (False, None),
    "_redis_password": (None, "5241590000000000"), "_metrics_export_port": (None,),
    "dashboard_agent_listen_port": (None,), "_enable_object_reconstruction": (False, None),
    "job_config": (None,),
}


def _check_init_options(kwargs: dict, local: bool) -> None:
    """Refuse the init() options zray cannot honour, naming them (never ignore one)."""
    for name, defaults in _INIT_DEFAULT_ONLY.items():
        if name in kwargs and not any(kwargs[name] == d for d in defaults):
            raise ValueError(f"init({name}={kwargs[name]!r}) is not supported by zray; "
                             f"leave {name} out")
    if kwargs.get("local_mode"):
        raise RuntimeError("`local_mode` is no longer supported (as in Ray). For debugging, "
                           "run the function directly, or use a 1-CPU local cluster.")
    from zray.dashboard.embedded import check_dashboard_options

    check_dashboard_options(kwargs, local)
    ltd = kwargs.get("log_to_driver")
    if ltd is not None and not isinstance(ltd, bool):
        raise ValueError(f"log_to_driver must be a bool, got {ltd!r}")
    if kwargs.get("logging_level") is not None:
        _logging_level(kwargs["logging_level"])
    temp_dir = kwargs.get("_temp_dir")
    if temp_dir is not None:
        if not isinstance(temp_dir, str) or not os.path.isabs(temp_dir):
            raise ValueError(f"_temp_dir must be an absolute path, got {temp_dir!r}")
        if local and len(os.fsencode(temp_dir)) + _SESSION_NAME_LEN > _SOCKET_PATH_MAX:
            raise ValueError(f"_temp_dir {temp_dir!r} is too long: the cluster's socket path "
                             f"under it would pass the {_SOCKET_PATH_MAX}-byte limit of "
                             "unix sockets")
    if "labels" in kwargs:
        from zray._options import check_node_labels

        check_node_labels(kwargs["labels"])


def init(address: Optional[str] = None, *, num_cpus: Optional[float] = None,
         num_gpus: Optional[float] = None, resources: Optional[dict] = None,
         namespace: Optional[str] = None, runtime_env: Optional[dict] = None,
         ignore_reinit_error: bool = False, **kwargs) -> RayContext:
    """Connect to a cluster, or start an embedded local one when no address is given.

    Of Ray's other options: ``log_to_driver=False`` keeps remote output off this
    process's stdout/stderr; ``logging_level`` sets the level of zray's loggers here;
    ``_temp_dir`` (absolute) holds the local cluster's session directory (or, with
    ``address="auto"``, the address file of ``zray broker``); ``labels`` label the
    local node. ``local_mode=True`` raises as in Ray. ``include_dashboard=True`` starts
    the dashboard beside a local cluster (``dashboard_host``, ``dashboard_port``,
    ``$ZRAY_DASHBOARD_PORT``) without waiting for it; see zray/dashboard/embedded.py.
    """
    unknown = set(kwargs) - _RAY_INIT_KWARGS
    if unknown:
        raise TypeError(f"init() got unexpected keyword arguments {sorted(unknown)}")
    _check_init_options(kwargs, local=address in (None, "", "local")
                        and not (address is None and os.environ.get("ZRAY_ADDRESS")))
    if _runtime.worker_mode:
        return RayContext(_runtime.client.address, "", "")
    if _runtime.client is not None:
        if ignore_reinit_error:
            return _runtime.context
        raise RuntimeError("Maybe you called zray.init twice by accident? Call zray.shutdown() "
                           "first, or pass ignore_reinit_error=True.")
    if os.environ.get("ZRAY_JOB_RUNTIME_ENV"):
        # a job's driver (zray job submit): the job's runtime_env, under init's own
        import json

        job_env = json.loads(os.environ["ZRAY_JOB_RUNTIME_ENV"])
        both = sorted(set(job_env) & set(runtime_env or {}))
        if both:
            log.warning("runtime_env %s given both to the job and to init(): init's is used",
                        both)
        runtime_env = {**job_env, **(runtime_env or {})}
    if runtime_env:
        from zray._options import validate

        validate({"runtime_env": runtime_env}, {"runtime_env"}, "init")
    if kwargs.get("logging_level") is not None:
        _set_logging_level(_logging_level(kwargs["logging_level"]))
    temp_dir = kwargs.get("_temp_dir")
    resolved = _resolve_address(address, temp_dir)
    cluster = None
    if resolved is None:
        from zray._cluster import LocalCluster

        for key, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{key} must be a number >= 0, got {v!r}")
        cpus = os.cpu_count() or 1 if num_cpus is None else num_cpus
        if num_gpus is None:
            gpu_ids = _procutil.detect_gpus()
        else:
            detected = _procutil.detect_gpus()
            gpu_ids = detected[:int(num_gpus)] if len(detected) >= num_gpus else [str(i) for i in range(int(num_gpus))]
        osm = kwargs.get("object_store_memory")
        if osm is not None and (not isinstance(osm, int) or osm <= 0):
            raise ValueError(f"object_store_memory must be a positive number of bytes, got {osm!r}")
        cluster = LocalCluster(cpus, gpu_ids, resources or {}, labels=kwargs.get("labels"),
                               memory=kwargs.get("_memory"), object_store_memory=osm,
                               temp_dir=temp_dir)
        resolved = cluster.address
    else:
        if num_cpus is not None or num_gpus is not None or resources:
            raise ValueError("When connecting to an existing cluster, num_cpus, num_gpus and "
                             "resources must not be given: they are set by `zray worker`.")
        if temp_dir is not None and address != "auto":
            raise ValueError("_temp_dir applies to a local cluster that init() starts (or to "
                             "find address='auto'), not when connecting to " + resolved)
        if kwargs.get("labels"):
            raise ValueError("When connecting to an existing cluster, labels must not be "
                             "given: they are set by `zray worker --labels`.")
    from zray._client import Client

    try:
        client = Client(resolved, kind="driver", connect_timeout=30 if cluster else 10,
                        node_id=cluster.node_id if cluster else b"")
    except Exception:
        if cluster is not None:
            cluster.stop()
        raise
    if cluster is not None:
        _wait_for_node(client, cluster)
    _runtime.client = client
    _runtime.cluster = cluster
    _runtime.namespace = namespace or ("anon-" + client.cid.hex()[:8])
    _runtime.job_runtime_env = dict(runtime_env or {})
    if runtime_env:  # the job's working_dir / py_modules are packed and uploaded now
        from zray import _renv_job

        try:
            _renv_job.start_job(runtime_env)
        except BaseException:
            shutdown()
            raise
    log_to_driver = kwargs.get("log_to_driver") is not False
    client.print_logs = log_to_driver
    # The job's namespace, for the tasks and actors of this job to find it; and whether
    # it wants its remote output.
    client.request("register_job", {"namespace": _runtime.namespace,
                                    "log_to_driver": log_to_driver,
                                    # a driver the job API started (list_jobs merges them)
                                    "submission_id": os.environ.get("RAY_JOB_SUBMISSION_ID")
                                    or os.environ.get("ZRAY_JOB_SUBMISSION_ID")})
    ctx = RayContext(resolved, client.info.get("session_dir", ""), "")
    if cluster is not None and kwargs.get("include_dashboard"):
        from zray.dashboard.embedded import start_dashboard

        ctx.dashboard_url = ctx["dashboard_url"] = start_dashboard(cluster, kwargs)
    _runtime.context = ctx
    if cluster is not None:
        log.info("Started a local zray instance at %s", resolved)
    return ctx


# Ray initialises on first use: the runtime calls init() when a task, get or put
# needs a client and none is connected (the runtime does not import this module).
_runtime.auto_init = init


def _wait_for_node(client, cluster, limit: float = 30.0) -> None:
    """Return once the embedded node has joined, so resources are visible at once (as in Ray)."""
    want = cluster.node_id.hex()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for n in client.request("nodes"):
            if n["NodeID"] == want:
                # The driver writes large puts into this node's store: learn its size.
                client.info["store_limit"] = n.get("StoreLimit", 0)
                return
        if not cluster.alive():
            break
        with client.cond:
            client.cond.wait(0.01)
    client.close()
    cluster.stop()
    raise RuntimeError(f"the local zray node did not start; see the logs in {cluster.session_dir}/logs")


def is_initialized() -> bool:
    """True once init() has connected this process to a cluster."""
    return _runtime.client is not None


def _drain(client, limit: float) -> None:
    """Give this job's unfinished tasks up to ``limit`` seconds to finish, so that
    a script that submits work and exits still gets its tasks' output (as Ray does):
    those the broker runs (``job_pending``) and the calls on our leases, which it never
    sees (zray/_lease.py)."""
    deadline = time.monotonic() + limit
    leases = client.leases
    try:
        while time.monotonic() < deadline:
            if not (leases is not None and leases.unanswered()):
                left = deadline - time.monotonic()
                if left <= 0 or not client.request("job_pending", timeout=left):
                    return
            with client.cond:
                client.cond.wait(0.02)
    except Exception:
        pass


def _shutdown_at_exit() -> None:
    if _runtime.client is not None and not _runtime.worker_mode:
        _drain(_runtime.client, float(os.environ.get("ZRAY_EXIT_DRAIN_S", "2")))
    shutdown()


def shutdown() -> None:
    """Disconnect; stop the embedded cluster if init() started one."""
    if _runtime.worker_mode:
        return
    client, cluster = _runtime.client, _runtime.cluster
    _runtime.client = None
    _runtime.cluster = None
    _runtime.job_renv = None
    from zray import _renv

    _renv.forget_uploads()
    if client is not None:
        try:
            client.send(P.encode(P.Exit()))
        except Exception:
            pass
        client.close()
    if cluster is not None:
        cluster.stop()


atexit.register(_shutdown_at_exit)


def _check_refs(refs, what: str):
    for r in refs:
        if not isinstance(r, ObjectRef):
            raise TypeError(f"{what} expects ObjectRefs, got {type(r).__name__}: {r!r}")
        if r.id == _NIL_OID:
            _nil_error(what)
    check_session(refs)


def _nil_error(what: str):
    raise ValueError(f"{what} was given ObjectRef.nil(), which refers to no object")


def get(object_refs, *, timeout: Optional[float] = None) -> Any:
    """Block until the value(s) are available and return them (a list for a list)."""
    if timeout is not None and timeout < 0:  # (for one ref too: it timed out at once)
        raise ValueError(f"get(): timeout must be >= 0 or None, got {timeout!r}")
    if isinstance(object_refs, ObjectRef):
        if object_refs.id == _NIL_OID:
            _nil_error("get()")
        check_session((object_refs,))  # a ref of a shut-down session: raise, never auto-init
        return _runtime.require_client().get_values([object_refs], timeout)[0]
    if isinstance(object_refs, ObjectRefGenerator):
        object_refs = list(object_refs)
    if not isinstance(object_refs, (list, tuple)):
        raise ValueError(f"'object_refs' must either be an ObjectRef or a list of ObjectRefs, "
                         f"got {type(object_refs).__name__}")
    _check_refs(object_refs, "get()")
    return _runtime.require_client().get_values(list(object_refs), timeout)


def put(value: Any, *, _owner=None) -> ObjectRef:
    """Store ``value`` in the cluster and return a reference to it."""
    if isinstance(value, ObjectRef):
        raise TypeError("Calling 'put' on an ObjectRef is not allowed. If you really want to "
                        "do this, you can wrap the ObjectRef in a list and call 'put' on it.")
    if _owner is not None:
        raise ValueError("put(_owner=...) is not supported by zray: the calling process "
                         "owns what it puts")
    client = _runtime.require_client()
    return client.put(value, ObjectRef)


def wait(object_refs: Sequence[ObjectRef | ObjectRefGenerator], *, num_returns: int = 1,
         timeout: Optional[float] = None, fetch_local: bool = True):
    """Return (ready, not_ready) once ``num_returns`` refs are ready or ``timeout`` passes.

    A generator (ObjectRefGenerator) counts as ready when ``next()`` on it would not
    wait: its next item is ready, or it has ended."""
    if isinstance(object_refs, (ObjectRef, ObjectRefGenerator)) or not isinstance(
            object_refs, (list, tuple)):
        raise TypeError(f"wait() expected a list of ObjectRef or ObjectRefGenerator, got "
                        f"{type(object_refs).__name__}")
    with_generators = False
    if set(map(type, object_refs)) - _PLAIN:  # the usual list of refs: C-level passes only
        for r in object_refs:
            if not isinstance(r, ObjectRef):
                if not isinstance(r, ObjectRefGenerator):
                    raise TypeError(f"wait() expects ObjectRefs or ObjectRefGenerators, got "
                                    f"{type(r).__name__}: {r!r}")
                with_generators = True
    if with_generators:
        ids = set(object_refs)
        plain = [r for r in object_refs if isinstance(r, ObjectRef)]
        nil = any(r.id == _NIL_OID for r in plain)
    else:
        ids = set(map(_ref_id, object_refs))
        plain = object_refs
        nil = _NIL_OID in ids
    if len(ids) != len(object_refs):
        raise ValueError("Wait requires a list of unique object refs.")
    if not isinstance(num_returns, int) or num_returns < 0:
        raise ValueError(f"Invalid number of objects to return {num_returns}.")
    if num_returns > len(object_refs):
        raise ValueError("num_returns cannot be greater than the number of objects provided.")
    if timeout is not None and timeout < 0:
        raise ValueError(f"The 'timeout' argument must be >= 0, got {timeout}")
    if nil:
        _nil_error("wait()")
    # A ref of a shut-down session: raise, never auto-init (checked once per connection).
    current = _runtime.client
    if set(map(_ref_client, plain)) - {current, None}:
        check_session(plain)
    client = _runtime.require_client()
    refs = list(object_refs)
    if with_generators:
        return _wait_with_generators(client, refs, num_returns, timeout)
    # Enough refs ready already (the usual case of a loop of wait(not_ready)): stop at
    # the num_returns-th, in order, without waiting or scanning the rest.
    records, ready = client.records, []
    for i, r in enumerate(refs):
        rec = records.get(r.id)
        if rec is not None and rec.state in _READY_STATES:
            ready.append(r)
            if len(ready) == num_returns:
                picked = set(map(id, ready))
                return ready, [x for x in refs[:i] if id(x) not in picked] + refs[i + 1:]
    if num_returns == 0:
        return [], refs
    try:
        client.wait_objects(refs, num_returns, timeout, fetch=False)
    except exceptions.GetTimeoutError:
        pass
    ready, not_ready = [], []
    for r in refs:
        if len(ready) < num_returns and (rec := records.get(r.id)) is not None \
                and rec.state in _READY_STATES:  # (client.is_ready, inline)
            ready.append(r)
        else:
            not_ready.append(r)
    return ready, not_ready


_PLAIN = frozenset({ObjectRef})
_ref_id = operator.attrgetter("id")
_ref_client = operator.attrgetter("_client")


def _wait_with_generators(client, items: list, num_returns: int, timeout):
    """wait() over refs and generators (the slow path: generators are rare in wait)."""
    def is_ready(x) -> bool:
        return x._wait_ready() if type(x) is ObjectRefGenerator else client.is_ready(x.id)

    refs = [x for x in items if type(x) is not ObjectRefGenerator and not is_ready(x)]
    client.wait_for(lambda: sum(1 for x in items if is_ready(x)) >= num_returns, timeout,
                    subscribe=refs)
    ready, not_ready = [], []
    for x in items:
        if len(ready) < num_returns and is_ready(x):
            ready.append(x)
        else:
            not_ready.append(x)
    return ready, not_ready


def cancel(object_ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that produces ``object_ref`` (see Ray's ray.cancel)."""
    if isinstance(object_ref, ObjectRefGenerator):
        object_ref = object_ref.completed()
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(f"ray.cancel() only supported for object refs. For actors, try "
                        f"ray.kill(). Got: {type(object_ref).__name__}.")
    check_session((object_ref,))
    client = _runtime.require_client()
    if client.direct is not None and client.direct.cancel(object_ref.id, bool(force),
                                                          bool(recursive)):
        return  # a direct actor call: the executor hears it (zray/_direct.py)
    client.send(P.encode(P.Cancel(object_ref.id, bool(force), bool(recursive))))


def kill(actor, *, no_restart: bool = True) -> None:
    """Kill an actor's process; with no_restart=False it may be restarted."""
    from zray.actor import ActorHandle

    if not isinstance(actor, ActorHandle):
        raise ValueError(f"ray.kill() only supported for actors. For tasks, try ray.cancel(). "
                         f"Got: {type(actor).__name__}.")
    _runtime.require_client().request("kill_actor", {"actor_id": actor._actor_id,
                                                     "no_restart": no_restart})


def get_actor(name: str, namespace: Optional[str] = None):
    """The handle of the named actor; ValueError if there is none."""
    from zray.actor import _handle_from_meta

    if not isinstance(name, str) or not name:
        raise ValueError("Please supply a non-empty value to get_actor")
    client = _runtime.require_client()
    ns = namespace if namespace is not None else _runtime.current_namespace()
    info = client.request("get_actor", {"name": name, "namespace": ns})
    if info is None:
        raise ValueError(f"Failed to look up actor with name '{name}'. This could because 1. "
                         f"You are trying to look up a named actor you didn't create. 2. The "
                         f"named actor died. 3. You did not use a namespace matching the "
                         f"namespace of the actor.")
    return _handle_from_meta(info, client)


def remote(*args, **kwargs):
    """``@remote`` or ``@remote(**options)`` on a function or a class."""
    from zray._remote import RemoteFunction
    from zray.actor import ActorClass

    def make(obj, options):
        if inspect.isclass(obj):
            return ActorClass(obj, options)
        if callable(obj):
            return RemoteFunction(obj, options)
        raise TypeError("The @zray.remote decorator must be applied to either a function or a class.")

    if len(args) == 1 and not kwargs and callable(args[0]):
        return make(args[0], {})
    if args:
        raise TypeError("The @zray.remote decorator must be applied either with no arguments "
                        "and no parentheses, or with keyword arguments only.")
    from zray import _options

    _options.validate(kwargs, _options.TASK_OPTIONS | _options.ACTOR_OPTIONS, "@remote")
    return lambda obj: make(obj, kwargs)


def cluster_resources() -> dict:
    """Total resources of all alive nodes."""
    return _runtime.require_client().request("cluster_resources")


def available_resources() -> dict:
    """Resources not in use right now, summed over alive nodes."""
    return _runtime.require_client().request("available_resources")


def nodes() -> list:
    """One dict per node, with Ray's keys (NodeID, Alive, Resources, ...)."""
    return _runtime.require_client().request("nodes")


def memory_info(top: int = 10) -> dict:
    """Object store use per node (objects, bytes in memory and spilled) and the
    ``top`` largest objects with their owners, as a dict (`zray memory` prints it)."""
    return _runtime.require_client().request("memory", {"top": top})


_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


def memory_summary(address: Optional[str] = None, group_by: str = "NODE_ADDRESS",
                   sort_by: str = "OBJECT_SIZE", units: str = "B", line_wrap: bool = True,
                   stats_only: bool = False, num_entries: Optional[int] = None) -> str:
    """A text summary of object store use, as Ray's ``memory_summary`` returns: per node,
    then the largest objects (``num_entries`` of them, default 10). zray groups by node
    and sorts by size only; ``line_wrap`` is accepted and has no effect."""
    if group_by != "NODE_ADDRESS":
        raise ValueError(f"memory_summary: group_by={group_by!r} is not supported by zray "
                         f"(only 'NODE_ADDRESS')")
    if sort_by != "OBJECT_SIZE":
        raise ValueError(f"memory_summary: sort_by={sort_by!r} is not supported by zray "
                         f"(only 'OBJECT_SIZE')")
    if units not in _UNITS:
        raise ValueError(f"memory_summary: units must be one of {sorted(_UNITS)}, got {units!r}")
    if num_entries is not None and (not isinstance(num_entries, int) or num_entries < 0):
        raise ValueError(f"memory_summary: num_entries must be an int >= 0, got {num_entries!r}")
    top = 10 if num_entries is None else num_entries
    if address is None:
        info = memory_info(top)
    else:
        from zray._client import Client

        client = Client(_resolve_address(address), kind="cli", connect_timeout=10)
        try:
            info = client.request("memory", {"top": top})
            client.send(P.encode(P.Exit()))
        finally:
            client.close()
    return format_memory(info, units, stats_only)


def format_memory(m: dict, units: str = "MB", stats_only: bool = False) -> str:
    """The text of `zray memory` and memory_summary() for a memory_info() dict."""
    div = _UNITS[units]
    unit = units

    def amount(n: int) -> str:
        return f"{n / div:,.1f} {unit}" if div > 1 else f"{n:,} {unit}"

    nodes = m["nodes"]
    in_memory = sum(n["bytes_in_memory"] for n in nodes)
    limit = sum(n["store_limit"] for n in nodes)
    lines = []
    if not stats_only:
        lines.append("Object store use per node:")
        for n in nodes:
            lines.append(f"  {n['node_id']}  objects {n['objects']:>6}  in memory "
                         f"{amount(n['bytes_in_memory'])} / {amount(n['store_limit'])}  "
                         f"spilled {amount(n['bytes_spilled'])}")
        lines.append(f"Small objects held by the broker: {m['inline_objects']} "
                     f"({amount(m['inline_bytes'])})")
        lines.append("Largest objects:")
        for o in m["largest"]:
            lines.append(f"  {o['object_id']}  {amount(o['size'])}  owner {o['owner_kind']} "
                         f"pid={o['owner_pid']}  on "
                         f"{','.join(n[:8] for n in o['nodes']) or 'broker'}")
    pct = 100.0 * in_memory / limit if limit else 0.0
    lines.append(f"--- Aggregate object store stats across all nodes ---\n"
                 f"Object store memory used: {amount(in_memory)} of {amount(limit)} "
                 f"({pct:.1f}% full), spilled {amount(sum(n['bytes_spilled'] for n in nodes))}, "
                 f"{sum(n['objects'] for n in nodes)} objects in stores, "
                 f"{m['inline_objects']} held by the broker")
    return "\n".join(lines)


def timeline(filename: Optional[str] = None) -> Optional[list]:
    """Task execution as Chrome trace events (open the file in chrome://tracing or Perfetto).

    Built from the broker's bounded event log: one complete event (``"ph": "X"``) per
    task run that started and ended while in the log, on a row per node and lane (lanes
    are assigned here so that runs on one row never overlap; they are not executor
    processes). With ``filename`` the events are written there as a JSON list and None
    is returned; without it the list is returned."""
    if filename is not None and not isinstance(filename, (str, os.PathLike)):
        raise TypeError(f"timeline(filename): a path expected, got {type(filename).__name__}")
    events = _trace_events(_runtime.require_client().request("timeline"))
    if filename is None:
        return events
    import json

    with open(filename, "w") as f:
        json.dump(events, f)
    return None


def _trace_events(moves: list) -> list:
    """Chrome trace events from [[time, task_id, name, from, to, node_id], ...]."""
    started: dict = {}
    runs = []
    for t, task_id, name, _old, new, node_id in moves:
        if new == "running":
            started[task_id] = (t, node_id)
        elif task_id in started:
            t0, node = started.pop(task_id)
            runs.append((t0, t, task_id, name, node or node_id, new))
    runs.sort()
    lanes: dict = {}  # node -> [end time of the last run on each lane]
    out = []
    for t0, t1, task_id, name, node, outcome in runs:
        ends = lanes.setdefault(node, [])
        lane = next((i for i, end in enumerate(ends) if end <= t0), len(ends))
        if lane == len(ends):
            ends.append(t1)
        else:
            ends[lane] = t1
        ts, end = t0 * 1e6, t1 * 1e6  # microseconds
        out.append({"cat": "task", "name": name, "ph": "X",
                    "pid": f"node {node.hex()[:8]}" if node else "node ?",
                    "tid": f"lane {lane}", "ts": ts, "dur": end - ts,
                    "args": {"task_id": task_id.hex(), "outcome": outcome}})
    return out
