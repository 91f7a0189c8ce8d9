"""The small helpers of ``ray.util`` on a real local cluster: ``inspect_serializability``,
``get_node_ip_address``, ``list_named_actors``, ``register_serializer`` /
``deregister_serializer`` (values passed to and returned from real tasks).

Runs on zray and, with ``ZRAY_TEST_BACKEND=ray``, on Ray 2.60 to check that the
semantics match. Waiting is poll-with-deadline.
"""

import importlib
import io
import threading
import time
import uuid

import pytest
from backend import BACKEND, local_cluster, pickle_by_value, ray

util = importlib.import_module(BACKEND + ".util")

# ship this module's functions by value (as a driver script's are), so that what
# inspect_serializability sees below is what a user's __main__ would give it
pickle_by_value(__name__)

pytestmark = pytest.mark.timeout(120)

NAMESPACE = "toolbox-test"


cluster = local_cluster(num_cpus=2, namespace=NAMESPACE)


def _until(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- inspect_serializability -------------------------------------------------

LOCK = threading.Lock()


def uses_lock():
    return LOCK


class Holder:
    def __init__(self):
        self.fine = 1
        self.bad = LOCK


def test_inspect_serializability_finds_the_culprit():
    out = io.StringIO()
    ok, failures = util.inspect_serializability(uses_lock, name="uses_lock", print_file=out)
    assert ok is False
    (failure,) = failures
    assert failure.obj is LOCK
    assert failure.parent is uses_lock
    assert failure.path[-1] == "LOCK"
    assert "Checking Serializability of" in out.getvalue()
    if BACKEND == "zray":  # the whole report goes to print_file (Ray prints parts to stdout)
        assert "FAIL serialization" in out.getvalue() and "LOCK" in out.getvalue()

    ok, failures = util.inspect_serializability(Holder(), name="h", print_file=out)
    assert ok is False
    (failure,) = failures
    assert failure.obj is LOCK and failure.path[-1] == "bad"


def test_inspect_serializability_of_good_values():
    out = io.StringIO()
    assert util.inspect_serializability([1, "a", {"k": 2.0}], print_file=out) == (True, set())
    assert util.inspect_serializability(lambda x: x + 1, print_file=out) == (True, set())


# -- get_node_ip_address -----------------------------------------------------

@ray.remote
def node_ip_in_task():
    return util.get_node_ip_address()


def test_get_node_ip_address_is_the_nodes(cluster):
    ip = util.get_node_ip_address()
    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == [ip]
    assert ray.get(node_ip_in_task.remote(), timeout=60) == ip


# -- list_named_actors -------------------------------------------------------

@ray.remote(num_cpus=0)
class Named:
    def ping(self):
        return "pong"


def test_list_named_actors(cluster):
    mine = f"mine-{uuid.uuid4().hex[:6]}"
    other = f"other-{uuid.uuid4().hex[:6]}"
    a = Named.options(name=mine).remote()
    b = Named.options(name=other, namespace="elsewhere").remote()
    Named.remote()  # anonymous: never listed
    assert ray.get([a.ping.remote(), b.ping.remote()], timeout=60) == ["pong", "pong"]
    names = util.list_named_actors()
    assert mine in names and other not in names
    assert all(isinstance(n, str) for n in names)
    everything = util.list_named_actors(all_namespaces=True)
    assert {"name": mine, "namespace": NAMESPACE} in everything
    assert {"name": other, "namespace": "elsewhere"} in everything
    ray.kill(a)
    _until(lambda: mine not in util.list_named_actors(), what="the killed actor to go")


# -- register_serializer -----------------------------------------------------

class Unpicklable:
    """Holds a lock, so plain pickling fails."""

    def __init__(self, value):
        self.value = value
        self.lock = threading.Lock()


def to_value(obj):
    return obj.value


def from_value(value):
    rebuilt = Unpicklable(value)
    rebuilt.rebuilt = True
    return rebuilt


@ray.remote
def describe(obj):
    return type(obj).__name__, obj.value, getattr(obj, "rebuilt", False)


@ray.remote
def make_unregistered(v):
    return Unpicklable(v)


@ray.remote
def make_registered(v):
    util.register_serializer(Unpicklable, serializer=to_value, deserializer=from_value)
    return [Unpicklable(v), {"nested": Unpicklable(v + 1)}]


def test_register_serializer_for_arguments_results_and_put(cluster):
    with pytest.raises(TypeError):
        ray.put(Unpicklable(0))
    util.register_serializer(Unpicklable, serializer=to_value, deserializer=from_value)
    try:
        # an argument: serialized here, rebuilt in the executor (which registered nothing)
        assert ray.get(describe.remote(Unpicklable(1)), timeout=60) == ("Unpicklable", 1, True)
        assert ray.get(describe.remote(ray.put(Unpicklable(2))), timeout=60) == (
            "Unpicklable", 2, True)
        back = ray.get(ray.put([Unpicklable(3)]))
        assert back[0].value == 3 and back[0].rebuilt
        # a result: registrations are per process, so an executor that did not
        # register cannot return one...
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(make_unregistered.remote(4), timeout=60)
        assert "lock" in str(info.value)
        # ...and one that did can
        first, nested = ray.get(make_registered.remote(5), timeout=60)
        assert (first.value, first.rebuilt) == (5, True)
        assert (nested["nested"].value, nested["nested"].rebuilt) == (6, True)
    finally:
        util.deregister_serializer(Unpicklable)
    with pytest.raises(TypeError):
        ray.put(Unpicklable(7))
    util.deregister_serializer(Unpicklable)  # not registered: nothing happens


@pytest.mark.skipif(BACKEND == "ray", reason="Ray 2.60 accepts anything and fails later")
def test_register_serializer_checks_its_arguments():
    with pytest.raises(TypeError, match="serializer must be callable"):
        util.register_serializer(Unpicklable, serializer=1, deserializer=from_value)
    with pytest.raises(TypeError, match="deserializer must be callable"):
        util.register_serializer(Unpicklable, serializer=to_value, deserializer=None)
    with pytest.raises(TypeError, match="needs a class"):
        util.register_serializer(Unpicklable(1), serializer=to_value, deserializer=from_value)


# -- what `import zray` makes available, and Pool(ray_address=...) ---------------

@pytest.mark.skipif(BACKEND == "ray", reason="Ray 2.60's `import ray` does not import "
                    "ray.util.queue / ray.util.multiprocessing; zray's does, as asked of it")
def test_import_makes_the_toolbox_attributes(run_driver):
    out = run_driver(
        "import zray\n"
        "print(zray.util.ActorPool.__name__, zray.util.queue.Queue.__name__,\n"
        "      zray.util.queue.Empty.__name__, zray.util.multiprocessing.Pool.__name__,\n"
        "      zray.util.inspect_serializability.__name__)\n"
        "from zray.dag import InputNode, MultiOutputNode\n"
        "print(InputNode.__name__, MultiOutputNode.__name__)\n", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ActorPool", "Queue", "Empty", "Pool",
                                  "inspect_serializability", "InputNode", "MultiOutputNode"]


def _cluster_address() -> str:
    if BACKEND == "ray":
        return ray.get_runtime_context().gcs_address
    return ray._runtime.client.address


def test_pool_ray_address_joins_that_cluster(cluster, run_driver):
    """A second driver that is not connected yet: Pool(ray_address=...) connects it to
    this cluster (same node) and its workers run there."""
    node_ids = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    out = run_driver(
        f"import {BACKEND} as ray\n"
        f"from {BACKEND}.util.multiprocessing import Pool\n"
        "def square(x):\n"
        "    return x * x\n"
        f"pool = Pool(processes=1, ray_address={_cluster_address()!r})\n"
        "print(pool.map(square, [1, 2, 3]))\n"
        "print(sorted(n['NodeID'] for n in ray.nodes() if n['Alive']))\n"
        "pool.terminate()\n", timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "[1, 4, 9]"
    assert lines[-1] == str(node_ids)
