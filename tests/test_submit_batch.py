"""A driver's SUBMITs of one burst go to the broker as one C->B BATCH (zray._client
SUBMIT_BATCH): what a user sees must not change. Bursts larger than a batch keep their
order, a put or a release between submissions keeps its place, a cancel of a task
inside a burst cancels that task only. The protocol half sends hand-made BATCHes to
a real broker through raw sockets: a bad message inside one is dropped and counted,
the others are still handled, in order.

The API tests run on Ray too (ZRAY_TEST_BACKEND=ray).
"""

import os
import time

import pytest
from backend import BACKEND, local_cluster, pickle_by_value, ray

pickle_by_value(__name__)
cluster = local_cluster(num_cpus=2)

BURST = 700  # more than one SUBMIT_BATCH (256)


@ray.remote
class Log:
    def __init__(self):
        self.seen = []

    def add(self, i):
        self.seen.append(i)
        return i

    def seen_list(self):
        return self.seen


@ray.remote
def echo(x):
    return x


@ray.remote
def nap(s):
    time.sleep(s)
    return s


@pytest.mark.timeout(120)
def test_a_burst_of_actor_calls_runs_in_the_order_it_was_made(cluster):
    log = Log.remote()
    refs = [log.add.remote(i) for i in range(BURST)]
    assert ray.get(refs) == list(range(BURST))
    assert ray.get(log.seen_list.remote()) == list(range(BURST))


@pytest.mark.timeout(120)
def test_puts_and_releases_between_submissions_keep_their_place(cluster):
    refs = []
    for i in range(300):
        big = ray.put(("value", i))
        refs.append(echo.remote(big))  # the task's argument, put just before
        del big  # released right after it was submitted: the task still gets it
    assert ray.get(refs) == [("value", i) for i in range(300)]


@pytest.mark.timeout(120)
def test_cancelling_a_task_inside_a_burst_cancels_that_task_only(cluster):
    refs = [nap.remote(0.001) for _ in range(400)]
    victim = refs[200]
    ray.cancel(victim)  # (may reach the broker before its SUBMIT would have been sent)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(victim, timeout=60)
    rest = refs[:200] + refs[201:]
    assert ray.get(rest, timeout=60) == [0.001] * 399


@pytest.mark.timeout(120)
def test_an_error_in_a_burst_fails_only_its_own_task(cluster):
    @ray.remote
    def maybe_fail(i):
        if i == 123:
            raise ValueError("task 123 fails")
        return i

    refs = [maybe_fail.remote(i) for i in range(BURST)]
    with pytest.raises(ValueError, match="task 123 fails"):
        ray.get(refs[123])
    assert ray.get(refs[:123] + refs[124:]) == [i for i in range(BURST) if i != 123]


# ------------------------------------------------------------------ protocol
@pytest.mark.timeout(60)
@pytest.mark.skipif(BACKEND != "zray", reason="zray's wire protocol")
def test_a_bad_message_inside_a_batch_is_dropped_and_the_rest_handled_in_order(cluster):
    import zmq

    from zray import _protocol as P

    client = ray._runtime.client
    before = client.request("status")["dropped_messages"]
    ctx = zmq.Context()
    try:
        cid = os.urandom(P.ID_LEN)
        inbox = ctx.socket(zmq.DEALER)
        inbox.setsockopt(zmq.IDENTITY, P.inbox_ident(cid))
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.connect(client.address)
        inbox.send(P.encode(P.Hello(P.VERSION, "cli", b"", os.getpid(), b"probe")))
        assert inbox.poll(10000) and P.decode(inbox.recv()).TYPE == P.Msg.WELCOME
        out = ctx.socket(zmq.DEALER)
        out.setsockopt(zmq.IDENTITY, P.out_ident(cid))
        out.setsockopt(zmq.LINGER, 0)
        out.connect(client.address)
        req = [(P.encode(P.Req(i, "cluster_resources", None)), []) for i in range(4)]
        bad = [
            (b"\xc1 not msgpack", []),  # does not decode
            (P.encode(P.Hello(P.VERSION, "cli", b"", 1, b"x")), []),  # an inbox's message
            (P.encode_batch([req[0]])[0], [req[0][0]]),  # a BATCH inside a BATCH
            (P.encode(P.Submit(P.TaskSpec(b"short", 0, b"f", "f", 1, {}, [], [], {}, b"",
                                          b"", b"", b"", b""))), []),  # a bad field
        ]
        msgs = [req[0], bad[0], req[1], bad[1], bad[2], req[2], bad[3], req[3]]
        out.send_multipart(P.encode_batch(msgs))
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 4 and time.monotonic() < deadline:
            if inbox.poll(1000):
                got += [P.decode(m[0]) for m in P.unbatch(inbox.recv_multipart())]
        replies = [m for m in got if m.TYPE == P.Msg.REPLY]
        assert [m.req_id for m in replies] == [0, 1, 2, 3]
        assert all(m.ok and m.result.get("CPU") == 2 for m in replies)
        # a BATCH whose counts do not add up is dropped whole
        out.send_multipart([P.encode(P.Batch([2, 2])), req[0][0], b"x", b"y"])
        out.send(P.encode(P.Req(9, "cluster_resources", None)))
        assert inbox.poll(10000)
        assert [m.req_id for m in map(lambda p: P.decode(p[0]),
                                      P.unbatch(inbox.recv_multipart()))] == [9]
        out.send(P.encode(P.Exit()))
    finally:
        ctx.destroy(linger=0)
    assert client.request("status")["dropped_messages"] - before == len(bad) + 1
