"""The broker's placement pass touches only what may have changed: a real task engine
(brokerd.engine.TaskEngine on a ROUTER socket of its own, nobody connected, so what
it sends is dropped) driven by the messages its peers would send.

* A saturated cluster: DEFAULT's pick answers "nothing fits" without trying every
  node, and still finds the one node with room however far down the order it is.
* Windows (brokerd/window.py): the pass looks only at the executors whose window may
  have room (``Placement.room``). Each event that frees a slot brings an executor back:
  a DONE that starts the next task sent ahead (the finished task's resources pass
  straight to it), a task handed back by an executor that blocks in get; a function
  turning short widens every window.
"""

import os

import pytest
import zmq

from brokerd import window
from brokerd.engine import TaskEngine
from brokerd.nodeindex import NodeIndex
from brokerd.nodes import NodeTable
from brokerd.outbox import Outbox
from brokerd.records import ExecState, Task, TaskState
from brokerd.window import WINDOW
from zray import _protocol as P
from zray._serialization import serialize


@pytest.fixture
def out(tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # nobody is connected: drop, do not raise
    sock.bind(f"ipc://{tmp_path}/b.sock")
    try:
        yield Outbox(sock)
    finally:
        sock.close(0)
        ctx.term()


def _task(i: int, cpus: int) -> Task:
    need = {"CPU": cpus * P.UNIT}
    return Task(i.to_bytes(4, "little") * 7, P.TASK, None, [], need, need,
                (tuple(sorted(need.items())), None), [])


@pytest.mark.timeout(30)
def test_pick_on_a_saturated_cluster(out):
    table = NodeTable(out)
    nodes = [table.join(os.urandom(P.ID_LEN), {"resources": {"CPU": 2 * P.UNIT}})
             for _ in range(50)]
    index = NodeIndex(table)
    index.refresh()
    pick = index.score_index(("CPU",)).pick
    one = {"CPU": P.UNIT}
    running = {}
    for i, node in enumerate(nodes):  # every node fully used
        running[node] = _task(i, 2)
        table.acquire(running[node], node)
    index.refresh()
    assert pick(one, index.alive, table.fits) == (None, None)
    # One CPU comes back on one node, the last in the index's order: it is found.
    last = max(nodes, key=lambda n: index.ranks[n.node_id])
    table.release(running[last])
    table.acquire(_task(999, 1), last)
    index.refresh()
    assert pick(one, index.alive, table.fits) == (None, last)  # (no idle executor there)
    last.idle.append(object())  # an idle executor there: it can run now
    assert pick(one, index.alive, table.fits) == (last, last)
    assert pick({"CPU": 2 * P.UNIT}, index.alive, table.fits) == (None, None)


def _engine(out, nodes: int):
    e = TaskEngine(out)
    execs = []
    for _ in range(nodes):
        nid = os.urandom(P.ID_LEN)
        e.nodes.join(nid, {"resources": {"CPU": P.UNIT}})
        cid, token = os.urandom(P.ID_LEN), os.urandom(16)
        e.executor_spawned(nid, cid, token)
        assert "error" not in e.client_joined(cid, P.Hello(P.VERSION, "executor", nid, 1, b"",
                                                            token))
        e.executor_ready(cid)
        execs.append(e.executors[cid])
    driver = os.urandom(P.ID_LEN)
    e.client_joined(driver, P.Hello(P.VERSION, "driver", b"", 1, b"job1", b""))
    fid = os.urandom(16)
    e.objects.register_fn(fid, b"fn-blob", [])
    return e, execs, driver, fid


def _submit(e, driver, fid, n):
    arg = serialize(((1,), {}))[0]
    for i in range(n):
        spec = P.TaskSpec(driver + i.to_bytes(4, "little"), P.TASK, fid, "tiny", 1,
                          {"CPU": P.UNIT}, [], [], {}, b"", driver, driver, b"job1", b"")
        header = P.encode(P.Submit(spec))
        e.submit(driver, P.decode(header), list(arg), P.submit_spec_bytes(header))


def _done(e, ex):
    value = serialize(1)[0]
    m = P.decode(P.encode(P.Done(ex.task.task_id, [[P.VALUE, len(value), None, 2]], [],
                                 False, [], "")))
    e.done(ex.cid, m, list(value))


def _pass(e):
    import time

    e.moves.now = time.time()
    e.schedule()
    e.out.flush()


@pytest.mark.timeout(30)
def test_windows_refill_after_each_event_that_frees_a_slot(out, monkeypatch):
    # The engine times the runs on the wall clock: on a loaded machine the gap between a
    # pass and the DONE after it can pass 2 ms (not short) or 20 ms (long: nothing goes
    # ahead). The thresholds (ZRAY_EXEC_SHORT_S / ZRAY_EXEC_LONG_S) are wide here, so
    # what is checked is the refills, not how fast this machine is.
    monkeypatch.setattr(window, "SHORT_S", 10.0)
    monkeypatch.setattr(window, "LONG_S", 60.0)
    e, (a, b), driver, fid = _engine(out, 2)
    _submit(e, driver, fid, 100)
    _pass(e)  # both start a task
    assert a.state == b.state == ExecState.BUSY and not a.ahead and not b.ahead
    _pass(e)  # the function has no run time yet: one task ahead each
    assert len(a.ahead) == len(b.ahead) == 1
    _pass(e)  # full windows: nothing more
    assert len(a.ahead) == len(b.ahead) == 1
    _done(e, a)  # a fast run: the function is short now, every window widens
    assert a.task.state == TaskState.RUNNING and not a.ahead
    _pass(e)
    assert len(a.ahead) == len(b.ahead) == WINDOW
    for _ in range(3):  # each DONE frees a slot; the next pass fills it
        _done(e, b)
        assert len(b.ahead) == WINDOW - 1
        _pass(e)
        assert len(b.ahead) == WINDOW
        # (the next task took the finished one's CPU: still one task's worth in use)
        assert b.node.avail["CPU"] == 0 and b.node.running == 1 and b.task.node is b.node
    # Blocked in get: it hands back two tasks sent ahead; nothing more goes to it
    # while it waits, and its window is full again once the wait ends.
    handed = [t.task_id for t in list(a.ahead)[-2:]]
    e.block(a.cid, P.Block(a.task.task_id, handed))
    assert len(a.ahead) == WINDOW - 2
    _pass(e)
    assert len(a.ahead) == WINDOW - 2
    e.unblock(a.cid, P.Unblock(a.task.task_id))
    _pass(e)
    assert len(a.ahead) == WINDOW
    # Run everything: every task finishes, none is left behind in a window.
    while e.tasks:
        for ex in (a, b):
            if ex.task is not None:
                _done(e, ex)
        _pass(e)
    assert a.state == b.state == ExecState.IDLE and not a.ahead and not b.ahead
    for node in (a.node, b.node):  # every CPU back
        assert node.avail == node.total and node.running == 0
    assert e.nodes.totals(avail=True) == {"CPU": 2.0}
