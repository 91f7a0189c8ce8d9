"""Remote functions shared by backend-switchable test modules (zray, or Ray with
``ZRAY_TEST_BACKEND=ray``): tasks whose finishing order the test decides.

``from _gates import after_file``. Executors cannot import modules from tests/ (pytest
put it on the path of the test process only), so this module is pickled by value,
as the test modules that define their own remote functions are.
"""

import os
import time

from backend import pickle_by_value, ray

pickle_by_value(__name__)


@ray.remote
def after_file(path, value, timeout=60.0):
    """Return ``value`` once ``path`` exists (the test decides the finishing order)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return value
