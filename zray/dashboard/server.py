"""The dashboard's HTTP server: the page, the ``/api/`` JSON routes, ``/metrics``
and the job routes (Ray's job REST API: ``/api/jobs/...``).

Requests are served by a bounded pool of threads (``POOL``); broker answers come
through ``ClusterView``'s cache.

Every route but the bare page needs the dashboard's token, as the broker needs the
cluster key: loopback is reachable by every local user, the API shows tasks' errors
and logs, and a job runs code on the head. The token is random per start, written
owner-only to ``token_path(port)`` (or given in ``$ZRAY_DASHBOARD_TOKEN``), and
sent as ``Authorization: Bearer <token>`` (the CLI, ``JobSubmissionClient``,
Prometheus' ``authorization.credentials_file``) or, for a browser, as a cookie set
by opening ``/?token=<token>`` once (the URL the dashboard prints).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

from zray.dashboard import DEFAULT_PORT
from zray.dashboard.jobs import JobError, JobManager
from zray.dashboard.view import ClusterView, LogFiles

log = logging.getLogger("zray.dashboard")

POOL = 8
COOKIE = "zray_dashboard_token"
MAX_BODY = 1 << 20
IDLE_TIMEOUT_S = 30.0  # a connection silent this long is closed (frees its pool thread)
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def token_path(port: int) -> str:
    """Where the dashboard on ``port`` keeps its job-submission token (owner-only)."""
    from zray._procutil import private_dir, user_tmp_dir

    return os.path.join(private_dir(user_tmp_dir()), f"dashboard-{port}.token")


def read_token(port: int) -> str | None:
    try:
        with open(token_path(port)) as f:
            return f.read().strip() or None
    except OSError:
        return None


class _PooledHTTPServer(socketserver.ThreadingMixIn, HTTPServer):
    """HTTPServer whose requests run on a fixed pool of threads, not one thread each."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, pool: int):
        self.pool = ThreadPoolExecutor(pool, thread_name_prefix="dashboard-http")
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        self.pool.submit(self.process_request_thread, request, client_address)

    def server_close(self):
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class DashboardServer:
    def __init__(self, address: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 session_dir: str | None = None, ttl: float = 0.5,
                 idle_timeout: float = IDLE_TIMEOUT_S):
        from zray._client import Client
        from zray._procutil import new_session_dir, private_dir, write_private_file

        self.client = Client(address, kind="cli", connect_timeout=10)
        self._stopped = threading.Event()
        self.view = ClusterView(self.client, ttl)
        broker_dir = self.client.info.get("session_dir", "")
        self.session_dir = private_dir(session_dir) if session_dir else new_session_dir()
        from zray.dashboard.packages import PackageStore

        self.state_dir = _state_dir(broker_dir, address, session_dir)
        self.packages = PackageStore(os.path.join(self.state_dir, "packages"))
        self.jobs = JobManager(address, os.path.join(self.state_dir, "jobs"), self.packages)
        self.jobs.on_change = lambda records: self.client.request_nowait(
            "job_submissions", {"jobs": records})
        self.jobs.changed()  # (the records a previous dashboard left)
        head = os.path.join(broker_dir, "logs") if broker_dir else ""
        own = os.path.join(self.session_dir, "logs")
        self.logs = LogFiles(self.view, {"dashboard": "" if own == head else own,
                                         "jobs": self.jobs.dir})
        # A connection that sends nothing (an idle keep-alive, or a client that never
        # finishes its request) gives its pool thread back after ``idle_timeout``
        # seconds: without it, POOL such connections, token or not, stop the dashboard.
        if not (isinstance(idle_timeout, (int, float)) and 0 < idle_timeout <= 3600):
            raise ValueError(f"idle_timeout must be a number of seconds in (0, 3600], "
                             f"got {idle_timeout!r:.40}")
        handler = type("Handler", (_Handler,), {"dash": self, "timeout": idle_timeout})
        try:
            self.httpd = _PooledHTTPServer((host, port), handler, POOL)
        except OSError:
            self.view.close()
            raise
        self.host, self.port = self.httpd.server_address[:2]
        self.token = os.environ.get("ZRAY_DASHBOARD_TOKEN") or secrets.token_urlsafe(24)
        self.token_file = token_path(self.port)
        write_private_file(self.token_file, self.token)
        from zray.dashboard.metrics_export import registry_for

        self.registry = registry_for(self.view)

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    def serve_forever(self):
        threading.Thread(target=self._watch_broker, name="dashboard-broker-watch",
                         daemon=True).start()
        self.httpd.serve_forever(poll_interval=0.2)

    def _watch_broker(self):
        """The broker shut down or went silent: stop serving (and kill the jobs), as
        the broker's other clients do; ``zray start`` or ``init()`` starts a new one."""
        while not self.client.broker_gone:
            if self._stopped.wait(0.25):
                return
        log.error("the broker at %s is gone: the dashboard stops", self.client.address)
        self.stop()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="dashboard", daemon=True)
        t.start()
        return t

    def stop(self):
        self._stopped.set()
        threading.Thread(target=self.httpd.shutdown, daemon=True).start()

    def close(self):
        self.httpd.server_close()
        self.jobs.shutdown()
        try:
            if read_token(self.port) == self.token:
                os.unlink(self.token_file)
        except OSError:
            pass
        self.view.close()


class _Handler(BaseHTTPRequestHandler):
    dash: DashboardServer
    protocol_version = "HTTP/1.1"
    server_version = "zray-dashboard"

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    # ------------------------------------------------------------ replies
    def _send(self, code: int, body: bytes, ctype: str):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, code: int = 200):
        self._send(code, json.dumps(obj, default=_jsonable).encode(), "application/json")

    def _error(self, code: int, message: str):
        self._json({"error": message}, code)

    def _body(self):
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n < 0:  # read(-1) would read until the client closes, unbounded
            self.close_connection = True
            raise JobError("Content-Length must be a byte count >= 0")
        if n > MAX_BODY:
            self.close_connection = True
            raise JobError(f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(n) if n else b"{}"
        try:
            return json.loads(raw or b"{}")
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise JobError("the request body is not JSON (or nests too deep)") from None

    def _authorized(self) -> bool:
        token = self.dash.token.encode()
        got = self.headers.get("Authorization", "")
        if hmac.compare_digest(got.encode(), b"Bearer " + token):
            return True
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), token):
                return True
        self._error(401, "this dashboard needs its token: send 'Authorization: Bearer <token>'"
                         f" (the token is in {self.dash.token_file} on the head), or open "
                         "the URL it printed (/?token=...) in the browser")
        return False

    def _login(self, token: str):
        """``/?token=...``: a right token becomes a cookie, and the page loads without it."""
        if not hmac.compare_digest(token.encode(), self.dash.token.encode()):
            return self._error(401, "wrong dashboard token")
        self.send_response(303)
        self.send_header("Location", "/")
        self.send_header("Set-Cookie", f"{COOKIE}={self.dash.token}; HttpOnly; "
                                       "SameSite=Strict; Path=/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # ------------------------------------------------------------ routing
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PUT(self):
        self._route("PUT")

    def _route(self, method: str):
        url = urlsplit(self.path)
        path = url.path
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if method == "GET" and path in ("/", "/index.html"):
                if "token" in q:
                    return self._login(q["token"])
                return self._static("index.html", "text/html; charset=utf-8")
            if not self._authorized():
                return
            if method == "GET" and path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                return self._send(200, generate_latest(self.dash.registry), CONTENT_TYPE_LATEST)
            if path.startswith("/api/jobs"):
                return self._jobs(method, path[len("/api/jobs"):].strip("/"), q)
            if path.startswith("/api/packages/"):
                return self._package(method, path[len("/api/packages/"):])
            if method != "GET":
                return self._error(405, f"{method} {path}: not allowed")
            view = self.dash.view
            if path == "/api/version":
                from zray import __version__

                return self._json({"version": __version__, "ray_version": __version__})
            if path == "/api/cluster":
                return self._json(view.cluster())
            if path == "/api/nodes":
                return self._json(view.nodes())
            if path == "/api/tasks":
                return self._json(view.tasks(q.get("state") or None, _int(q, "limit", 1000)))
            if path == "/api/actors":
                return self._json(view.actors())
            if path == "/api/placement_groups":
                return self._json(view.placement_groups())
            if path == "/api/objects":
                return self._json(view.objects(_int(q, "top", 100)))
            if path.startswith("/api/v0/"):
                return self._state(path[len("/api/v0/"):].strip("/"), url.query)
            if path == "/api/drivers":
                return self._json(view.jobs())
            if path == "/api/logs":
                name = q.get("name")
                if name is None:
                    return self._json(self.dash.logs.list())
                source = q.get("source", "head")
                return self._json({"source": source, "name": name, "text": self.dash.logs.read(
                    source, name, _int(q, "tail", 65536))})
            return self._error(404, f"no route {path}")
        except (JobError, ValueError) as e:
            return self._error(400, str(e))
        except FileNotFoundError as e:
            return self._error(404, str(e))
        except Exception as e:  # the broker is gone or slow: say so, keep serving
            log.warning("%s %s failed: %s", method, path, e)
            return self._error(503, f"{type(e).__name__}: {e}")

    def _state(self, rest: str, query: str):
        """Ray's state routes: /api/v0/<resource>?limit=&detail=&filter=key=value
        (repeatable; key!=value too), /api/v0/<resource>/summarize."""
        view = self.dash.view
        parts = rest.split("/")
        if len(parts) == 2 and parts[1] == "summarize":
            return self._json(view.summary(parts[0]))
        if len(parts) != 1:
            return self._error(404, f"no route /api/v0/{rest}")
        q = parse_qs(query)
        filters = []
        for f in q.get("filter", []):
            key, op, value = f.partition("!=") if "!=" in f else f.partition("=")
            if not op or not key:
                raise ValueError(f"filter {f!r}: use key=value or key!=value")
            filters.append([key, op, value])
        limit = _int({k: v[-1] for k, v in q.items()}, "limit", 100)
        detail = (q.get("detail") or ["false"])[-1].lower() in ("1", "true", "yes")
        return self._json(view.state(parts[0], filters, limit, detail))

    def _package(self, method: str, rest: str):
        """Ray's package routes: GET (HEAD) answers 200 if the package is here, else 404;
        PUT uploads it (the zip as the body). See zray/dashboard/packages.py."""
        from zray.dashboard.packages import PROTOCOL, max_bytes, sha_of_name

        protocol, _, name = rest.partition("/")
        if protocol != PROTOCOL:
            return self._error(404, f"no package protocol {protocol!r:.40}: use {PROTOCOL}")
        sha = sha_of_name(name)
        store = self.dash.packages
        if method == "GET":
            if store.has(sha):
                return self._json({"exists": True})
            return self._error(404, f"Package {name} does not exist")
        if method != "PUT":
            return self._error(405, f"{method} /api/packages: not allowed")
        try:
            n = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            n = -1
        if n < 0:
            return self._error(411, "a package upload needs a Content-Length")
        if n > max_bytes():
            self.close_connection = True
            return self._error(413, f"package of {n} bytes is over the {max_bytes()} byte "
                                    "limit (ZRAY_RUNTIME_ENV_MAX_PACKAGE_MB)")
        data = self.rfile.read(n)
        if len(data) != n:
            raise ValueError("the package upload ended early")
        created = store.put(sha, data)
        return self._json({"stored": created})

    def _static(self, name: str, ctype: str):
        with open(os.path.join(STATIC, name), "rb") as f:
            self._send(200, f.read(), ctype)

    def _jobs(self, method: str, rest: str, q: dict):
        jobs = self.dash.jobs
        parts = rest.split("/") if rest else []
        if method == "GET" and not parts:
            return self._json(jobs.list())
        if method == "POST" and not parts:
            sid = jobs.submit(self._body())
            return self._json({"job_id": sid, "submission_id": sid})
        sid = parts[0] if parts else ""
        try:
            if method == "GET" and len(parts) == 1:
                return self._json(jobs.get(sid))
            if method == "GET" and len(parts) == 2 and parts[1] == "logs":
                text, nxt = jobs.logs(sid, _int(q, "offset", 0))
                return self._json({"logs": text, "offset": nxt,
                                   "status": jobs.get(sid)["status"]})
            if method == "POST" and len(parts) == 2 and parts[1] == "stop":
                return self._json({"stopped": jobs.stop(sid)})
            if method == "DELETE" and len(parts) == 1:
                return self._json({"deleted": jobs.delete(sid)})
        except KeyError:
            return self._error(404, f"Job {sid} does not exist")
        return self._error(404, f"no route {method} /api/jobs/{rest}")


def _state_dir(broker_dir: str, address: str, session_dir) -> str:
    """Where the dashboard keeps what outlives it (job records and logs, uploaded
    packages): ``$ZRAY_DASHBOARD_STATE_DIR``; else ``<session>/dashboard`` when the
    broker's session dir is this user's on this host (the dashboard beside its head,
    so a restarted dashboard finds the jobs, as Ray's keeps them in the GCS); else
    ``<zray tmp dir>/dashboard-state/<hash of the broker's address>``."""
    import hashlib

    from zray._procutil import UnsafePathError, private_dir, user_tmp_dir

    explicit = os.environ.get("ZRAY_DASHBOARD_STATE_DIR")
    if explicit:
        return private_dir(explicit)
    for base in (broker_dir, session_dir):
        if base and os.path.isdir(base):
            try:
                return private_dir(base, "dashboard")
            except (UnsafePathError, OSError):
                pass
    key = hashlib.sha256(address.encode()).hexdigest()[:16]
    return private_dir(user_tmp_dir(), "dashboard-state", key)


def _int(q: dict, key: str, default: int) -> int:
    try:
        v = int(q.get(key, default))
    except ValueError:
        raise ValueError(f"{key} must be an integer") from None
    if v < 0:
        raise ValueError(f"{key} must be >= 0")
    return v


def _jsonable(o):
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"{type(o).__name__} is not JSON")


def main(argv=None) -> int:
    """``python -m zray.dashboard``: what ``zray dashboard`` and init(include_dashboard=True) run."""
    import argparse
    import signal

    from zray._procutil import setup_logging

    ap = argparse.ArgumentParser(prog="zray dashboard")
    ap.add_argument("--address", required=True)
    ap.add_argument("--dashboard-host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--session-dir", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("ZRAY_EXIT_WITH_PARENT"):
        from zray._procutil import die_with_parent

        die_with_parent(int(os.environ["ZRAY_EXIT_WITH_PARENT"]))
    try:
        dash = DashboardServer(args.address, args.dashboard_host, args.port, args.session_dir)
    except OSError as e:
        print(f"zray dashboard: cannot listen on {args.dashboard_host}:{args.port}: {e}",
              flush=True)
        return 1
    setup_logging("dashboard", os.path.join(dash.session_dir, "logs"))
    signal.signal(signal.SIGTERM, lambda *_: dash.stop())
    signal.signal(signal.SIGINT, lambda *_: dash.stop())
    print(f"zray dashboard at {dash.url}", flush=True)
    print(f"  open {dash.url}/?token={dash.token}  (token in {dash.token_file})", flush=True)
    if dash.host not in ("127.0.0.1", "::1", "localhost"):
        print(f"WARNING: --dashboard-host {args.dashboard_host}: anyone who can reach this "
              "port can read the cluster's state, tasks' errors and logs", flush=True)
    try:
        dash.serve_forever()
    finally:
        dash.close()
    return 0
