"""The zray dashboard: a separate, read-only web process beside the broker.

::

    browser / zray job CLI / JobSubmissionClient
        |  HTTP (stdlib http.server, a bounded thread pool)
        v
    DashboardServer (server.py) --- routes ---> static page (static/index.html)
        |        |                               /api/...  JSON (every page reads these)
        |        |                               /metrics  Prometheus text (metrics_export.py)
        |        '--> JobManager (jobs.py): job drivers it spawns on this host, logs in files
        v
    ClusterView (view.py): one "cli" client of the broker; each REQ answer is cached
        for ``ttl`` seconds, so any number of open pages asks the broker at most a few
        times a second, and only read-only ops whose cost is a walk of its tables.

The broker never waits on the dashboard: the dashboard is just another client
sending REQs, answered between the broker's other messages.
"""

DEFAULT_PORT = 8265


def default_port() -> int:
    """$ZRAY_DASHBOARD_PORT (or Ray's RAY_DASHBOARD_PORT), else 8265."""
    import os

    text = os.environ.get("ZRAY_DASHBOARD_PORT") or os.environ.get("RAY_DASHBOARD_PORT")
    if not text:
        return DEFAULT_PORT
    try:
        port = int(text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ValueError(f"ZRAY_DASHBOARD_PORT must be a port number, got {text!r}") from None
    return port
