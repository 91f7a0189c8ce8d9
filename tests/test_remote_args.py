"""Arguments are checked against the function's parameters at ``.remote()``, as Ray
does: a call that could never run fails in the caller with Python's TypeError, and
nothing is submitted. Tasks, ``.options()``, actor constructors, methods (plain,
static, class), and handles passed to another process. Backend-switchable
(``ZRAY_TEST_BACKEND=ray`` runs it on Ray)."""

import pytest
from backend import local_cluster, pickle_by_value, ray

pickle_by_value(__name__)
cluster = local_cluster(num_cpus=2)


@ray.remote
def two(a, b=1):
    return a + b


@ray.remote
def anything(*args, **kwargs):
    return len(args) + len(kwargs)


@ray.remote
def only_kw(*, k):
    return k


@ray.remote
class Acc:
    def __init__(self, start, *, step=1):
        self.n, self.step = start, step

    def add(self, k=None):
        self.n += self.step if k is None else k
        return self.n

    @staticmethod
    def double(x):
        return 2 * x

    @classmethod
    def name(cls, suffix):
        return cls.__name__ + suffix


@ray.remote
class Bare:
    def ping(self):
        return "pong"


@ray.remote
def call_with(handle, args):
    try:
        ref = handle.add.remote(*args)
    except TypeError as e:
        return "TypeError: " + str(e)
    return ray.get(ref)


@pytest.mark.parametrize("call", [
    lambda: two.remote(1, 2, 3),
    lambda: two.remote(1, c=2),
    lambda: two.remote(),
    lambda: two.options(num_cpus=1).remote(1, 2, 3),
    lambda: only_kw.remote(1),
    lambda: Acc.remote(),
    lambda: Acc.remote(1, 2),
    lambda: Acc.options(max_concurrency=2).remote(1, steps=2),
    lambda: Bare.remote(1),
], ids=["too_many", "unknown_kw", "missing", "options", "kw_only", "ctor_missing",
        "ctor_too_many", "ctor_options_kw", "no_init"])
def test_a_call_that_cannot_bind_raises_typeerror_at_remote(cluster, call):
    with pytest.raises(TypeError):
        call()


def test_calls_that_bind_run(cluster):
    assert ray.get(two.remote(1)) == 2
    assert ray.get(two.remote(a=1, b=5)) == 6
    assert ray.get(anything.remote(1, 2, x=3)) == 3
    assert ray.get(only_kw.remote(k=4)) == 4
    acc = Acc.remote(10, step=2)
    assert ray.get(acc.add.remote()) == 12
    assert ray.get(acc.add.remote(k=5)) == 17
    assert ray.get(acc.double.remote(4)) == 8
    assert ray.get(acc.name.remote("!")) == "Acc!"
    assert ray.get(Bare.remote().ping.remote()) == "pong"


def test_methods_check_their_arguments_on_every_handle(cluster):
    acc = Acc.remote(0)
    with pytest.raises(TypeError):
        acc.add.remote(1, 2)
    with pytest.raises(TypeError):
        acc.add.options(num_returns=1).remote(k=1, j=2)
    with pytest.raises(TypeError):
        acc.double.remote()
    with pytest.raises(TypeError):
        acc.name.remote()
    # a handle passed to a task checks there too
    assert ray.get(call_with.remote(acc, (1, 2))).startswith("TypeError")
    assert ray.get(call_with.remote(acc, (1,))) == 1
    assert ray.get(acc.add.remote(0)) == 1  # the bad calls never ran


def test_a_negative_get_timeout_is_refused(cluster):
    if ray.__name__ == "ray":
        pytest.skip("Ray waits without a timeout for a negative one (not documented)")
    ref = two.remote(1)
    with pytest.raises(ValueError, match="timeout"):
        ray.get(ref, timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        ray.get([ref], timeout=-0.5)


def test_an_argument_that_cannot_be_pickled_is_named(cluster):
    import threading

    with pytest.raises(TypeError, match="(?i)serialize"):
        two.remote(1, b=threading.Lock())
    assert ray.get(two.remote(1)) == 2
