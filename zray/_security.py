"""CURVE authentication and encryption for every TCP socket of a cluster.

Whoever can connect to a broker can run code on every node, so a TCP cluster
is closed by default: ``zray broker`` creates a *cluster key file* (mode
0600) holding a server key pair and a client key pair. The broker accepts only
connections that prove they hold the client secret key; every node agent,
executor and driver that connects over TCP needs a copy of that file (copy it
to the same path on each host, or point ``ZRAY_KEY_FILE`` / ``--key-file`` at
it). Traffic is encrypted with the same keys.

The embedded local cluster listens on an ``ipc://`` socket inside a private
0700 directory instead, so it needs no keys. ``ZRAY_INSECURE=1`` (or ``zray
broker --insecure``) turns CURVE off for trusted networks.

The key file is only trusted when it is a regular file (not a symlink) owned by
this user and readable by no one else; ``~/.zray`` is a private directory (see
``zray._procutil.private_dir``).

A broker that refuses a client's key does not answer it at all, and libzmq
neither retries nor reports such a connection except as a socket-monitor
event. ``HandshakeWatch`` listens for those events while a client waits for
the broker's WELCOME, so a wrong key or a missing one fails within moments
with a ConnectionError that says so, instead of a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time

import zmq

from zray._procutil import UnsafePathError, private_dir

log = logging.getLogger("zray.security")


def _default_key_file() -> str:
    return os.path.expanduser("~/.zray/cluster.key")


def key_file_path() -> str:
    return os.environ.get("ZRAY_KEY_FILE") or _default_key_file()


def _key_dir(path: str) -> None:
    """~/.zray (and any dir we create for a key file) is private to this user."""
    parent = os.path.dirname(os.path.abspath(path))
    if path == _default_key_file() or not os.path.exists(parent):
        private_dir(parent)


def insecure() -> bool:
    return os.environ.get("ZRAY_INSECURE", "") not in ("", "0", "false", "no")


def needs_curve(address: str) -> bool:
    return address.startswith("tcp://") and not insecure()


def create_key_file(path: str | None = None) -> dict:
    """Load the cluster key file, creating it (0600) with fresh key pairs if missing."""
    path = path or key_file_path()
    if os.path.exists(path):
        return load_key_file(path)
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support; run with ZRAY_INSECURE=1 "
                           "on a trusted network")
    _key_dir(path)
    spub, ssec = zmq.curve_keypair()
    cpub, csec = zmq.curve_keypair()
    keys = {"server_public": spub.decode(), "server_secret": ssec.decode(),
            "client_public": cpub.decode(), "client_secret": csec.decode()}
    # Written whole under a temporary name, then linked into place: link() fails if the
    # file exists, so of two brokers starting at once on a fresh host one key wins and
    # both use it, and no reader ever sees a half-written file.
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_key_file(path)  # another process created it first: use its keys
    finally:
        os.unlink(tmp)
    return keys


def load_key_file(path: str | None = None, wait: float = 0.0) -> dict:
    """Read the key file; with ``wait``, give a broker starting on this host that long
    to create it first."""
    import time

    path = path or key_file_path()
    deadline = time.monotonic() + wait
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    if path == _default_key_file() and os.path.isdir(os.path.dirname(path)):
        _key_dir(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ConnectionError(
            f"this cluster uses CURVE authentication but there is no key file at {path}: copy "
            "the broker's key file there (or set ZRAY_KEY_FILE), or run everything with "
            "ZRAY_INSECURE=1 on a trusted network") from None
    except OSError:
        if os.path.islink(path):
            raise UnsafePathError(f"refusing to use the cluster key file {path}: it is a "
                                  f"symlink; copy the key file there instead") from None
        raise
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"cluster key file {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise UnsafePathError(f"refusing to use the cluster key file {path}: it belongs to "
                                  f"uid {st.st_uid}, not to this user (uid {os.getuid()})")
        if st.st_mode & 0o077:
            raise UnsafePathError(f"cluster key file {path} must be readable by its owner "
                                  f"only (chmod 600 {path})")
        return json.load(f)


def secure_client(sock: zmq.Socket, address: str, wait: float = 0.0) -> None:
    """Make ``sock`` a CURVE client of the broker at ``address`` (before connect)."""
    if not needs_curve(address):
        return
    keys = load_key_file(wait=wait)
    sock.curve_serverkey = keys["server_public"].encode()
    sock.curve_publickey = keys["client_public"].encode()
    sock.curve_secretkey = keys["client_secret"].encode()


class ServerAuth:
    """CURVE server side: encrypt, and admit only holders of the cluster's client key."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, keys: dict):
        from zmq.auth.thread import ThreadAuthenticator

        allowed = keys["client_public"].encode()
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=_Allow(allowed))
        sock.curve_server = True
        sock.curve_secretkey = keys["server_secret"].encode()
        sock.curve_publickey = keys["server_public"].encode()

    def stop(self):
        self.auth.stop()


class _Allow:
    def __init__(self, key: bytes):
        self.key = key
        self.refused = 0
        self.last_log = 0.0

    def callback(self, domain, key):
        if key == self.key:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self.last_log > 10.0:  # one line per 10 s, however many try
            self.last_log = now
            log.warning("refused a connection whose CURVE key is not this cluster's "
                        "(%d so far)", self.refused)
        return False


# ------------------------------------------------- client side: refused handshakes
_FAILED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# A connection dropped mid-handshake without a reason may be a glitch; this many
# in a row (libzmq retries every 100 ms) mean the broker cannot read our hello.
_NO_DETAIL_LIMIT = 3


class HandshakeWatch:
    """Socket-monitor events of one client socket's handshakes with the broker.

    Create it before the socket connects: libzmq reports a refused key or a
    security mismatch once and does not retry the connection.
    """

    def __init__(self, sock: zmq.Socket, address: str):
        self.sock = sock
        self.address = address
        self.mon = sock.get_monitor_socket(_FAILED_EVENTS)
        self.no_detail = 0

    def failure(self) -> str | None:
        """Read the pending events; the reason the broker refused us, if it did."""
        from zmq.utils.monitor import recv_monitor_message

        while self.mon.poll(0):
            ev = recv_monitor_message(self.mon)
            reason = self._reason(ev["event"], ev["value"])
            if reason:
                return reason
        return None

    def _reason(self, event: int, value: int) -> str | None:
        address, curve = self.address, needs_curve(self.address)
        key = key_file_path()
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"authentication failed: the zray broker at {address} refused this "
                    f"client's key (status {value}); the key file {key} is not this cluster's. "
                    f"Copy the broker's key file there (or set ZRAY_KEY_FILE).")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                if curve:
                    return (f"the zray broker at {address} does not use CURVE authentication "
                            f"(started with --insecure?) but this client does: set "
                            f"ZRAY_INSECURE=1 here too, or restart the broker without --insecure")
                return (f"authentication failed: the zray broker at {address} requires CURVE "
                        f"authentication but this client connects without it (ZRAY_INSECURE "
                        f"is set): unset ZRAY_INSECURE and copy the broker's key file to {key}")
            return (f"the handshake with {address} failed (ZMTP protocol error {value:#x}): "
                    f"is it a zray broker, with the same security settings as this client?")
        self.no_detail += 1
        if self.no_detail >= _NO_DETAIL_LIMIT:
            if curve:
                return (f"authentication failed: the zray broker at {address} dropped every "
                        f"CURVE handshake: the key file {key} is probably not this cluster's "
                        f"(its server key does not match; copy the broker's key file there or "
                        f"set ZRAY_KEY_FILE), or the broker runs without CURVE (--insecure).")
            return (f"authentication failed: the zray broker at {address} dropped every "
                    f"handshake; it probably requires CURVE authentication, which this client "
                    f"does not use (ZRAY_INSECURE is set): unset ZRAY_INSECURE and copy the "
                    f"broker's key file to {key}")
        return None

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.mon.close(0)


def watch_handshake(sock: zmq.Socket, address: str) -> HandshakeWatch | None:
    """A HandshakeWatch for a TCP client socket (call before connect); None otherwise."""
    return HandshakeWatch(sock, address) if address.startswith("tcp://") else None


def await_reply(sock: zmq.Socket, watches: list, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``sock`` to be readable. Raises ConnectionError at
    once when one of ``watches`` reports that the broker refused the handshake.
    The watches are closed on return."""
    watches = [w for w in watches if w is not None]
    try:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        for w in watches:
            poller.register(w.mon, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready = dict(poller.poll(max(1, int(remaining * 1000))))
            if sock in ready:
                return True
            for w in watches:
                if w.mon in ready:
                    reason = w.failure()
                    if reason:
                        raise ConnectionError(reason)
    finally:
        for w in watches:
            w.close()
