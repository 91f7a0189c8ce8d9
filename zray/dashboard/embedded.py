"""The dashboard beside a local cluster that ``zray.init()`` starts.

``include_dashboard=True`` starts it; Ray's default ``None`` ("start it if its
dependencies are installed") does *not* here: every ``init()`` without an
address would then also bind port 8265, so two local clusters on one machine
(test suites, several notebooks) would fight over it, and each would pay for one
more Python process on start. Ask for it, or run ``zray dashboard``.

It starts in the background: ``init()`` waits neither for the process to be
forked nor for it to listen (its start-up stays that of the broker and node). Its token is made here (and logged
with its URL at INFO), so init() need not wait to learn it. Its output goes to
``<session>/logs/dashboard.out``; it stops with the cluster and dies with the
driver (``ZRAY_EXIT_WITH_PARENT``), like the broker and the node agent.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading

log = logging.getLogger("zray")


def check_dashboard_options(kwargs: dict, local: bool) -> None:
    """Refuse what init() could not honour about the dashboard, naming the option."""
    inc = kwargs.get("include_dashboard")
    if inc is not None and not isinstance(inc, bool):
        raise ValueError(f"include_dashboard must be a bool or None, got {inc!r}")
    host = kwargs.get("dashboard_host")
    port = kwargs.get("dashboard_port")
    if host is not None and (not isinstance(host, str) or not host):
        raise ValueError(f"dashboard_host must be a host name or address, got {host!r}")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 <= port <= 65535):
        raise ValueError(f"dashboard_port must be a port number (0..65535), got {port!r}")
    if inc:
        if not local:
            raise ValueError("include_dashboard=True applies to a local cluster that init() "
                             "starts; for a running cluster run `zray dashboard --address ...`")
        from zray.dashboard import default_port

        default_port()  # a bad $ZRAY_DASHBOARD_PORT is an error now, not in the background
        return
    what = "include_dashboard=False" if inc is False else "the default include_dashboard=None"
    if port is not None:
        raise ValueError(f"dashboard_port={port!r} with {what}: zray starts a dashboard only "
                         "with include_dashboard=True (or `zray dashboard`)")
    if host not in (None, "127.0.0.1", "localhost"):
        raise ValueError(f"dashboard_host={host!r} with {what}: zray starts a dashboard only "
                         "with include_dashboard=True (or `zray dashboard`)")


def start_dashboard(cluster, kwargs: dict) -> str:
    """Start the dashboard process for ``cluster`` (not waiting for it); its host:port."""
    from zray._cluster import _pythonpath, _Spawner
    from zray.dashboard import default_port

    host = kwargs.get("dashboard_host") or "127.0.0.1"
    port = kwargs.get("dashboard_port")
    port = default_port() if port is None else port
    token = secrets.token_urlsafe(24)
    env = dict(os.environ)
    env.update({"ZRAY_EXIT_WITH_PARENT": str(os.getpid()), "PYTHONPATH": _pythonpath(),
                "ZRAY_DASHBOARD_TOKEN": token})
    cmd = [sys.executable, "-m", "zray.dashboard", "--address", cluster.address,
           "--dashboard-host", host, "--port", str(port), "--session-dir", cluster.session_dir]
    def spawn():
        with open(os.path.join(cluster.session_dir, "logs", "dashboard.out"), "ab") as out:
            proc = _Spawner.popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, close_fds=True)
        cluster.procs.append(proc)  # LocalCluster.stop() stops it with the others
        if len(cluster.procs) == 1 or not cluster.alive():  # the cluster stopped meanwhile
            proc.kill()
            proc.wait()

    threading.Thread(target=spawn, name="zray-dashboard-start", daemon=True).start()
    log.info("zray dashboard starting at http://%s:%s/?token=%s", host, port, token)
    return f"{host}:{port}"
