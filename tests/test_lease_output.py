"""A driver that exits right after its last leased calls still gets their output.

Leased calls (zray/_lease.py) never pass the broker, so the broker's count of a job's
unfinished tasks (the exit drain in zray/_api.py) does not see them: the drain also
waits for the calls in flight on the driver's leases (``TaskLeases.unanswered``), and
their print() lines, which come on the lease's lane ahead of each result, reach the
driver's stdout before it exits. Each script runs as its own process, as a user's
would, and the test counts the lines it printed.
"""

import pytest

pytestmark = pytest.mark.timeout(180)

_HEAD = """
import time
import zray as ray
from zray import _lease, _runtime
ray.init(num_cpus=2)

@ray.remote
def say(i):
    print(f"line-from-task {i}")
    return i

@ray.remote
def warm(i):
    return i

def on_a_lease():
    # sync calls until they go on a lease (a refused one is asked for again later)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for i in range(_lease.STREAK + 1):
            ray.get(say.remote(-1))
        if _runtime.client.leases is not None and _runtime.client.leases.sent:
            return True
    return False
"""


def _lines(out: str) -> list:
    return sorted(int(line.split()[-1]) for line in out.splitlines()
                  if "line-from-task" in line and not line.rstrip().endswith("-1"))


def _sent(out: str) -> int:
    return int(out.split("SENT ")[1].split()[0])


def test_sync_printing_tasks_then_exit_print_every_line(run_driver):
    res = run_driver(_HEAD + """
assert on_a_lease()
for i in range(8):
    assert ray.get(say.remote(i)) == i
print("SENT", _runtime.client.leases.sent, flush=True)
""", timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _sent(res.stdout) > 8  # (they went on a lease: warm-up and these)
    assert _lines(res.stdout) == list(range(8)), res.stdout


def test_calls_in_flight_on_a_lease_at_exit_finish_and_print(run_driver):
    """Fired, never gotten: the driver exits with them in flight on its lease."""
    res = run_driver(_HEAD + """
assert on_a_lease()
before = _runtime.client.leases.sent
refs = [say.remote(i) for i in range(8)]
print("SENT", _runtime.client.leases.sent - before, flush=True)
""", timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _sent(res.stdout) > 0  # (some at least went on the lease)
    assert _lines(res.stdout) == list(range(8)), res.stdout


def test_an_async_burst_gotten_then_exit_prints_every_line(run_driver):
    res = run_driver(_HEAD + """
assert on_a_lease()
before = _runtime.client.leases.sent
assert ray.get([say.remote(i) for i in range(50)]) == list(range(50))
print("SENT", _runtime.client.leases.sent - before, flush=True)
""", timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _sent(res.stdout) > 0
    assert _lines(res.stdout) == list(range(50)), res.stdout
