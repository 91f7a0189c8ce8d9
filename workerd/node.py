"""The worker daemon (node agent): one per machine.

::

    broker --SPAWN/KILL_EXEC/SHUTDOWN--> node agent --fork/exec--> executor processes
    broker <--NODE_HELLO/EXEC_DIED/HEARTBEAT-- node agent <--waitpid-- (exits)

It advertises the node's capacity (CPU, GPU ids, memory, object store memory,
custom resources, and as in Ray ``accelerator_type:<type>`` of its NVIDIA GPUs)
and its labels (``--labels``, plus ``ray.io/node-id`` and, with GPUs,
``ray.io/accelerator-type``),
keeps a warm pool of executor processes (``prestart``, default one per CPU),
starts more when the broker asks, kills one when the broker says so (force
cancel, ``zray.kill``) and reports every executor exit with its exit code so
the broker can retry tasks or restart actors. Executors connect to the broker
themselves; task traffic never passes through this process.

Store work the broker asks for (SPILL, FREE, FETCH, STORE) runs on a thread of
its own (``workerd.storeio``) so that a node spilling gigabytes keeps its
heartbeats; its replies go out through this loop. Blobs move between nodes
directly (``workerd.peer``): the store is served to peers on a socket of its
own, announced in NODE_HELLO, and PULLs from the broker run on puller threads.

Executors die with the agent (PR_SET_PDEATHSIG); on SIGTERM the agent
terminates them and exits. With ``--exit-with-parent`` (the embedded local
cluster) the agent itself dies with the driver that started it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import zmq

from workerd import held
from workerd.logserve import LogServer
from workerd.peer import PeerServer, Puller
from workerd.storeio import StoreIO
from zray import _logfiles
from zray import _protocol as P
from zray._procutil import bytecode_env, detect_accelerator_type, signal_wakeup_fd
from zray._protocol import Msg
from zray._security import secure_client, watch_handshake
from zray._store import ObjectStore

log = logging.getLogger("zray.node")


class NodeAgent:
    def __init__(self, address: str, num_cpus: float, gpu_ids: list, resources: dict,
                 session_dir: str, node_id: bytes | None = None, prestart: int | None = None,
                 labels: dict | None = None, memory: int | None = None,
                 object_store_memory: int | None = None):
        self.address = address
        self.node_id = node_id or os.urandom(8)
        self.session_dir = session_dir
        self.log_dir = os.path.join(session_dir, "logs") if session_dir else ""
        self.procs: dict[bytes, subprocess.Popen] = {}
        self.tokens: dict[bytes, bytes] = {}  # cid -> spawn token: vouched again after a restart
        self.epoch = None  # the broker incarnation that welcomed us
        self.running = True
        self.wake_fd = None  # signal_wakeup_fd() once serve() runs
        res = {"CPU": float(num_cpus)}
        if gpu_ids:
            res["GPU"] = float(len(gpu_ids))
        res["memory"] = float(memory if memory is not None else psutil.virtual_memory().total * 0.7)
        total_mem = psutil.virtual_memory().total
        self.store_limit = int(object_store_memory or total_mem * 0.3)
        res["object_store_memory"] = float(self.store_limit)  # what actors may ask for
        self.labels = {"ray.io/node-id": self.node_id.hex(), **(labels or {})}
        accelerator = detect_accelerator_type() if gpu_ids else None
        if accelerator:
            res[f"accelerator_type:{accelerator}"] = 1.0
            self.labels["ray.io/accelerator-type"] = accelerator
        res.update({k: float(v) for k, v in (resources or {}).items()})
        res[f"node:{self._ip()}"] = 1.0
        self.resources = res
        self.gpu_ids = list(gpu_ids)
        self.prestart = int(num_cpus) if prestart is None else prestart
        self.prestart = max(0, min(self.prestart, 64))
        self.store = ObjectStore(self.node_id, self.store_limit)
        self.store.create_dirs()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, P.node_ident(self.node_id))
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 500)
        secure_client(self.sock, address, wait=15.0)
        self.watch = watch_handshake(self.sock, address)  # until WELCOME: a refused key
        self.sock.connect(address)
        self.last_broker = time.monotonic()
        self.welcomed = False
        self.errors = 0  # messages whose handling raised
        self.refusal = ""  # why the broker refused this node, if it did
        self.io = StoreIO(self.store, self.ctx)  # spills, frees, blobs: off this loop
        self.logs = LogServer(self.log_dir, self.ctx)  # LOG_READ: off this loop too
        # Node-to-node blobs (workerd/peer.py): this store served to peers, pulls from theirs.
        self.peer = PeerServer(self.store, self.node_id, address, self._ip())
        self.puller = Puller(self.store, self.node_id, address, self.io)

    @staticmethod
    def _ip() -> str:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"

    def hello(self):
        info = {
            "resources": P.to_units(self.resources),
            "gpu_ids": self.gpu_ids,
            "hostname": socket.gethostname(),
            "address": self._ip(),
            "pid": os.getpid(),
            "labels": self.labels,
            "prestart": self.prestart,
            "store_limit": self.store_limit,
            "log_dir": self.log_dir,  # where `zray logs` finds this node's files
            "peer": self.peer.info(),  # where peers pull blobs from (and the ticket secret)
        }
        self.sock.send(P.encode(P.NodeHello(P.VERSION, self.node_id, info)))

    def spawn(self, n: int = 1):
        for _ in range(n):
            cid = os.urandom(P.ID_LEN)
            token = os.urandom(16)
            # Vouch for it first: the broker accepts an executor's HELLO only with the
            # token its node announced (the executor's HELLO comes after its start-up).
            self.sock.send(P.encode(P.ExecSpawned(cid, token)))
            self.tokens[cid] = token
            env = bytecode_env(dict(os.environ))
            env.update({
                "ZRAY_EXEC_ID": cid.hex(),
                "ZRAY_EXEC_TOKEN": token.hex(),
                "ZRAY_NODE_ID": self.node_id.hex(),
                "ZRAY_ADDRESS": self.address,
                "ZRAY_SESSION_DIR": self.session_dir,
                "ZRAY_PARENT_PID": str(os.getpid()),
                "PYTHONUNBUFFERED": "1",
            })
            out = subprocess.DEVNULL
            if self.log_dir:  # owner-only, appended to (rotated by the executor itself)
                out = os.open(_logfiles.executor_log(self.log_dir, cid.hex()),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            try:
                p = subprocess.Popen([sys.executable, "-m", "workerd.executor"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     close_fds=True)
            finally:
                if out is not subprocess.DEVNULL:
                    os.close(out)
            self.procs[cid] = p
            if self.log_dir:
                try:
                    _logfiles.record_executor(self.log_dir, cid.hex(), p.pid)
                except OSError as e:
                    log.warning("cannot record executor %s in the log index: %s", cid.hex(), e)

    def rejoin(self):
        """The broker does not know us (it restarted): introduce this node again and vouch
        again for every executor still running, so actor processes can re-attach."""
        log.warning("the broker does not know this node (it restarted?): saying hello again")
        self.last_broker = time.monotonic()
        self.hello()
        for cid, p in self.procs.items():
            if p.poll() is None and cid in self.tokens:
                self.sock.send(P.encode(P.ExecSpawned(cid, self.tokens[cid])))

    def kill(self, cid: bytes):
        p = self.procs.get(cid)
        if p is not None and p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass

    def reap(self):
        for cid, p in list(self.procs.items()):
            code = p.poll()
            if code is not None:
                del self.procs[cid]
                self.tokens.pop(cid, None)
                self.sock.send(P.encode(P.ExecDied(cid, code)))
                try:  # its lease listener (workerd/lease.py), left by a process killed
                    os.unlink(os.path.join(self.store.dir, f"t-{cid.hex()}"))
                except OSError:
                    pass

    def handle(self, m, msg) -> None:
        """One message from the broker (``msg``: its frames, header first)."""
        t = m.TYPE
        if t == Msg.WELCOME:
            if "rehello" in m.info:
                self.rejoin()
                return
            if "error" in m.info:
                log.error("the broker refused this node: %s", m.info["error"])
                self.running = False
                return
            # Executors start only once the broker knows this node,
            # so their HELLO never arrives before the node's.
            if not self.welcomed:
                self.welcomed = True
                if self.watch is not None:
                    self.watch.close()
                    self.watch = None
                self.spawn(self.prestart)
            elif m.info.get("epoch") != self.epoch:
                # A restarted broker took us back: its pool expects `prestart` fresh
                # executors (the old pool processes exit; actor processes re-attach).
                log.info("rejoined the restarted broker")
                self.spawn(self.prestart)
            self.epoch = m.info.get("epoch")
        elif t == Msg.SPAWN:
            self.spawn(max(0, min(m.count, 64)))
        elif t == Msg.KILL_EXEC:
            self.kill(m.cid)
        elif t == Msg.FETCH:
            self.io.submit("fetch", m.oid, m.dest)
        elif t == Msg.STORE and len(msg) == 2:
            self.io.submit("store", m.oid, m.codec, msg[1])
        elif t == Msg.PULL:
            self.puller.submit(m)
        elif t == Msg.FREE:
            self.io.submit("free", m.oids)
        elif t == Msg.SPILL:
            self.io.submit("spill", m.oids)
        elif t == Msg.LOG_READ:  # a client reads our log files through the broker
            refused = self.logs.submit(m)
            if refused is not None:
                self.sock.send(refused)
        elif t == Msg.SHUTDOWN:
            log.info("broker asked this node to shut down")
            self.running = False

    def serve(self):
        self.hello()
        last_hb = time.monotonic()
        log.info("node %s up: %s, %d executors prestarted, peers pull blobs at %s",
                 self.node_id.hex(), self.resources, self.prestart, self.peer.address)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.io.pipe, zmq.POLLIN)
        poller.register(self.logs.pipe, zmq.POLLIN)
        self.wake_fd = signal_wakeup_fd()  # (a SIGTERM ends the poll: see stop)
        if self.wake_fd is not None:
            poller.register(self.wake_fd, zmq.POLLIN)
        while self.running:
            if self.watch is not None and self.refused():
                break
            ready = dict(poller.poll(200))
            if self.io.pipe in ready:
                self.io.forward(self.sock)
            if self.logs.pipe in ready:
                self.logs.forward(self.sock)
            if self.sock in ready:
                while True:
                    try:
                        msg = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.last_broker = time.monotonic()
                    try:
                        m = P.decode(msg[0])
                    except P.ProtocolError as e:
                        log.warning("dropping malformed message: %s", e)
                        continue
                    try:
                        self.handle(m, msg)
                    except Exception:  # one bad message must not take the node down
                        self.errors += 1
                        if self.errors <= 10 or self.errors % 1000 == 0:
                            log.exception("error handling %s (%d so far)", m.TYPE.name,
                                          self.errors)
            self.reap()
            now = time.monotonic()
            if now - last_hb >= P.HEARTBEAT_S:
                last_hb = now
                self.sock.send(P.encode(P.Heartbeat()))
                if now - self.last_broker > 3 * P.NODE_TIMEOUT_S:
                    # The broker restarted or was gone a long time: introduce ourselves again.
                    log.warning("no word from the broker for %.0fs: re-registering",
                                now - self.last_broker)
                    self.last_broker = now
                    self.hello()
        self.shutdown()

    def refused(self) -> bool:
        """True (and logged) if the broker refused this node's key or its absence."""
        reason = self.watch.failure()
        if reason is None:
            return False
        log.error("cannot join the cluster: %s", reason)
        self.refusal = reason
        self.running = False
        return True

    def stop(self, *_):
        self.running = False  # (the byte in wake_fd stays: the poll retried returns at once)

    def shutdown(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 2
        for p in self.procs.values():
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        if self.watch is not None:
            self.watch.close()
        self.puller.close()
        self.peer.close()
        self.io.close()
        self.logs.close()
        self.sock.close(linger=100)
        self.ctx.term()
        self.store.destroy()


def run(address, num_cpus, gpu_ids, resources, session_dir, node_id=None, prestart=None,
        labels=None, memory=None, object_store_memory=None):
    try:  # (our executors read it at start: a bad value would make each of them die)
        held.read_env()
        from workerd import lease  # (ZRAY_TASK_LEASE*: read at import)

        lease.read_env()
    except ValueError as e:
        raise SystemExit(f"zray worker: {e}") from None
    agent = NodeAgent(address, num_cpus, gpu_ids, resources, session_dir, node_id, prestart,
                      labels, memory, object_store_memory)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    agent.serve()
    if agent.refusal:
        raise SystemExit(f"zray worker: {agent.refusal}")
