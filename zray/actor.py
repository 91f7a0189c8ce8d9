"""Actors: ``@zray.remote`` on a class, handles, methods, ``@zray.method``, exit_actor."""

from __future__ import annotations

import inspect

import cloudpickle

from zray import _options, _runtime, _sigcheck, exceptions
from zray import _protocol as P
from zray._refs import ObjectRef
from zray._remote import (
    _Definition,
    is_generator_function,
    make_spec,
    return_refs,
    serialize_args,
    wire_num_returns,
)
from zray.exceptions import ActorAlreadyExistsError
from zray.util.placement_group import check_fits as pg_check_fits
from zray.util.placement_group import inherited_strategy as pg_inherited_strategy


def method(*args, **kwargs):
    """Decorate an actor method with options, e.g. ``@zray.method(num_returns=2)``."""
    def decorate(fn):
        _options.validate(kwargs, _options.METHOD_OPTIONS, "actor methods")
        fn.__zray_method_options__ = kwargs
        return fn

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    if args:
        raise ValueError("zray.method takes keyword arguments only, e.g. @zray.method(num_returns=2)")
    return decorate


class ActorExit(BaseException):
    """Raised by exit_actor(); the executor exits and the actor is not restarted."""


def exit_actor():
    """Terminate the current actor now (no restart); its pending calls fail with RayActorError."""
    if _runtime.executor is None or _runtime.executor.actor is None:
        raise TypeError("exit_actor() must be called from inside an actor method")
    raise ActorExit()


def _ray_ready(self):
    """Returns True once the actor is created: ``get(a.__ray_ready__.remote())`` waits for it."""
    return True


def _ray_terminate(self):
    """Exit the actor once the calls queued before this one are done; calls after it fail
    with ActorDiedError and the actor is not restarted."""
    exit_actor()


# Methods every actor has, as in Ray; the executor finds them on the class it instantiates.
_BUILTIN_METHODS = {"__ray_ready__": _ray_ready, "__ray_terminate__": _ray_terminate}


def _with_builtin_methods(cls):
    """The class an actor's process instantiates: a subclass of the user's class that adds
    ``_BUILTIN_METHODS`` (Ray does the same) and keeps its name and module."""
    ns = dict(_BUILTIN_METHODS, __module__=cls.__module__, __qualname__=cls.__qualname__,
              __doc__=cls.__doc__, __zray_user_class__=cls)
    try:
        return type(cls)(cls.__name__, (cls,), ns)
    except TypeError:  # a class that refuses subclasses: no built-in methods then
        return cls


def _takes_self(cls, name: str) -> bool:
    """Whether method ``name``, as ``getattr(cls, name)`` gives it, takes the instance
    first (a staticmethod does not; a classmethod comes bound to the class)."""
    raw = inspect.getattr_static(cls, name)
    return not isinstance(raw, (staticmethod, classmethod))


def _method_meta(cls) -> dict:
    meta = {}
    for name, fn in inspect.getmembers(cls, predicate=lambda m: inspect.isfunction(m) or inspect.ismethod(m)):
        opts = dict(getattr(fn, "__zray_method_options__", {}))
        if "num_returns" not in opts and is_generator_function(fn):
            opts["num_returns"] = "streaming"  # Ray's default for generator methods
        meta[name] = opts
    return meta


class ActorClass:
    """A class turned into an actor template by ``@zray.remote``."""

    def __init__(self, cls, options: dict):
        self._cls = cls
        self._options = _options.validate_actor(dict(options), in_options=False)
        self._def = _Definition(_with_builtin_methods(cls))
        self._meta_cache = None
        self._params_cache = None
        self.__name__ = cls.__name__
        self.__doc__ = cls.__doc__

    @property
    def _meta(self) -> dict:
        # Read on first use, not at construction: an actor class whose methods name the
        # class itself is rebuilt by cloudpickle as an empty class first, methods after.
        if self._meta_cache is None:
            self._meta_cache = _method_meta(self._cls)
        return self._meta_cache

    @property
    def _params(self) -> dict:
        """The constructor's and each method's parameters (zray/_sigcheck.py): what
        ``.remote()`` checks its arguments against, here and in every handle."""
        if self._params_cache is None:
            out = {name: _sigcheck.params_of(getattr(self._cls, name),
                                             drop_first=_takes_self(self._cls, name))
                   for name in self._meta}
            try:
                out["__init__"] = _sigcheck.params_of(self._cls)
            except Exception:
                out["__init__"] = None
            self._params_cache = out
        return self._params_cache

    def __reduce__(self):
        return (ActorClass, (self._cls, self._options))

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actors cannot be instantiated directly. Instead of "
                        f"'{self.__name__}()', use '{self.__name__}.remote()'.")

    def options(self, **options) -> "_ActorOptions":
        _options.validate_actor(options, in_options=True)
        return _ActorOptions(self, {**self._options, **options})

    def remote(self, *args, **kwargs) -> "ActorHandle":
        return self._create(args, kwargs, self._options)

    def _create(self, args, kwargs, options) -> "ActorHandle":
        params = self._params
        check = _sigcheck.checker(self.__name__ + ".__init__", params.get("__init__"))
        if check is not None:
            check(*args, **kwargs)
        client = _runtime.require_client()
        name = options.get("name")
        namespace = options.get("namespace") or _runtime.current_namespace()
        if name:
            if not isinstance(name, str):
                raise ValueError(f"actor name must be a str, got {name!r}")
            existing = client.request("get_actor", {"name": name, "namespace": namespace})
            if existing is not None:
                if options.get("get_if_exists"):
                    return _handle_from_meta(existing, client)
                raise ActorAlreadyExistsError(
                    f"Actor with name {name!r} already exists in namespace {namespace!r}; use "
                    f"a different name, or get_if_exists=True (or get_actor({name!r})) to get it.")
        groups = options.get("concurrency_groups") or {}
        methods = self._meta
        for mname, mopts in methods.items():
            cg = mopts.get("concurrency_group")
            if cg is not None and cg not in groups:
                raise ValueError(f"{self.__name__}.{mname} is in concurrency group {cg!r}, which "
                                 f"the actor does not define (concurrency_groups: "
                                 f"{sorted(groups) or 'none'})")
        fid = self._def.ensure(client)
        frames, deps, nested, _keep = serialize_args(args, kwargs, client)
        explicit = options.get("num_cpus")
        place = _options.resource_units(options, 1 if explicit is None else explicit)
        hold = _options.resource_units(options, 0 if explicit is None else explicit)
        opts = _options.wire_options(options, _runtime.job_env_vars())
        opts.pop("max_retries", None)
        pg_check_fits(options, place, self.__name__)
        if ("strategy" not in opts and options.get("scheduling_strategy") is None
                and options.get("placement_group") in (None, "default")):
            inherited = pg_inherited_strategy()  # a parent capturing child tasks
            if inherited is not None:
                opts["strategy"] = inherited
        opts["hold"] = hold
        for key in ("max_restarts", "max_task_retries", "max_concurrency", "lifetime"):
            if options.get(key) is not None:
                opts[key] = options[key]
        if groups:
            opts["concurrency_groups"] = dict(groups)
        if name:
            opts["name"] = name
        opts["namespace"] = namespace
        actor_id = client.next_task_id()
        config = _handle_config(options)
        config["params"] = {k: v for k, v in params.items() if k != "__init__" and v is not None}
        meta = {"actor_id": actor_id, "class_name": self.__name__, "methods": methods,
                "max_task_retries": options.get("max_task_retries") or 0, "config": config}
        opts["handle_meta"] = cloudpickle.dumps(meta)
        spec = make_spec(client, P.ACTOR_CREATE, fid, self.__name__, 0, place, opts,
                         deps, nested, actor_id)
        client.send_submit(spec, frames)
        # A non-detached actor lives while a handle to it does (anywhere: the handle's
        # ref is counted like an ObjectRef's) and while its creator lives.
        ref = None
        if options.get("lifetime") != "detached":
            ref = ObjectRef(P.object_id(actor_id, 0), client.cid, client)
        return ActorHandle(actor_id, self.__name__, methods, ref, config)

    def bind(self, *args, **kwargs):
        """A DAG node that makes this actor (``zray.dag``); bind its methods on it."""
        from zray.dag import bind_class

        return bind_class(self, args, kwargs)


class _ActorOptions:
    def __init__(self, cls: ActorClass, options: dict):
        self._cls = cls
        self._options = options

    def remote(self, *args, **kwargs) -> "ActorHandle":
        return self._cls._create(args, kwargs, self._options)

    def bind(self, *args, **kwargs):
        """A DAG node that makes this actor with these options (``zray.dag``)."""
        from zray.dag import bind_class

        return bind_class(self, args, kwargs)


def _handle_config(options: dict) -> dict:
    """What every handle of an actor checks at call time: ``max_pending_calls`` (when
    > 0) and the names of its concurrency groups."""
    config = {}
    if options.get("max_task_retries"):  # retries of direct calls (zray/_direct.py)
        config["max_task_retries"] = options["max_task_retries"]
    mpc = options.get("max_pending_calls")
    if mpc is not None and mpc > 0:
        config["max_pending_calls"] = mpc
    if options.get("concurrency_groups"):
        config["concurrency_groups"] = sorted(options["concurrency_groups"])
    return config


def _handle_from_meta(info: dict, client) -> "ActorHandle":
    meta = cloudpickle.loads(info["handle_meta"])
    ref = None
    if info.get("handle_owner"):  # not detached: this handle counts too
        ref = ObjectRef(P.object_id(meta["actor_id"], 0), info["handle_owner"], client,
                        _borrowed=True)
    return ActorHandle(meta["actor_id"], meta["class_name"], meta["methods"], ref,
                       meta.get("config"))


def current_actor_handle(actor_id: bytes, executor) -> "ActorHandle":
    """The handle of the actor hosted by ``executor`` (get_runtime_context().current_actor).
    It holds no reference (as Ray's is weak): an actor's own handle never keeps it alive."""
    cls = executor.fns.get(executor.actor_spec.fid)
    cls = getattr(cls, "__zray_user_class__", cls)
    return ActorHandle(actor_id, cls.__name__, _method_meta(cls))


def _rebuild_handle(actor_id, class_name, methods, ref=None, config=None):
    return ActorHandle(actor_id, class_name, methods, ref, config)


def _reserve_call(client, handle: "ActorHandle", name: str) -> None:
    """Count a call about to be submitted on an actor with ``max_pending_calls``; raise
    PendingCallsLimitExceeded if this process has that many calls on it unfinished.

    The count of calls sent since the broker last said how many are unfinished is kept
    here; only at the limit does the broker recount (one request, sent after our
    SUBMITs on the same socket, so it sees them all)."""
    limit = handle._max_pending
    counts = client.actor_calls
    actor_id = handle._actor_id
    n = counts.get(actor_id, 0)
    if n >= limit:
        n = client.request("pending_calls", {"actor_id": actor_id})
        if n >= limit:
            counts[actor_id] = n
            raise exceptions.PendingCallsLimitExceeded(
                f"The task {name} could not be submitted to {handle!r} because more than "
                f"{limit} tasks are queued on the actor. This limit can be adjusted with the "
                f"`max_pending_calls` actor option.")
    counts[actor_id] = n + 1


class ActorHandle:
    """A handle to an actor; pass it to tasks and other actors freely."""

    def __init__(self, actor_id: bytes, class_name: str, methods: dict, ref=None,
                 config: dict | None = None):
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = methods
        self._ref = ref  # keeps a non-detached actor alive (None: detached)
        self._config = config or {}  # see _handle_config
        self._max_pending = self._config.get("max_pending_calls", 0)
        self._max_task_retries = self._config.get("max_task_retries", 0)
        self._cache: dict = {}

    def __getattr__(self, name) -> "ActorMethod":
        if name.startswith("__") and name.endswith("__") and name not in _BUILTIN_METHODS:
            raise AttributeError(name)
        m = self._cache.get(name)
        if m is None:
            if name in self._methods:
                options = self._methods[name]
            elif name in _BUILTIN_METHODS:  # __ray_ready__, __ray_terminate__
                options = {}
            else:
                raise AttributeError(f"'{self._class_name}' actor has no method '{name}'")
            m = self._cache[name] = ActorMethod(None, name, options)
            m._qualname = f"{self._class_name}.{name}"
            m._check = _sigcheck.checker(m._qualname,
                                         (self._config.get("params") or {}).get(name))
        # A new bound method each time: caching one that points back at this handle
        # would make a cycle, and the handle (whose ref keeps the actor) would outlive
        # its last user until a GC pass.
        return m._bind(self)

    def __reduce__(self):
        # The ref travels with the handle: the receiver becomes a borrower of it.
        return (_rebuild_handle, (self._actor_id, self._class_name, self._methods, self._ref,
                                  self._config))

    def __repr__(self):
        return f"Actor({self._class_name}, {self._actor_id.hex()})"

    def __eq__(self, other):
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self):
        return hash(self._actor_id)

    @property
    def _ray_actor_id(self):
        return self._actor_id


class ActorMethod:
    def __init__(self, handle: ActorHandle, name: str, options: dict):
        self._handle = handle
        self._name = name
        self._options = options
        self._nret = wire_num_returns(options.get("num_returns", 1))
        self._opts = _options.method_wire_options(options)  # concurrency group, retries
        self._qualname = f"{handle._class_name}.{name}" if handle is not None else name
        self._check = None  # its arguments' check (zray/_sigcheck.py), set by the handle

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actor methods cannot be called directly. Instead of running "
                        f"'{self._name}()', try '{self._name}.remote()'.")

    def _bind(self, handle: ActorHandle) -> "ActorMethod":
        m = ActorMethod.__new__(ActorMethod)
        m._handle, m._name, m._options, m._nret = handle, self._name, self._options, self._nret
        m._opts, m._qualname, m._check = self._opts, self._qualname, self._check
        return m

    def options(self, **options) -> "ActorMethod":
        _options.validate(options, _options.METHOD_OPTIONS, "actor methods")
        cg = options.get("concurrency_group")
        if cg is not None:
            groups = self._handle._config.get("concurrency_groups") or []
            if cg not in groups:
                raise ValueError(f"concurrency_group={cg!r}: actor {self._handle._class_name} "
                                 f"has no such concurrency group (it has: {groups or 'none'})")
        m = ActorMethod(self._handle, self._name, {**self._options, **options})
        m._qualname = options.get("name") or self._qualname  # the call's name, as in Ray
        m._check = self._check
        return m

    def bind(self, *args, **kwargs):
        """A DAG node that calls this method of this actor (``zray.dag``)."""
        from zray.dag import bind_method

        return bind_method(self, args, kwargs)

    def remote(self, *args, **kwargs):
        if self._check is not None:
            self._check(*args, **kwargs)
        client = _runtime.require_client()
        handle = self._handle
        opts = self._opts
        if handle._max_pending:
            _reserve_call(client, handle, self._qualname)
            # The results go through the broker (never pushed straight to us), so that it
            # has counted the call finished before we can see it finished.
            opts = {**opts, "counted": True}
        frames, deps, nested, _keep = serialize_args(args, kwargs, client)
        spec = make_spec(client, P.ACTOR_CALL, self._name, self._qualname, self._nret,
                         {}, opts, deps, nested, handle._actor_id)
        refs = return_refs(client, spec.task_id, self._nret)
        direct = client.direct
        if direct is not None:  # straight to the actor's executor where it can (zray/_direct.py)
            direct.submit(spec, frames, (handle._ref, _keep, args, kwargs),
                          handle._max_task_retries)
        else:
            client.send_submit(spec, frames)
        return refs

