"""Direct actor calls across hosts: the tcp listeners, their keys, and which host is which.

::

    actor's executor: PULL bound on ipc://<store>/a-<cid> (same host, no CURVE)
                      and, on a tcp cluster, on tcp://*:<port> as well (CURVE server,
                      the cluster key) --actor_listen {address, tcp_address}--> broker
    caller on another host (host_id() differs from the ROUTE's host):
        its reply PULL binds tcp too (CURVE server) on its first such route
        PUSH --CURVE client--> tcp_address: DCALL, reply_to = its tcp address
    actor's executor PUSH --CURVE client--> the caller's tcp reply address: DDONE

Both ends of a cross-host call listen and both connect, as each end of a
same-host call does over ipc: a call is one PUSH one way, its result one PUSH
back, with no node agent in between (a forwarding agent would add a hop and a
copy on each side; the executor's own listener is the shorter path).

One ZeroMQ socket listens on both transports: libzmq takes a listener's
options when it binds, so the ipc endpoint (bound first) keeps the NULL
mechanism (the private store dir already limits it to this user) and the tcp
one (bound after ``curve_server`` is set) speaks CURVE only. Who may connect is
checked by one ZAP handler per ZeroMQ context (``ZapHandlers``): the cluster's
client key, as the broker admits (zray/_security.py); the listeners enforce
their ZAP domain, so none admits anyone once the handler has stopped. On an ``--insecure``
cluster (``ZRAY_INSECURE``) the tcp listeners are plaintext, as the broker's.

Listeners bind every interface, IPv6 as well as IPv4 (``zmq.IPV6``), and are
announced at this host's address on the route to the broker (``route_ip``).
``ZRAY_HOST_ID`` names the host for the same-host test (default: the
hostname): processes that share a hostname but not a filesystem (containers)
set it apart; the tests use it to make one machine look like several.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref

import zmq

from zray._security import ServerAuth, _Allow, load_key_file, needs_curve, secure_client

log = logging.getLogger("zray.direct")
_DOMAIN = "zray-direct"  # the ZAP domain of the direct-call listeners


def host_id() -> str:
    """This host's name for the same-host test (ipc reaches only the same host)."""
    return os.environ.get("ZRAY_HOST_ID") or socket.gethostname()


def route_ip(broker_address: str, fallback: str = "") -> str:
    """This host's address on the route to the broker (the interface peers on the
    broker's network reach), bracketed if IPv6; ``fallback`` (default: this host's
    name's address) if the system cannot say. No packet is sent."""
    host = broker_address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            ip = s.getsockname()[0]
    except OSError:
        ip = ""
    if ip in ("", "0.0.0.0", "::"):
        if fallback:
            return fallback
        try:
            ip = socket.gethostbyname(socket.gethostname())
        except OSError:
            ip = "127.0.0.1"
    return f"[{ip}]" if ":" in ip else ip


class ZapHandlers:
    """One CURVE authenticator per ZeroMQ context (libzmq allows one ZAP handler per
    context), started on a context's first tcp listener and stopped before it ends."""

    _lock = threading.Lock()
    _by_ctx: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def curve_server(cls, ctx: zmq.Context, sock: zmq.Socket) -> None:
        """Make ``sock``'s next binds CURVE-only, admitting holders of the cluster key."""
        keys = load_key_file()
        # A domain, enforced: with no ZAP handler (stopped at close) libzmq would let any
        # CURVE key in; with one enforced it lets none in.
        sock.zap_domain = _DOMAIN.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        with cls._lock:
            auth = cls._by_ctx.get(ctx)
            if auth is None:
                auth = cls._by_ctx[ctx] = ServerAuth(ctx, sock, keys)
                auth.auth.configure_curve_callback(
                    domain=_DOMAIN, credentials_provider=_Allow(keys["client_public"].encode()))
                return
        sock.curve_server = True
        sock.curve_secretkey = keys["server_secret"].encode()
        sock.curve_publickey = keys["server_public"].encode()

    @classmethod
    def stop(cls, ctx: zmq.Context) -> None:
        with cls._lock:
            auth = cls._by_ctx.pop(ctx, None)
        if auth is not None:
            auth.stop()


def listen_tcp(ctx: zmq.Context, sock: zmq.Socket, broker_address: str) -> str:
    """Bind ``sock`` (already bound on ipc, if at all) on tcp too, CURVE unless the
    cluster is insecure; the address other hosts reach it at."""
    if needs_curve(broker_address):
        ZapHandlers.curve_server(ctx, sock)
    sock.setsockopt(zmq.IPV6, 1)
    port = sock.bind_to_random_port("tcp://*")
    return f"tcp://{route_ip(broker_address)}:{port}"


def connect(sock: zmq.Socket, address: str) -> None:
    """Connect ``sock`` to a direct-call listener: a CURVE client of the cluster key
    over tcp (unless the cluster is insecure), plain over ipc."""
    if address.startswith("tcp://"):
        sock.setsockopt(zmq.IPV6, 1)
        secure_client(sock, address)
    sock.connect(address)
