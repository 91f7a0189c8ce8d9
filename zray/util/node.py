"""``get_node_ip_address``: the address of the node this process runs on, Ray's
``ray.util.get_node_ip_address``.

With no argument it is worked out as the node agent works out the address it
reports (``nodes()[i]["NodeManagerAddress"]``), so the two agree. Given an
``address`` ("host:port"), it is the address of the interface that routes to that
host, as Ray does (a UDP socket is connected, which sends nothing).
"""

from __future__ import annotations

import socket
from typing import Optional


def get_node_ip_address(address: Optional[str] = None) -> str:
    """The IP address of this node (as ``ray.nodes()`` reports it), or, with
    ``address="host:port"``, of this machine's interface that routes to that host."""
    if address is None:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"address must be 'host:port', got {address!r}")
    host, _, port = address.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"address must be 'host:port', got {address!r}") from None
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host.strip("[]"), port_number))
            return s.getsockname()[0]
        except OSError:  # no route there: this host's loopback, as Ray falls back to
            return "127.0.0.1" if family == socket.AF_INET else "::1"


__all__ = ["get_node_ip_address"]
