"""Ray parity of job-level context inside tasks and actors (issue 9): namespaces and
inherited runtime_env. Each case is a fresh driver script, so that init() options
apply; ``ZRAY_TEST_BACKEND=ray`` runs the same scripts on Ray."""

import os
import textwrap

import pytest

BACKEND = os.environ.get("ZRAY_TEST_BACKEND", "zray")


def script(body: str, init: str = "") -> str:
    return f"import {BACKEND} as ray\nray.init({init})\n" + textwrap.dedent(body)


NAMESPACE_BODY = """
@ray.remote
class Named:
    def ping(self):
        return "pong"

@ray.remote
def find(name):
    return ray.get(ray.get_actor(name).ping.remote())

@ray.remote
def ns():
    return ray.get_runtime_context().namespace

@ray.remote
def make(name):
    a = Named.options(name=name, lifetime="detached").remote()
    ray.get(a.ping.remote())
    return True

@ray.remote
class Holder:
    def ns(self):
        return ray.get_runtime_context().namespace

a = Named.options(name="by_driver").remote()
assert ray.get(find.remote("by_driver"), timeout=60) == "pong"
driver_ns = ray.get_runtime_context().namespace
assert ray.get(ns.remote(), timeout=60) == driver_ns, (ray.get(ns.remote()), driver_ns)
assert ray.get(Holder.remote().ns.remote(), timeout=60) == driver_ns
assert ray.get(make.remote("by_task"), timeout=60)
assert ray.get(ray.get_actor("by_task").ping.remote(), timeout=60) == "pong"
ray.kill(ray.get_actor("by_task"))
print("OK", driver_ns)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("init", ["", "namespace='team'"], ids=["anonymous", "explicit"])
def test_namespace_is_the_jobs_inside_tasks_and_actors(run_driver, init):
    out = run_driver(script(NAMESPACE_BODY, init), timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
    if init:
        assert "OK team" in out.stdout


@pytest.mark.timeout(120)
def test_job_runtime_env_is_inherited_by_nested_tasks_and_actors(run_driver):
    body = """
    import os

    @ray.remote
    def leaf():
        return os.environ.get("ZZ"), os.environ.get("YY")

    @ray.remote
    def middle():
        return ray.get(leaf.remote())

    @ray.remote
    def middle_overrides():
        return ray.get(leaf.options(runtime_env={"env_vars": {"YY": "9"}}).remote())

    @ray.remote
    class Parent:
        def child(self):
            return ray.get(leaf.remote())

    assert ray.get(middle.remote(), timeout=60) == ("7", None), ray.get(middle.remote())
    assert ray.get(middle_overrides.remote(), timeout=60) == ("7", "9")
    assert ray.get(Parent.remote().child.remote(), timeout=60) == ("7", None)
    print("OK")
    """
    out = run_driver(script(body, 'runtime_env={"env_vars": {"ZZ": "7"}}'), timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
