"""A queue's head that fits nowhere is not tried again until something changed
(``Placement.epoch``, brokerd/placement.py): every kind of change that can make a
queued task placeable must move the epoch, or that task waits forever.

* On a real cluster (``zray broker`` + ``zray worker --num-cpus 1`` daemons) with the
  safety net turned off (``ZRAY_SCHED_RETRY_S`` a million seconds, so a missed bump
  hangs instead of costing 0.1 s): tasks queue on a saturated cluster while, one
  after the other, CPUs come back, a node joins, a task lends its CPU in ``get``, a
  queued task is cancelled, a placement group is created and removed, an executor
  process is killed (its task retried), a node dies, an actor waits for a CPU; every
  task runs and returns its value.
* On a real task engine (no sockets' peers): a pass with nothing changed does not
  try the head again; a change the epoch missed (simulated) is caught by the safety
  net after RETRY_S.
"""

import os
import signal
import time

import pytest
from _cluster import CliCluster, cli_cluster
from conftest import poll_until
from test_prefetch_room import _engine, _pass, _submit, out  # noqa: F401 (a fixture)

import zray
from brokerd import placement as placement_mod
from brokerd.records import TaskState
from zray import _protocol as P
from zray import exceptions
from zray.util.placement_group import placement_group, remove_placement_group
from zray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

NO_NET = {"ZRAY_SCHED_RETRY_S": "1000000", "ZRAY_NODE_TIMEOUT_S": "2"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cli_cluster(tmp_path_factory.mktemp("epochcluster"), CliCluster, clean_stop=False,
                     env=NO_NET) as c:
        for name in ("w0", "w1"):
            c.add_worker(name, cpus=1)
        yield c


@zray.remote(num_cpus=1, max_retries=3)
def hold(gate, pidfile=""):
    """Keep a CPU until the file ``gate`` exists (``pidfile``: say which process runs it)."""
    if pidfile:
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pidfile + ".tmp", pidfile)
    while not os.path.exists(gate):
        time.sleep(0.02)
    return "held"


@zray.remote(num_cpus=1)
def square(i):
    return i * i


@zray.remote(num_cpus=1)
def outer(n):
    return sum(zray.get([square.remote(i) for i in range(n)]))  # (lends its CPU meanwhile)


@zray.remote(num_cpus=1)
class Counter:
    def __init__(self):
        self.n = 0

    def add(self, k):
        self.n += k
        return self.n


def _cpus(n):
    poll_until(lambda: zray.available_resources().get("CPU", 0) == n, 60,
               what=f"{n} CPUs free")


def _saturate(gate, cpus, left=0):
    """``cpus`` hold tasks (one per CPU) running, ``left`` CPUs free then; their refs."""
    refs = [hold.remote(str(gate)) for _ in range(cpus)]
    _cpus(left)
    return refs


def _queued(refs):
    ready, _ = zray.wait(refs, num_returns=len(refs), timeout=0.5)
    assert not ready, "ran on a saturated cluster"


@pytest.mark.timeout(300)
def test_every_change_places_the_queued_tasks_with_the_safety_net_off(cluster, tmp_path):
    # 1. CPUs come back (DONE): what queued behind them runs.
    gate = tmp_path / "g1"
    held = _saturate(gate, 2)
    refs = [square.remote(i) for i in range(20)]
    _queued(refs)
    gate.touch()
    assert zray.get(refs, timeout=60) == [i * i for i in range(20)]
    assert zray.get(held, timeout=60) == ["held"] * 2

    # 2. A node joins while the two CPUs are held.
    gate = tmp_path / "g2"
    held = _saturate(gate, 2)
    refs = [square.remote(i) for i in range(10)]
    _queued(refs)
    cluster.add_worker("w2", cpus=1)
    assert zray.get(refs, timeout=60) == [i * i for i in range(10)]
    gate.touch()
    assert zray.get(held, timeout=60) == ["held"] * 2

    # 3. A task waiting in get lends its CPU to the tasks it waits for (all others held).
    gate = tmp_path / "g3"
    held = _saturate(gate, 2, left=1)
    assert zray.get(outer.remote(6), timeout=60) == sum(i * i for i in range(6))

    # 4. The head of the queue is cancelled: the tasks behind it still run.
    held.append(hold.remote(str(gate)))  # (the third CPU)
    _cpus(0)
    refs = [square.remote(i) for i in range(5)]
    _queued(refs)
    zray.cancel(refs[0])
    with pytest.raises(exceptions.TaskCancelledError):
        zray.get(refs[0], timeout=60)
    gate.touch()
    assert zray.get(refs[1:], timeout=60) == [i * i for i in range(1, 5)]
    assert zray.get(held, timeout=60) == ["held"] * 3

    # 5. A placement group waits for a CPU held by a task; its member queues behind it;
    # the group is removed while plain tasks queue: its CPU comes back to them.
    gate = tmp_path / "g5"
    held = _saturate(gate, 3)
    pg = placement_group([{"CPU": 1}])
    member = square.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote(7)
    _queued([member])
    (tmp_path / "g5").touch()
    assert zray.get(pg.ready(), timeout=60) == pg
    assert zray.get(member, timeout=60) == 49
    assert zray.get(held, timeout=60) == ["held"] * 3
    gate = tmp_path / "g5b"
    held = _saturate(gate, 2)  # (the third CPU is the group's)
    refs = [square.remote(i) for i in range(8)]
    _queued(refs)
    remove_placement_group(pg)
    assert zray.get(refs, timeout=60) == [i * i for i in range(8)]

    # 6. An executor process is killed: its task is retried and runs, and so do the
    # tasks that queued behind the held CPUs.
    pidfile = tmp_path / "pid6"
    victim = hold.remote(str(tmp_path / "g6-never"), str(pidfile))
    _cpus(0)
    refs = [square.remote(i) for i in range(6)]
    _queued(refs)
    pid = int(poll_until(lambda: pidfile.exists() and pidfile.read_text(), 30,
                         what="the victim's pid"))
    (tmp_path / "g6-never").touch()  # (its retry returns at once)
    os.kill(pid, signal.SIGKILL)
    assert zray.get(victim, timeout=60) == "held"
    gate.touch()
    assert zray.get(refs, timeout=60) == [i * i for i in range(6)]
    assert zray.get(held, timeout=60) == ["held"] * 2

    # 7. A node dies while tasks queue; an actor waits for a CPU too.
    gate = tmp_path / "g7"
    held = _saturate(gate, 3)
    refs = [square.remote(i) for i in range(6)]
    counter = Counter.remote()
    _queued(refs)
    cluster.kill_worker("w2")  # (its hold task is retried on w0 / w1)
    gate.touch()
    assert zray.get(refs, timeout=90) == [i * i for i in range(6)]
    assert zray.get(counter.add.remote(5), timeout=90) == 5
    assert zray.get(held, timeout=90) == ["held"] * 3


def _join_node(e):
    """A node of one CPU with an idle executor joins (the engine's own calls)."""
    nid, cid, token = os.urandom(P.ID_LEN), os.urandom(P.ID_LEN), os.urandom(16)
    e.nodes.join(nid, {"resources": {"CPU": P.UNIT}})
    e.executor_spawned(nid, cid, token)
    e.client_joined(cid, P.Hello(P.VERSION, "executor", nid, 1, b"", token))
    e.executor_ready(cid)


@pytest.mark.timeout(60)
def test_a_pass_skips_a_head_that_fit_nowhere_and_the_safety_net_retries_it(
        out, monkeypatch):  # noqa: F811 (the fixture imported above)
    monkeypatch.setattr(placement_mod, "RETRY_S", 1e6)
    e, _execs, driver, fid = _engine(out, 2)
    _submit(e, driver, fid, 6)
    _pass(e)  # two run, the rest queue (sent ahead: up to one each)
    _pass(e)
    tries = []
    place = e.placement.place
    monkeypatch.setattr(e.placement, "place", lambda t: tries.append(t) or place(t))
    queue = next(iter(e.placement.queues.values()))
    head = queue[0]
    _pass(e)
    _pass(e)
    assert tries == [] and head.state == TaskState.QUEUED  # nothing changed: not tried
    # A change that does not move the epoch (a missed bump, simulated): a node with an
    # idle executor joins and the node index sees it, but nothing tells the pass.
    _join_node(e)
    e.placement.index.refresh()
    e.nodes.freed = False
    _pass(e)
    assert tries == [] and head.state == TaskState.QUEUED
    # The safety net: after RETRY_S every head is tried again.
    monkeypatch.setattr(placement_mod, "RETRY_S", 0.05)
    e.placement.retry_at = time.monotonic() + 0.05

    def placed():
        _pass(e)
        return head.state != TaskState.QUEUED or None

    poll_until(placed, 30, interval=0.01, what="the safety net's pass")
    assert tries and tries[0] is head
