"""``zray start`` / ``zray stop``: a cluster's daemons in the background, as ``ray start``
and ``ray stop`` run them.

::

    zray start --head [--port 6380]  --> broker    (zray broker, detached)
                                     --> worker    (zray worker --address <broker>)
                                     --> dashboard (zray dashboard, when zray.dashboard exists)
    zray start --address HOST:PORT   --> worker
                    |
                    '-- each pid, its start time and role appended to $ZRAY_TMPDIR/started.json
    zray stop                        --> SIGTERM to those very processes (pid + start time),
                                         SIGKILL after --grace-period; never by name

The daemons run in their own session (no controlling terminal: closing the shell does
not stop them), log to ``<session dir>/logs/<role>.out`` (their own logs go beside it),
and outlive ``zray start``. The foreground ``zray broker`` / ``zray worker`` stay what
systemd runs (deploy/).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import click

STOP_ORDER = ("dashboard", "worker", "broker")


def _state_path() -> str:
    from zray._procutil import private_dir, user_tmp_dir

    return os.path.join(private_dir(user_tmp_dir()), "started.json")


@contextlib.contextmanager
def _started_table():
    """The table of processes ``zray start`` started on this host, locked while used:
    yields a list to read and change in place."""
    from zray._procutil import write_private_file

    path = _state_path()
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                table = json.load(f)
            if not isinstance(table, list):
                table = []
        except (OSError, ValueError):
            table = []
        before = list(table)
        yield table
        if table != before:
            write_private_file(path, json.dumps(table, indent=1))
    finally:
        os.close(fd)


def _process(entry: dict):
    """The psutil.Process of a recorded entry if that very process still runs (a pid
    reused by another process does not match its recorded start time)."""
    import psutil

    try:
        p = psutil.Process(int(entry["pid"]))
        if abs(p.create_time() - float(entry["create_time"])) > 0.5:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def _zray_argv(*args: str) -> list:
    return [sys.executable, "-m", "zray.cli", *args]


def _spawn(role: str, argv: list, session_dir: str, env: dict) -> subprocess.Popen:
    import psutil

    out_path = os.path.join(session_dir, "logs", f"{role}.out")
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd,
                                stderr=subprocess.STDOUT, env=env, close_fds=True,
                                start_new_session=True)
    finally:
        os.close(fd)
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        created = 0.0
    with _started_table() as table:
        table.append({"pid": proc.pid, "create_time": created, "role": role,
                      "session_dir": session_dir, "argv": argv[3:]})
    return proc


def _tail(session_dir: str, role: str, n: int = 20) -> str:
    try:
        with open(os.path.join(session_dir, "logs", f"{role}.out"), errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _wait(what: str, check, procs: dict, session_dir: str, timeout: float):
    """Poll ``check()`` until it returns a value; a started process that exits first,
    or the deadline, is an error showing that process's output."""
    deadline = time.monotonic() + timeout
    while True:
        for role, p in procs.items():
            if p.poll() is not None:
                raise click.ClickException(
                    f"the {role} exited (code {p.returncode}) before {what}; its output:\n"
                    f"{_tail(session_dir, role)}")
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise click.ClickException(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _broker_address(port: int, since: float):
    """The address the new broker wrote to the address file (it writes it once it listens)."""
    try:
        path = _HOOKS["address_file"]()
        if os.stat(path).st_mtime < since - 1:
            return None
        with open(path) as f:
            address = f.read().strip()
    except OSError:
        return None
    if port and not address.endswith(f":{port}"):
        return None
    return address or None


def _node_of(address: str, pid: int):
    from zray.util import state

    try:
        nodes = state.list_nodes(address=address, detail=True, timeout=5,
                                 filters=[("pid", "=", pid), ("state", "=", "ALIVE")])
    except (ConnectionError, OSError):
        return None
    except Exception as e:  # noqa: BLE001 - the broker is starting: ask again
        if "did not answer" in str(e):
            return None
        raise
    return nodes[0] if nodes else None


_HOOKS: dict = {}  # from zray.cli (which imports this module): address_file


def add_commands(main: click.Group, parse_labels, address_file) -> None:
    """Add start and stop to the ``zray`` command group; ``parse_labels`` checks --labels,
    ``address_file()`` is where a broker writes its address."""
    _HOOKS["address_file"] = address_file

    @main.command()
    @click.option("--head", is_flag=True, help="Start the head: broker, a worker, the dashboard.")
    @click.option("--address", default=None,
                  help="Join the cluster whose broker is at HOST:PORT (start a worker).")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="--head: the interface the broker listens on (0.0.0.0: every one).")
    @click.option("--port", default=6380, show_default=True, type=int,
                  help="--head: the broker's TCP port (0: any free one).")
    @click.option("--num-cpus", default=None, type=float, help="CPUs to offer (default: all).")
    @click.option("--num-gpus", default=None, type=int, help="GPUs to offer (default: detected).")
    @click.option("--resources", default=None, help='Custom resources as JSON, e.g. \'{"ssd": 1}\'.')
    @click.option("--labels", default=None, help='Node labels: "zone=a,disk=ssd" or JSON.')
    @click.option("--object-store-memory", default=None, type=int,
                  help="Bytes of shared memory for the object store.")
    @click.option("--include-dashboard/--no-include-dashboard", default=None,
                  help="--head: start the dashboard (default: when it is installed).")
    @click.option("--dashboard-host", default="127.0.0.1", show_default=True,
                  help="Interface the dashboard serves on.")
    @click.option("--dashboard-port", default=None, type=int,
                  help="Dashboard HTTP port (default: its own, 8265).")
    @click.option("--key-file", default=None, type=click.Path(dir_okay=False),
                  help="Cluster key file (default: $ZRAY_KEY_FILE or ~/.zray/cluster.key).")
    @click.option("--block", is_flag=True,
                  help="Stay in the foreground; Ctrl-C (or one daemon ending) stops them all.")
    @click.option("--timeout", default=60, show_default=True, type=float,
                  help="Seconds to wait for each daemon to be up.")
    def start(head, address, host, port, num_cpus, num_gpus, resources, labels,
              object_store_memory, include_dashboard, dashboard_host, dashboard_port,
              key_file, block, timeout):
        """Start zray daemons in the background: --head for a new cluster, --address to
        add this machine to one. `zray stop` stops them."""
        from zray._procutil import bytecode_env, new_session_dir, write_private_file

        if head == bool(address):
            raise click.UsageError("give either --head (a new cluster) or --address HOST:PORT "
                                   "(join one)")
        if not head:
            for name, value in (("--include-dashboard", include_dashboard),
                                ("--dashboard-port", dashboard_port)):
                if value:
                    raise click.UsageError(f"{name} is for --head only")
        if port < 0 or port > 65535:
            raise click.BadParameter("must be 0..65535", param_hint="--port")
        has_dashboard = importlib.util.find_spec("zray.dashboard") is not None
        if include_dashboard and not has_dashboard:
            raise click.UsageError("--include-dashboard: the dashboard (zray.dashboard) is "
                                   "not installed")
        env = bytecode_env(dict(os.environ))
        env.pop("ZRAY_EXIT_WITH_PARENT", None)
        if key_file:
            if not os.path.isfile(key_file):
                raise click.BadParameter(f"no key file at {key_file}", param_hint="--key-file")
            env["ZRAY_KEY_FILE"] = os.environ["ZRAY_KEY_FILE"] = os.path.abspath(key_file)
        worker_args = []
        if num_cpus is not None:
            worker_args += ["--num-cpus", repr(num_cpus)]
        if num_gpus is not None:
            worker_args += ["--num-gpus", str(num_gpus)]
        if resources is not None:
            worker_args += ["--resources", resources]
        if labels is not None:
            parse_labels(labels)  # a bad value fails here, not in the background
            worker_args += ["--labels", labels]
        if object_store_memory is not None:
            worker_args += ["--object-store-memory", str(object_store_memory)]

        session_dir = new_session_dir()
        procs: dict = {}
        t0 = time.time()
        try:
            if head:
                procs["broker"] = _spawn("broker", _zray_argv(
                    "broker", "--host", host, "--port", str(port), "--session-dir",
                    session_dir), session_dir, env)
                # the session is in use while the broker lives (old sessions are pruned)
                write_private_file(os.path.join(session_dir, ".pid"), str(procs["broker"].pid))
                address = _wait("the broker to listen", lambda: _broker_address(port, t0),
                                procs, session_dir, timeout)
            else:
                from zray._api import _resolve_address

                address = _resolve_address(address)
            procs["worker"] = _spawn("worker", _zray_argv(
                "worker", "--address", address, "--session-dir", session_dir, *worker_args),
                session_dir, env)
            if not head:
                write_private_file(os.path.join(session_dir, ".pid"), str(procs["worker"].pid))
            node = _wait("the worker to join the cluster",
                         lambda: _node_of(address, procs["worker"].pid), procs, session_dir,
                         timeout)
            dash_url = None
            if head and (include_dashboard or (include_dashboard is None and has_dashboard)):
                dargs = ["dashboard", "--address", address, "--dashboard-host", dashboard_host,
                         "--session-dir", session_dir]
                if dashboard_port is not None:
                    dargs += ["--port", str(dashboard_port)]
                procs["dashboard"] = _spawn("dashboard", _zray_argv(*dargs), session_dir, env)
                dash_url = f"http://{dashboard_host}:{dashboard_port or 8265}"
        except BaseException:
            _stop_entries([p.pid for p in procs.values()], force=False, grace=10)
            raise

        if head and host in ("0.0.0.0", "*", "::"):  # listening everywhere: say where to reach it
            address = address.replace(f"//{host}:", f"//{node['node_ip']}:")
        click.echo(f"zray {'head' if head else 'worker'} started (session {session_dir})")
        if head:
            click.echo(f"  broker:    {address} (pid {procs['broker'].pid})")
        click.echo(f"  node:      {node['node_id']} (pid {procs['worker'].pid}, "
                   f"{node['resources_total'].get('CPU', 0):g} CPUs)")
        if dash_url:
            click.echo(f"  dashboard: {dash_url} (pid {procs['dashboard'].pid})")
        if head:
            click.echo(f"  connect drivers:  zray.init(address=\"{address}\")")
            click.echo(f"  add workers:      zray start --address {address}")
        click.echo(f"  logs:             {os.path.join(session_dir, 'logs')}   (zray logs)")
        click.echo("  stop:             zray stop")
        if block:
            _block(procs)

    @main.command()
    @click.option("--force", "-f", is_flag=True, help="SIGKILL at once instead of SIGTERM.")
    @click.option("--grace-period", "-g", default=10, show_default=True, type=int,
                  help="Seconds to wait after SIGTERM before SIGKILL.")
    def stop(force, grace_period):
        """Stop the daemons `zray start` started on this host (by their recorded pids)."""
        if grace_period < 0:
            raise click.BadParameter("must be >= 0", param_hint="--grace-period")
        with _started_table() as table:
            pids = [e["pid"] for e in table]
        stopped, failed = _stop_entries(pids, force, grace_period)
        if failed:
            raise click.ClickException(f"could not stop {len(failed)} process(es): "
                                       f"{', '.join(map(str, failed))}")
        click.echo(f"Stopped {stopped} zray process(es)." if stopped
                   else "No zray processes started by `zray start` are running.")


def _block(procs: dict) -> None:
    """--block: wait until Ctrl-C / SIGTERM or until one daemon ends, then stop them all."""
    done = []

    def on_signal(signum, frame):
        done.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo("--block: running in the foreground; Ctrl-C stops the daemons")
    while not done and all(p.poll() is None for p in procs.values()):
        time.sleep(0.2)
    ended = [r for r, p in procs.items() if p.poll() is not None]
    if ended:
        click.echo(f"the {', '.join(ended)} ended: stopping the others", err=True)
    _stop_entries([p.pid for p in procs.values()], force=False, grace=10)


def _stop_entries(pids: list, force: bool, grace: float) -> tuple:
    """Stop the recorded processes among ``pids`` (dashboards, then workers, then brokers)
    and whatever they started; drop them from the table. Returns (how many were
    running, pids that would not die)."""
    import psutil

    with _started_table() as table:
        chosen = [e for e in table if e.get("pid") in pids]
        table[:] = [e for e in table if e.get("pid") not in pids]
    chosen.sort(key=lambda e: STOP_ORDER.index(e.get("role")) if e.get("role") in STOP_ORDER
                else len(STOP_ORDER))
    running = [(e, p) for e in chosen if (p := _process(e)) is not None]
    everything = []
    for e, p in running:
        try:
            kids = p.children(recursive=True)
        except psutil.Error:
            kids = []
        everything += [p] + kids
        try:
            p.send_signal(signal.SIGKILL if force else signal.SIGTERM)
        except psutil.Error:
            pass
        if e.get("role") == "worker" and not force:
            # Executors go with their worker; a broker stopped first would leave the
            # worker reconnecting. Give each worker a moment before the broker.
            _wait_gone([p], min(grace, 5))
    alive = _wait_gone(everything, grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    alive = _wait_gone(alive, 5)
    for e, _p in running:
        if e.get("role") == "broker":
            _forget_address(_HOOKS["address_file"](), e)
    return len(running), [p.pid for p in alive]


def _wait_gone(procs: list, timeout: float) -> list:
    """Poll until every process has exited (a zombie has: only its parent can reap it);
    return those still running."""
    import psutil

    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout
    alive = [p for p in procs if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if running(p)]
    return alive


def _forget_address(path: str, entry: dict) -> None:
    """A SIGKILLed broker leaves its address file behind: remove it if it is still that
    broker's (its port is in the recorded command line)."""
    argv = entry.get("argv") or []
    try:
        port = argv[argv.index("--port") + 1]
        with open(path) as f:
            if f.read().strip().endswith(f":{port}"):
                os.unlink(path)
    except (ValueError, IndexError, OSError):
        pass
