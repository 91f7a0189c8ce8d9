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
"""

from __future__ import annotations

import json
import os
import stat

import zmq

from zray._procutil import UnsafePathError, private_dir


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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f)
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

    def callback(self, domain, key):
        return key == self.key
