"""Ray's classic DAG API: build a graph of tasks and actor calls with ``.bind()``, run
it with ``dag.execute(*args)``.

::

    with InputNode() as inp:                     InputNode          the execute() arguments
        a = Actor.bind(10)                       ClassNode          Actor.remote(10)
        x = f.bind(inp[0], k=inp.k)              FunctionNode       f.remote(args[0], k=kw["k"])
        y = a.method.bind(x)                     ClassMethodNode    actor.method.remote(ref of x)
        dag = MultiOutputNode([x, y])            MultiOutputNode    [ref of x, ref of y]
    dag.execute(1, k=2)  ->  [ObjectRef, ObjectRef]

Binding submits nothing: a node only records what to call and with which arguments
(values, other nodes, or parts of the input). ``execute`` walks the graph from the
node it is called on, submitting each node once per execution (a node two others
depend on runs once, and both get its ObjectRef; a ClassNode makes one actor per
execution, shared by its methods' calls). Upstream results are passed as ObjectRefs,
so the tasks wait for each other in the cluster, not in the driver; nodes nested in
lists, tuples and dicts of arguments become ObjectRefs there, as Ray passes them.

The input: ``inp`` itself is the one positional argument of ``execute``; ``inp[i]`` /
``inp.name`` / ``inp["key"]`` are, with exactly one positional argument and no
keywords, an item or attribute of that argument, otherwise positional argument ``i``
or keyword argument ``name``. Where Ray would hand a task its internal input holder
(``inp`` with no or several arguments) zray raises ``ValueError`` instead.
"""

from __future__ import annotations

__all__ = ["DAGNode", "InputNode", "InputAttributeNode", "FunctionNode", "ClassNode",
           "ClassMethodNode", "MultiOutputNode"]


class _Execution:
    """One ``execute`` call: its arguments and the result of every node run so far."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args = args
        self.kwargs = kwargs
        self.results: dict = {}  # id(node) -> what it gave (ref, handle, list)


class DAGNode:
    """A node of a DAG: a call recorded with ``.bind()``, not yet made."""

    def __init__(self, args: tuple = (), kwargs: dict | None = None, options: dict | None = None):
        self._bound_args = tuple(args)
        self._bound_kwargs = dict(kwargs or {})
        self._bound_options = dict(options or {})

    def get_args(self) -> tuple:
        """The bound positional arguments (values and nodes)."""
        return self._bound_args

    def get_kwargs(self) -> dict:
        """The bound keyword arguments (values and nodes)."""
        return dict(self._bound_kwargs)

    def get_options(self) -> dict:
        """The options the call will be made with."""
        return dict(self._bound_options)

    def execute(self, *args, **kwargs):
        """Run the DAG that ends at this node with these input arguments; returns this
        node's result (an ObjectRef, an actor handle, or a list for MultiOutputNode)."""
        inputs = {id(n): n for n in self._walk() if isinstance(n, InputNode)}
        if len(inputs) > 1:
            raise ValueError(f"a DAG may have only one InputNode; this one has {len(inputs)}")
        if not inputs and (args or kwargs):
            raise ValueError("this DAG has no InputNode, so execute() takes no arguments; "
                             f"got {len(args)} positional and {len(kwargs)} keyword")
        return self._run(_Execution(args, kwargs))

    def _children(self) -> list:
        out: list = []
        _collect_nodes(self._bound_args, out)
        _collect_nodes(self._bound_kwargs, out)
        return out

    def _walk(self) -> list:
        """Every node this one depends on, itself included (each once)."""
        seen: dict = {}
        stack = [self]
        while stack:
            node = stack.pop()
            if id(node) not in seen:
                seen[id(node)] = node
                stack.extend(node._children())
        return list(seen.values())

    def _run(self, run: _Execution):
        key = id(self)
        if key not in run.results:
            args = _resolve(self._bound_args, run)
            kwargs = _resolve(self._bound_kwargs, run)
            run.results[key] = self._execute_impl(args, kwargs, run)
        return run.results[key]

    def _execute_impl(self, args: tuple, kwargs: dict, run: _Execution):
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"({type(self).__name__})(args={list(self._bound_args)!r}, "
                f"kwargs={self._bound_kwargs!r}, options={self._bound_options!r})")


def _collect_nodes(value, out: list) -> None:
    if isinstance(value, DAGNode):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_nodes(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _collect_nodes(v, out)


def _resolve(value, run: _Execution):
    """``value`` with every node in it replaced by that node's result."""
    if isinstance(value, DAGNode):
        return value._run(run)
    if isinstance(value, list):
        return [_resolve(v, run) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, run) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, run) for k, v in value.items()}
    return value


class FunctionNode(DAGNode):
    """A task: ``remote_function.bind(*args, **kwargs)``."""

    def __init__(self, remote_function, args: tuple, kwargs: dict, options: dict | None = None):
        super().__init__(args, kwargs, options)
        self._remote_function = remote_function

    def _execute_impl(self, args, kwargs, run):
        fn = self._remote_function
        if self._bound_options:
            fn = fn.options(**self._bound_options)
        return fn.remote(*args, **kwargs)

    def options(self, **options) -> "FunctionNode":
        """The same call with these task options (checked now, as ``.options`` does)."""
        self._remote_function.options(**options)  # validates them (f.options(..): too)
        return FunctionNode(self._remote_function, self._bound_args, self._bound_kwargs,
                            {**self._bound_options, **options})


class ClassNode(DAGNode):
    """An actor: ``ActorClass.bind(*args, **kwargs)``; ``node.method.bind(...)`` calls
    one of its methods. One actor is made per execution."""

    def __init__(self, actor_class, args: tuple, kwargs: dict, options: dict | None = None):
        super().__init__(args, kwargs, options)
        self._actor_class = actor_class

    def _execute_impl(self, args, kwargs, run):
        cls = self._actor_class
        if self._bound_options:
            cls = cls.options(**self._bound_options)
        return cls.remote(*args, **kwargs)

    def options(self, **options) -> "ClassNode":
        """The same actor with these actor options (checked now)."""
        if not hasattr(self._actor_class, "options"):
            raise TypeError("this ClassNode was bound from Actor.options(...): give all the "
                            "options there, before .bind()")
        self._actor_class.options(**options)  # validates them
        return ClassNode(self._actor_class, self._bound_args, self._bound_kwargs,
                         {**self._bound_options, **options})

    def __getattr__(self, name: str) -> "_UnboundMethod":
        if name.startswith("_"):
            raise AttributeError(name)
        return _UnboundMethod(self, name, {})


class _UnboundMethod:
    """``class_node.method``: what ``.bind()`` turns into a ClassMethodNode."""

    def __init__(self, parent: ClassNode, name: str, options: dict):
        self._parent, self._name, self._options = parent, name, options

    def options(self, **options) -> "_UnboundMethod":
        return _UnboundMethod(self._parent, self._name, {**self._options, **options})

    def bind(self, *args, **kwargs) -> "ClassMethodNode":
        return ClassMethodNode(self._parent, self._name, args, kwargs, self._options)


class ClassMethodNode(DAGNode):
    """An actor method call: ``class_node.method.bind(...)`` (the actor the ClassNode
    makes) or ``handle.method.bind(...)`` (an actor that already exists)."""

    def __init__(self, actor, method_name: str, args: tuple, kwargs: dict,
                 options: dict | None = None, method=None):
        super().__init__(args, kwargs, options)
        self._actor = actor  # a ClassNode or an ActorHandle
        self._method_name = method_name
        self._method = method  # handle.method.bind: that ActorMethod, options and all

    def _children(self) -> list:
        out = super()._children()
        if isinstance(self._actor, DAGNode):
            out.append(self._actor)
        return out

    def _execute_impl(self, args, kwargs, run):
        if self._method is not None:
            return self._method.remote(*args, **kwargs)
        handle = self._actor._run(run) if isinstance(self._actor, DAGNode) else self._actor
        method = getattr(handle, self._method_name)
        if self._bound_options:
            method = method.options(**self._bound_options)
        return method.remote(*args, **kwargs)


class InputNode(DAGNode):
    """The arguments ``execute`` is given. Use it as a context manager while building
    the DAG (``with InputNode() as inp:``); index or take attributes of it for parts."""

    def __init__(self, *args, **kwargs):
        if args or kwargs:
            raise TypeError("InputNode() takes no arguments")
        super().__init__()

    def __enter__(self) -> "InputNode":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __getattr__(self, name: str) -> "InputAttributeNode":
        if name.startswith("_"):
            raise AttributeError(name)
        return InputAttributeNode(self, name, "__getattr__")

    def __getitem__(self, key) -> "InputAttributeNode":
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise TypeError(f"InputNode can be indexed by an int or a str, got {key!r}")
        return InputAttributeNode(self, key, "__getitem__")

    def _execute_impl(self, args, kwargs, run):
        if len(run.args) == 1 and not run.kwargs:
            return run.args[0]
        raise ValueError(
            "the InputNode itself stands for the one positional argument of execute(), "
            f"which got {len(run.args)} positional and {len(run.kwargs)} keyword arguments; "
            "use inp[i] or inp.name to pass them separately")


class InputAttributeNode(DAGNode):
    """A part of the input: ``inp[i]``, ``inp["key"]`` or ``inp.name``."""

    def __init__(self, input_node: InputNode, key, accessor: str):
        super().__init__()
        self._input = input_node
        self._key = key
        self._accessor = accessor

    def _children(self) -> list:
        return [self._input]

    def _execute_impl(self, args, kwargs, run):
        if len(run.args) == 1 and not run.kwargs:  # parts of the single argument
            value = run.args[0]
            if self._accessor == "__getattr__":
                return getattr(value, self._key)
            return value[self._key]
        if isinstance(self._key, int):
            if not -len(run.args) <= self._key < len(run.args):
                raise ValueError(f"the DAG reads positional argument {self._key} of "
                                 f"execute(), which got {len(run.args)}")
            return run.args[self._key]
        if self._key not in run.kwargs:
            raise ValueError(f"the DAG reads keyword argument {self._key!r} of execute(), "
                             f"which got {sorted(run.kwargs)}")
        return run.kwargs[self._key]

    def __repr__(self) -> str:
        where = f".{self._key}" if self._accessor == "__getattr__" else f"[{self._key!r}]"
        return f"(InputAttributeNode)(input{where})"


class MultiOutputNode(DAGNode):
    """Several outputs: ``execute`` returns the list of their results."""

    def __init__(self, outputs: list):
        if not isinstance(outputs, (list, tuple)):
            raise TypeError(f"MultiOutputNode takes a list of nodes, got {type(outputs).__name__}")
        bad = [o for o in outputs if not isinstance(o, DAGNode)]
        if bad:
            raise TypeError(f"MultiOutputNode takes DAG nodes, got {bad[0]!r}")
        super().__init__((list(outputs),))

    def _execute_impl(self, args, kwargs, run):
        return list(args[0])


def bind_function(remote_function, args: tuple, kwargs: dict) -> FunctionNode:
    """``f.bind`` / ``f.options(...).bind``: a FunctionNode."""
    return FunctionNode(remote_function, args, kwargs)


def bind_class(actor_class, args: tuple, kwargs: dict) -> ClassNode:
    """``Actor.bind`` / ``Actor.options(...).bind``: a ClassNode."""
    return ClassNode(actor_class, args, kwargs)


def bind_method(method, args: tuple, kwargs: dict) -> ClassMethodNode:
    """``handle.method.bind`` (``method`` an ActorMethod, options and all): a
    ClassMethodNode on an actor that exists already."""
    return ClassMethodNode(method._handle, method._name, args, kwargs, method=method)

