"""Remote functions: ``@zray.remote`` on a function, ``.options()``, ``.remote()``.

A function is pickled once (cloudpickle), named by the hash of its bytes and
registered with the broker once per connection; each ``.remote()`` then sends
only a small spec plus its pickled arguments.
"""

from __future__ import annotations

import hashlib
import inspect

from zray import _lease, _options, _runtime, _sigcheck
from zray import _protocol as P
from zray._refs import ObjectRef, ObjectRefGenerator, check_session
from zray._serialization import _CollectRefs, dumps_function, serialize
from zray.util.placement_group import check_fits as pg_check_fits
from zray.util.placement_group import inherited_strategy as pg_inherited_strategy


class _Definition:
    """A pickled function or class, registered lazily with each client."""

    def __init__(self, obj):
        self.obj = obj
        self.blob = None
        self.fid = b""
        self.nested: list = []
        self.client = None

    def __getstate__(self):
        # Never pickle the live client (sockets) along with a captured function.
        return {"obj": self.obj, "blob": self.blob, "fid": self.fid, "nested": self.nested,
                "client": None}

    def ensure(self, client) -> bytes:
        if self.client is client:
            return self.fid
        if self.blob is None:
            with _CollectRefs() as nested:
                self.blob = dumps_function(self.obj)
            self.nested = nested
            self.fid = hashlib.blake2b(self.blob, digest_size=16).digest()
        client.send_fn(self.fid, self.nested, self.blob)
        self.client = client
        return self.fid


def _unserializable(args, kwargs, error: Exception) -> TypeError:
    """The TypeError for arguments that cannot be pickled, naming the first one that
    cannot (as Ray does), with pickle's own reason."""
    for where, value in [*enumerate(args or ()), *(kwargs or {}).items()]:
        try:
            serialize(value)
        except Exception:
            what = f"argument {where}" if type(where) is int else f"keyword argument {where!r}"
            return TypeError(f"Could not serialize the {what} ({type(value).__name__}: "
                             f"{repr(value)[:80]}) of this call: {error}")
    return TypeError(f"Could not serialize the arguments of this call: {error}")


def serialize_args(args: tuple, kwargs: dict, client):
    """(frames, deps, nested, keep): top-level ObjectRefs become deps resolved by the broker.

    Large arguments (numpy arrays passed by value) are written to the node's
    object store like a put, and the task gets them as dep ``-1``: they never
    pass through the broker. ``keep`` holds that object's ref until the task
    is submitted (the broker pins it from then on).
    """
    if not args and not kwargs:
        return [], [], [], None
    deps = []
    direct = getattr(client, "direct", None)
    unregistered = direct.unregistered if direct is not None else ()
    if args:
        args = list(args)
        for i, a in enumerate(args):
            if type(a) is ObjectRef:
                if a._client is not client:
                    check_session((a,))
                if a.id in unregistered:
                    direct.register(a.id)
                deps.append([i, a.id])
                args[i] = None
    if kwargs:
        kwargs = dict(kwargs)
        for k, v in kwargs.items():
            if type(v) is ObjectRef:
                if v._client is not client:
                    check_session((v,))
                if v.id in unregistered:
                    direct.register(v.id)
                deps.append([k, v.id])
                kwargs[k] = None
    try:
        frames, nested = serialize((args, kwargs))
    except Exception as e:
        raise _unserializable(args, kwargs, e) from e
    if client.store is not None and len(frames) > 1:
        oid = P.object_id(client.next_task_id(), 0)
        stored = client.store_frames(oid, P.VALUE, frames)
        if stored is not None:
            keep = ObjectRef(oid, client.cid, client)
            client.send(P.encode(P.Put(oid, P.VALUE, nested, *stored)))
            return [], [[-1, oid]] + deps, [], keep
    return frames, deps, nested, None


def make_spec(client, kind, fid, name, nret, resources, opts, deps, nested,
              actor_id=b"") -> P.TaskSpec:
    return P.TaskSpec(client.next_task_id(), kind, fid, name, nret, resources, deps, nested,
                      opts, actor_id, client.cid, client.driver_cid or client.cid, client.job_id,
                      client.current_task_id)


def return_refs(client, task_id: bytes, nret):
    if nret < 0:
        if nret == P.STREAMING:
            return ObjectRefGenerator(task_id, client.cid, client)
        nret = 1  # DYNAMIC: one ref, whose value is a DynamicObjectRefGenerator
    refs = client.task_returns(task_id, nret, ObjectRef)  # the broker pushes these to us
    if nret == 1:
        return refs[0]
    return refs if nret else None


def wire_num_returns(nr) -> int:
    """``num_returns`` as TaskSpec carries it: a count, STREAMING or DYNAMIC."""
    if nr == "streaming":
        return P.STREAMING
    if nr == "dynamic":
        return P.DYNAMIC
    return nr


def is_generator_function(fn) -> bool:
    """A generator (or async generator) function: it streams unless told otherwise
    (Ray's default since 2.8)."""
    return inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)


class _Prepared:
    """Options resolved to their wire form, cached per (function, options)."""

    __slots__ = ("nret", "resources", "opts", "inherit")

    def __init__(self, options: dict):
        self.nret = wire_num_returns(options.get("num_returns", 1))
        self.resources = _options.resource_units(options, 1)
        self.opts = _options.wire_options(options, _runtime.job_env_vars())
        # No strategy of its own: it joins a placement group that captures child tasks.
        self.inherit = "strategy" not in self.opts and options.get(
            "scheduling_strategy") is None and options.get("placement_group") in (None, "default")
        pg_check_fits(options, self.resources, "the task")


class RemoteFunction:
    """A function turned into a task template by ``@zray.remote``."""

    def __init__(self, fn, options: dict):
        self._function = fn
        options = _options.validate_task(dict(options), in_options=False)
        if options.get("num_gpus") and options.get("max_calls") is None:
            # As in Ray: a GPU function's process is replaced after each call, so that
            # GPU memory a library keeps is given back (max_calls=0 turns this off).
            options["max_calls"] = 1
        if "num_returns" not in options and is_generator_function(fn):
            options["num_returns"] = "streaming"
        self._options = options
        self._name = getattr(fn, "__qualname__", getattr(fn, "__name__", "task"))
        self._def = _Definition(fn)
        # its arguments are checked at .remote(), as in Ray (zray/_sigcheck.py)
        self._check = _sigcheck.checker(self._name, _sigcheck.params_of(fn))
        self._prepared = None
        self._prepared_for = None
        self._prepared_env = None
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", "task")
        self.__wrapped__ = fn

    def __reduce__(self):
        # A remote function captured by another one travels as its definition only.
        return (RemoteFunction, (self._function, self._options))

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Remote functions cannot be called directly. Instead of running "
                        f"'{self.__name__}()', try '{self.__name__}.remote()'.")

    def options(self, **options) -> "_BoundOptions":
        _options.validate_task(options, in_options=True)
        merged = dict(self._options)
        merged.update(options)
        return _BoundOptions(self, merged)

    def remote(self, *args, **kwargs):
        client = _runtime.require_client()
        prep = self._prepared
        # Recomputed for another client, or when the inherited runtime_env changed (an
        # executor sets the running task's as the one its children inherit).
        if (prep is None or self._prepared_for is not client
                or self._prepared_env is not _runtime.job_runtime_env):
            prep = self._prepared = _Prepared(self._options)
            self._prepared_for = client
            self._prepared_env = _runtime.job_runtime_env
        return self._submit(client, prep, self._options.get("name") or self._name, args, kwargs)

    def _submit(self, client, prep, name, args, kwargs):
        if self._check is not None:
            self._check(*args, **kwargs)
        fid = self._def.ensure(client)
        frames, deps, nested, _keep = serialize_args(args, kwargs, client)
        opts = prep.opts
        if prep.inherit and _runtime.executor is not None:
            inherited = pg_inherited_strategy()
            if inherited is not None:
                opts = {**opts, "strategy": inherited}
        spec = make_spec(client, P.TASK, fid, name, prep.nret, prep.resources,
                         opts, deps, nested)
        refs = return_refs(client, spec.task_id, prep.nret)
        leases = client.leases if client.leases is not None else _lease.for_client(client)
        if leases is not None and leases.submit(spec, frames, _keep):
            return refs  # on an executor leased to us (zray/_lease.py)
        client.send_submit(spec, frames)
        return refs

    def bind(self, *args, **kwargs):
        """A DAG node for this task (``zray.dag``); ``.execute()`` submits it."""
        from zray.dag import bind_function

        return bind_function(self, args, kwargs)


class _BoundOptions:
    def __init__(self, fn: RemoteFunction, options: dict):
        self._fn = fn
        self._options = options
        self._prep = None
        self._prep_for = None

    def remote(self, *args, **kwargs):
        client = _runtime.require_client()
        key = (client, _runtime.job_runtime_env)  # see RemoteFunction.remote
        if self._prep is None or self._prep_for is None or self._prep_for[0] is not key[0] \
                or self._prep_for[1] is not key[1]:
            self._prep = _Prepared(self._options)
            self._prep_for = key
        name = self._options.get("name") or self._fn._name
        return self._fn._submit(client, self._prep, name, args, kwargs)

    def options(self, **options):
        _options.validate_task(options, in_options=True)
        return _BoundOptions(self._fn, {**self._options, **options})

    def bind(self, *args, **kwargs):
        """A DAG node for this task with these options (``zray.dag``)."""
        from zray.dag import bind_function

        return bind_function(self, args, kwargs)
