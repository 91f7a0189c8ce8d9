"""Ray's classic DAG API (``.bind()``, ``InputNode``, ``MultiOutputNode``,
``dag.execute()``) on a real local cluster: every node runs as a real task or actor call.

Runs on zray and, with ``ZRAY_TEST_BACKEND=ray``, on Ray 2.60 to check that the
semantics match (the tests of zray's clearer errors are zray-only, and say why).
"""

import importlib
import os

import pytest
from backend import BACKEND, local_cluster, pickle_by_value, ray

dag_api = importlib.import_module(BACKEND + ".dag")
InputNode, MultiOutputNode = dag_api.InputNode, dag_api.MultiOutputNode

pickle_by_value(__name__)

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


cluster = local_cluster(num_cpus=2)


@ray.remote
def echo(*args, **kwargs):
    return args, kwargs


@ray.remote
def add(a, b):
    return a + b


@ray.remote
def pid():
    return os.getpid()


@ray.remote
class Counter:
    def __init__(self, start=0):
        self.n = start
        self.calls = 0

    def add(self, x):
        self.calls += 1
        self.n += x
        return self.n

    def calls_and_pid(self, *_):
        return self.calls, os.getpid()


def test_chain_of_tasks(cluster):
    with InputNode() as inp:
        dag = add.bind(add.bind(inp, 1), 10)
    ref = dag.execute(5)
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=60) == 16
    assert ray.get(dag.execute(0), timeout=60) == 11  # a DAG runs again with new input


def test_input_parts(cluster):
    with InputNode() as inp:
        dag = echo.bind(inp[0], inp[1], z=inp.x)
    assert ray.get(dag.execute(1, 2, x=3), timeout=60) == ((1, 2), {"z": 3})
    with InputNode() as inp:
        attr = echo.bind(inp.x)
        item = echo.bind(inp["k"])
        index = echo.bind(inp[0])

    class HasX:
        x = 9

    assert ray.get(attr.execute(HasX()), timeout=60) == ((9,), {})  # attribute of the one arg
    assert ray.get(attr.execute(x=4), timeout=60) == ((4,), {})  # else a keyword argument
    assert ray.get(item.execute({"k": 7}), timeout=60) == ((7,), {})
    assert ray.get(item.execute(k=8), timeout=60) == ((8,), {})
    assert ray.get(index.execute([10, 11]), timeout=60) == ((10,), {})


def test_multi_output_and_shared_nodes(cluster):
    with InputNode() as inp:
        shared = add.bind(inp, 1)
        dag = MultiOutputNode([shared, add.bind(shared, 1), echo.bind(shared)])
    refs = dag.execute(1)
    assert isinstance(refs, list) and len(refs) == 3
    first, second, third = ray.get(refs, timeout=60)
    assert (first, second) == (2, 3)
    assert third == ((2,), {})  # an upstream node's result arrives as a value


def test_nodes_nested_in_arguments_arrive_as_refs(cluster):
    dag = echo.bind(1, [add.bind(1, 1)], {"a": add.bind(2, 2)})
    args, _ = ray.get(dag.execute(), timeout=60)
    assert args[0] == 1
    assert ray.get(args[1][0], timeout=60) == 2
    assert ray.get(args[2]["a"], timeout=60) == 4


def test_class_node_one_actor_per_execution(cluster):
    with InputNode() as inp:
        counter = Counter.bind(100)
        dag = MultiOutputNode([counter.add.bind(inp), counter.add.bind(inp),
                               counter.calls_and_pid.bind(inp)])
    a1, a2, (calls, pid1) = ray.get(dag.execute(1), timeout=60)
    assert sorted([a1, a2]) == [101, 102]  # both calls went to one actor
    b1, b2, (_, pid2) = ray.get(dag.execute(5), timeout=60)
    assert sorted([b1, b2]) == [105, 110]  # a fresh actor for the second execution
    assert pid1 != pid2
    handle = counter.execute()
    assert ray.get(handle.add.remote(1), timeout=60) == 101


def test_method_bind_on_an_existing_actor(cluster):
    actor = Counter.remote(1000)
    with InputNode() as inp:
        dag = actor.add.bind(inp)
    assert ray.get(dag.execute(5), timeout=60) == 1005
    assert ray.get(dag.execute(5), timeout=60) == 1010  # the same actor each time


def test_options_then_bind(cluster):
    dag = echo.options(num_cpus=1).bind(1)
    assert ray.get(dag.execute(), timeout=60) == ((1,), {})
    actor_node = Counter.options(num_cpus=0).bind(7)
    assert ray.get(actor_node.add.bind(1).execute(), timeout=60) == 8


def test_errors_surface_from_get(cluster):
    @ray.remote
    def boom(x):
        raise ValueError(f"bad {x}")

    with InputNode() as inp:
        dag = add.bind(boom.bind(inp), 1)
    with pytest.raises(ValueError, match="bad 3"):
        ray.get(dag.execute(3), timeout=60)


@pytest.mark.skipif(BACKEND == "ray", reason="Ray 2.60 passes its internal input holder "
                    "to the task, or ignores arguments a DAG has no use for")
def test_input_mistakes_are_errors(cluster):
    with InputNode() as inp:
        whole = echo.bind(inp)
        second = echo.bind(inp[1])
        named = echo.bind(inp.y)
    with pytest.raises(ValueError, match="one positional argument"):
        whole.execute(1, 2)
    with pytest.raises(ValueError, match="one positional argument"):
        whole.execute()
    with pytest.raises(ValueError, match="positional argument 1"):
        second.execute(x=1)
    with pytest.raises(ValueError, match="keyword argument 'y'"):
        named.execute(1, 2)
    with pytest.raises(ValueError, match="no InputNode"):
        echo.bind(1).execute(5)
    with pytest.raises(ValueError, match="only one InputNode"):
        add.bind(InputNode(), InputNode()).execute(1)
    with pytest.raises(TypeError):
        MultiOutputNode([1, 2])
