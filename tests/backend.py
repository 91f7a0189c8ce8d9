"""The system that backend-switchable tests run on: zray, or real Ray with
``ZRAY_TEST_BACKEND=ray`` (to check that zray's behaviour matches Ray's).

``from backend import BACKEND, ray, pickle_by_value, local_cluster``.
"""

import importlib
import os
import sys

import pytest

BACKEND = os.environ.get("ZRAY_TEST_BACKEND", "zray")
ray = importlib.import_module(BACKEND)

if BACKEND == "ray":
    from ray import cloudpickle as _cloudpickle
else:
    import cloudpickle as _cloudpickle


def pickle_by_value(module_name: str) -> None:
    """Executors cannot import a test module (pytest put tests/ on the path of this
    process only): pickle its functions and classes by value."""
    _cloudpickle.register_pickle_by_value(sys.modules[module_name])


def local_cluster(**init_kwargs):
    """A module-scoped fixture: a fresh local cluster started with ``init(**init_kwargs)``
    (any cluster left by an earlier module is shut down first), shut down after."""

    @pytest.fixture(scope="module")
    def cluster():
        if ray.is_initialized():
            ray.shutdown()
        ray.init(**init_kwargs)
        try:
            yield
        finally:
            ray.shutdown()

    return cluster
