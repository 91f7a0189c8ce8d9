"""Direct actor calls across hosts (zray/_xhost.py), on a CLI cluster over TCP with CURVE.

    zray broker --host 127.0.0.1 --port PORT
    ZRAY_HOST_ID=hostA zray worker --address tcp://... --resources '{"nodeA": 1}'
    ZRAY_HOST_ID=hostB zray worker --address tcp://... --resources '{"nodeB": 1}'
    this test process: the driver, ZRAY_HOST_ID=hostD

``ZRAY_HOST_ID`` makes the three look like three hosts: no caller may use the
ipc socket of an actor on another "host", so the calls must go over the actor
executor's tcp listener (CURVE with the cluster key), and the results come back
to the caller's tcp reply inbox. The broker's message count stays flat while
they do; order holds; kill -9 of the actor's process restarts it and the calls
are retried; cancel interrupts a running call; a peer without the cluster key
(or without CURVE) is refused by both listeners. When the actor's whole node
dies, the caller learns it from its broken connection, long before the broker
(which waits NODE_TIMEOUT_S for heartbeats) could tell it
(zray/_direct_watch.py).

Waiting is poll-with-deadline or get with a timeout; sleeps inside actor methods
are workload.
"""

import json
import os
import signal
import time

import pytest
import zmq
from conftest import describe, kill_tree, poll_until, wait_gone
from test_cli_cluster import _free_port, _Procs
from zmq.utils.monitor import recv_monitor_message

import zray as ray
from zray import _runtime
from zray._security import load_key_file
from zray.exceptions import RayActorError, TaskCancelledError

pytestmark = pytest.mark.timeout(180)


class Cluster:
    def __init__(self, tmp_path, **env):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs = _Procs(tmp_path)
        self.procs.env.pop("ZRAY_INSECURE", None)  # CURVE, as any tcp cluster by default
        self.procs.env.update(env)

    def start(self):
        self.procs.start("broker", ["broker", "--host", "127.0.0.1", "--port", str(self.port)])
        for name, host in (("nodeA", "hostA"), ("nodeB", "hostB")):
            self.procs.env["ZRAY_HOST_ID"] = host
            self.procs.start(name, ["worker", "--address", self.address, "--num-cpus", "2",
                                    "--resources", json.dumps({name: 1})])
        self.procs.env.pop("ZRAY_HOST_ID")
        self.procs.connect_driver(self.address, 60)
        poll_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 60,
                   what="2 alive nodes")

    def stop(self):
        if ray.is_initialized():
            ray.shutdown()
        everything = self.procs.descendants()
        for p in self.procs.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.procs.values():
            p.wait(20)
        left = wait_gone(everything, 10)
        assert left == [], f"left behind: {describe(left)}"

    def kill_all(self):
        self.procs.kill_all()
        for p in self.procs.procs.values():
            kill_tree(p.pid)


def _run_cluster(tmp_path_factory, name, **env):
    if ray.is_initialized():
        ray.shutdown()
    old = os.environ.get("ZRAY_HOST_ID")
    os.environ["ZRAY_HOST_ID"] = "hostD"  # this driver: a third host
    c = Cluster(tmp_path_factory.mktemp(name), **env)
    try:
        c.start()
        yield c
        c.stop()
    except BaseException:
        print(c.procs.logs())
        raise
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.kill_all()
        if old is None:
            os.environ.pop("ZRAY_HOST_ID", None)
        else:
            os.environ["ZRAY_HOST_ID"] = old


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from _run_cluster(tmp_path_factory, "xhost")


@ray.remote
class Log:
    def __init__(self):
        self.seen = []

    def add(self, i):
        self.seen.append(i)
        return i

    def entries(self):
        return list(self.seen)

    def pid(self):
        return os.getpid()

    def node(self):
        return ray.get_runtime_context().get_node_id()

    def slow(self, i, delay, started=None):
        if started:
            open(started, "w").close()  # (the test waits for this file: the call runs)
        time.sleep(delay)
        return i


@ray.remote
class Relay:
    """An actor on node A calling one on node B: an executor as the remote caller."""

    def call(self, other, n):
        return [ray.get(other.add.remote(i), timeout=60) for i in range(n)]

    def tcp_route(self, other):
        route = ray._runtime.client.direct.routes.get(other._actor_id)
        return route.address if route is not None else None


def _route(actor):
    direct = _runtime.client.direct
    return direct.routes.get(actor._actor_id) if direct is not None else None


def _wait_direct(actor, timeout=60):
    ray.get(actor.__ray_ready__.remote(), timeout=60)

    def alive():
        route = _route(actor)
        return route is not None and route.state == "alive"

    poll_until(alive, timeout, what="the actor's route")
    return _route(actor)


def _sent():
    return _runtime.client.request("status")["sent_messages"]


def _direct_calls(actor) -> int:
    return _runtime.client.request("direct_calls", {"actor_id": actor._actor_id})["calls"]


def test_calls_to_an_actor_on_another_host_go_direct_over_tcp_in_order(cluster):
    log = Log.options(resources={"nodeB": 0.1}).remote()
    route = _wait_direct(log)
    assert route.address.startswith("tcp://"), route.address  # not its ipc socket
    assert route.reply_to.startswith("tcp://"), route.reply_to
    sent0 = _sent()
    for i in range(500):
        assert ray.get(log.add.remote(i), timeout=30) == i
    refs = [log.add.remote(i) for i in range(500, 1000)]  # pipelined: order still holds
    assert ray.get(refs, timeout=60) == list(range(500, 1000))
    sent = _sent() - sent0
    # through the broker each call costs it at least an EXEC and an OBJ (2,000 messages)
    assert sent < 100, sent
    assert ray.get(log.entries.remote(), timeout=30)[-1000:] == list(range(1000))
    poll_until(lambda: _direct_calls(log) >= 1000, 30, what="the calls to be reported")


def test_an_actor_on_one_host_calls_an_actor_on_another_over_tcp(cluster):
    log = Log.options(resources={"nodeB": 0.1}).remote()
    relay = Relay.options(resources={"nodeA": 0.1}).remote()
    ray.get([log.__ray_ready__.remote(), relay.__ray_ready__.remote()], timeout=60)
    assert ray.get(relay.call.remote(log, 300), timeout=90) == list(range(300))
    address = ray.get(relay.tcp_route.remote(log), timeout=30)
    assert address is not None and address.startswith("tcp://"), address
    poll_until(lambda: _direct_calls(log) >= 250, 30, what="direct calls reported")


def test_kill_9_of_the_remote_actor_restarts_it_and_retries_the_calls(cluster):
    log = Log.options(resources={"nodeB": 0.1}, max_restarts=1, max_task_retries=-1).remote()
    _wait_direct(log)
    node_b = ray.get(log.node.remote(), timeout=30)
    pid = ray.get(log.pid.remote(), timeout=30)
    refs = [log.slow.remote(i, 0.05) for i in range(40)]
    assert ray.get(refs[0], timeout=30) == 0
    os.kill(pid, signal.SIGKILL)
    assert ray.get(refs, timeout=90) == list(range(40))  # retried on the new process
    assert ray.get(log.pid.remote(), timeout=30) != pid
    assert ray.get(log.node.remote(), timeout=30) == node_b
    route = _wait_direct(log)  # the caller learnt where it went: direct again, over tcp
    assert route.address.startswith("tcp://"), route.address
    sent0 = _sent()
    assert ray.get([log.add.remote(i) for i in range(200)], timeout=60) == list(range(200))
    assert _sent() - sent0 < 50


def test_cancel_a_running_call_on_another_host(cluster, tmp_path):
    log = Log.options(resources={"nodeB": 0.1}).remote()
    _wait_direct(log)
    started = str(tmp_path / "started")
    first = log.slow.remote(1, 60, started)
    poll_until(lambda: os.path.exists(started), 30, interval=0.1, what="the call to run")
    ray.cancel(first)
    with pytest.raises(TaskCancelledError):
        ray.get(first, timeout=60)
    assert ray.get(log.slow.remote(3, 0), timeout=30) == 3


def _handshake(address, keys) -> str:
    """Connect a PUSH to ``address`` with ``keys`` ({public, secret} or None: no CURVE);
    'ok' if the listener took the handshake, else the failure event's name."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        s.curve_serverkey = load_key_file()["server_public"].encode()
        s.curve_publickey, s.curve_secretkey = keys
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)
    try:
        s.connect(address)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if mon.poll(1000):
                ev = recv_monitor_message(mon)["event"]
                if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return "ok"
                return zmq.Event(ev).name
        return "no answer"
    finally:
        s.disable_monitor()
        mon.close(0)
        s.close(0)


def test_only_holders_of_the_cluster_key_reach_the_direct_listeners(cluster):
    log = Log.options(resources={"nodeB": 0.1}).remote()
    route = _wait_direct(log)
    keys = load_key_file()
    member = (keys["client_public"].encode(), keys["client_secret"].encode())
    stranger = zmq.curve_keypair()
    for address in (route.address, route.reply_to):  # the actor's, and our reply inbox
        assert _handshake(address, member) == "ok"
        assert _handshake(address, stranger) != "ok"
        assert _handshake(address, None) != "ok"  # plaintext: refused as well
    # a member that sends junk to either is dropped, and calls go on
    for address in (route.reply_to, route.address):
        s = zmq.Context.instance().socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 10_000)  # (sent once the handshake is done)
        s.curve_serverkey = keys["server_public"].encode()
        s.curve_publickey, s.curve_secretkey = member
        s.connect(address)
        try:
            for junk in ([b"not msgpack \xc1"], [b"\x92\x05\xc0"], [b"\x93\x47\x90\xa0"]):
                s.send_multipart(junk)
        finally:
            s.close()
    poll_until(lambda: _runtime.client.direct.dropped >= 3, 30, what="junk dropped")
    assert ray.get([log.add.remote(i) for i in range(50)], timeout=30) == list(range(50))


@pytest.fixture
def slow_broker_cluster(tmp_path_factory):
    """A cluster whose broker takes minutes to declare a silent node dead."""
    yield from _run_cluster(tmp_path_factory, "xhost-dead", ZRAY_NODE_TIMEOUT_S="300")


def test_a_dead_node_is_noticed_from_the_broken_direct_connection(slow_broker_cluster,
                                                                   tmp_path):
    log = Log.options(resources={"nodeB": 0.1}).remote()
    _wait_direct(log)
    started = str(tmp_path / "started")
    slow = log.slow.remote(1, 120, started)
    poll_until(lambda: os.path.exists(started), 30, interval=0.1, what="the call to run")
    # The whole of node B dies at once (its executors die with their agent). The broker
    # hears nothing for NODE_TIMEOUT_S (300 s); the caller's connection breaks now.
    kill_tree(slow_broker_cluster.procs.procs["nodeB"].pid)
    start = time.monotonic()
    with pytest.raises(RayActorError) as info:
        ray.get(slow, timeout=100)
    assert type(info.value).__name__ == "ActorUnavailableError", info.value
    assert "connection to the actor broke" in str(info.value)
    assert time.monotonic() - start < 100  # (the broker would have said so after 300 s)
    route = _route(log)
    assert route.state != "alive"  # new calls wait for the broker's word, not direct
