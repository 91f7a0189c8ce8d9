"""The ``zray`` command line: broker, worker, status, memory, microbenchmark."""

from __future__ import annotations

import json
import os
import sys

import click


def _address_file() -> str:
    from zray._procutil import private_dir, user_tmp_dir

    return os.path.join(private_dir(user_tmp_dir()), "address")


def _resolve(address: str | None) -> str:
    from zray._api import _resolve_address

    return _resolve_address(address or "auto")


@click.group()
@click.version_option(package_name="zray")
def main():
    """zray: Ray Core's API on a ZeroMQ broker."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=6380, show_default=True, type=int, help="TCP port (0: any free one).")
@click.option("--session-dir", default=None, help="Where logs go (default: a new private dir).")
@click.option("--key-file", default=None,
              help="Cluster key file (default: ~/.zray/cluster.key, created if missing).")
@click.option("--insecure", is_flag=True, help="No CURVE authentication/encryption (trusted networks only).")
@click.option("--state-dir", default=None,
              help="Keep the durable tables (nodes, actors, jobs) here so that the cluster "
                   "survives a broker restart (default: $STATE_DIRECTORY under systemd, else "
                   "none: as Ray's, a restarted broker starts an empty cluster).")
@click.option("--no-state", is_flag=True, help="Keep nothing, even under systemd: a restart starts an empty cluster.")
def broker(host: str, port: int, session_dir: str | None, key_file: str | None, insecure: bool,
           state_dir: str | None = None, no_state: bool = False):
    """Run the broker in the foreground (SIGTERM/SIGINT stop it).

    Over TCP every connection must hold the cluster key (CURVE); copy the key
    file to each worker and driver host.
    """
    from zray._procutil import new_session_dir, private_dir, setup_logging, write_private_file

    if key_file:
        os.environ["ZRAY_KEY_FILE"] = os.path.abspath(key_file)
    if insecure:
        os.environ["ZRAY_INSECURE"] = "1"
        click.echo("WARNING: --insecure: anyone who can reach this port can run code here", err=True)

    session_dir = private_dir(session_dir) if session_dir else new_session_dir()
    setup_logging("broker", os.path.join(session_dir, "logs"))
    import signal

    from brokerd.broker import Broker, run  # noqa: F401

    if no_state and state_dir:
        raise click.UsageError("--state-dir and --no-state contradict each other")
    if not no_state and not state_dir:
        state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if port == 0 and state_dir and not no_state:
        raise click.UsageError("--state-dir needs a fixed --port: workers and drivers "
                               "reconnect to the same address")
    b = Broker(f"tcp://{host}:{port}", session_dir, "" if no_state else state_dir or "")
    if state_dir and not no_state:
        click.echo(f"  state (survives restarts): {state_dir}", err=True)
    write_private_file(_address_file(), b.address)
    click.echo(f"zray broker listening on {b.address}", err=True)
    if b.auth is not None:
        from zray._security import key_file_path

        click.echo(f"  CURVE on: workers and drivers need a copy of {key_file_path()}", err=True)
    click.echo(f"  connect workers:  zray worker --address {b.address}", err=True)
    click.echo(f"  connect drivers:  zray.init(address=\"{b.address}\")", err=True)
    signal.signal(signal.SIGTERM, b.stop)
    signal.signal(signal.SIGINT, b.stop)
    try:
        b.serve()
    finally:
        try:
            with open(_address_file()) as f:
                if f.read().strip() == b.address:
                    os.unlink(_address_file())
        except OSError:
            pass


@main.command()
@click.option("--address", default=None, help="Broker address, e.g. tcp://10.0.0.1:6380 (default: auto).")
@click.option("--num-cpus", default=None, type=float, help="CPUs to offer (default: all cores).")
@click.option("--gpus", "--num-gpus", "gpus", default=None, type=int,
              help="GPUs to offer (default: detected).")
@click.option("--resources", default="{}", help='Custom resources as JSON, e.g. \'{"ssd": 1}\'.')
@click.option("--prestart", default=None, type=int, help="Executors to keep warm (default: one per CPU).")
@click.option("--object-store-memory", default=None, type=int,
              help="Bytes of shared memory for the object store before spilling (default: 30% of RAM).")
@click.option("--labels", default="",
              help='Node labels for label_selector: "zone=a,disk=ssd" or a JSON object.')
@click.option("--session-dir", default=None, help="Where logs go (default: a new private dir).")
@click.option("--key-file", default=None, help="Cluster key file (default: ~/.zray/cluster.key).")
def worker(address, num_cpus, gpus, resources, prestart, object_store_memory, labels,
           session_dir, key_file):
    """Run a worker daemon (node agent) in the foreground."""
    if key_file:
        os.environ["ZRAY_KEY_FILE"] = os.path.abspath(key_file)  # executors inherit it
    from zray._procutil import detect_gpus, new_session_dir, private_dir, setup_logging

    try:
        res = json.loads(resources)
        if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in res.values()):
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"--resources must be a JSON object of name: number >= 0, got {resources!r}") from None
    if num_cpus is not None and num_cpus < 0:
        raise click.BadParameter("--num-cpus must be >= 0")
    node_labels = _parse_labels(labels)
    detected = detect_gpus()
    if gpus is None:
        gpu_ids = detected
    elif gpus < 0:
        raise click.BadParameter("--gpus must be >= 0")
    else:
        gpu_ids = detected[:gpus] if len(detected) >= gpus else [str(i) for i in range(gpus)]
    session_dir = private_dir(session_dir) if session_dir else new_session_dir()
    setup_logging("node", os.path.join(session_dir, "logs"))
    from workerd.node import run

    if object_store_memory is not None and object_store_memory <= 0:
        raise click.BadParameter("--object-store-memory must be a positive number of bytes")
    run(_resolve(address), num_cpus if num_cpus is not None else os.cpu_count() or 1, gpu_ids,
        res, session_dir, prestart=prestart, object_store_memory=object_store_memory,
        labels=node_labels)


def _parse_labels(text: str) -> dict:
    """``--labels``: "key=value,key=value" (Ray's form) or a JSON object of str to str."""
    from zray._options import check_node_labels

    text = text.strip()
    try:
        if text.startswith("{"):
            labels = json.loads(text)
        else:
            labels = {}
            for pair in filter(None, (p.strip() for p in text.split(","))):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ValueError(f"{pair!r} is not key=value")
                labels[key.strip()] = value.strip()
        return check_node_labels(labels)
    except ValueError as e:
        raise click.BadParameter(f"--labels: {e}") from None


def cluster_options(fn):
    """--address and --key-file, for every command that talks to a running cluster."""
    fn = click.option("--key-file", default=None, type=click.Path(dir_okay=False),
                      help="Cluster key file (default: $ZRAY_KEY_FILE or ~/.zray/cluster.key).")(fn)
    return click.option("--address", default=None, help="Broker address (default: auto).")(fn)


def _client(address, key_file=None):
    """A CLI client of the cluster; a missing key file or an unreachable broker is a
    one-line error, not a traceback."""
    from zray._client import Client

    if key_file:
        if not os.path.isfile(key_file):
            raise click.BadParameter(f"no key file at {key_file}", param_hint="--key-file")
        os.environ["ZRAY_KEY_FILE"] = os.path.abspath(key_file)
    try:
        return Client(_resolve(address), kind="cli", connect_timeout=5)
    except (ConnectionError, PermissionError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@cluster_options
def status(address, key_file):
    """Print nodes, resources and task counts of a running cluster."""
    from zray import _protocol as P

    c = _client(address, key_file)
    try:
        st = c.request("status")
        demand = c.request("demand")
        c.send(P.encode(P.Exit()))
    finally:
        c.close()
    click.echo(f"zray cluster at {st['address']}  (up {st['uptime_s']:.0f}s, "
               f"{st['clients']} driver(s))")
    click.echo(f"Nodes: {len(st['nodes'])}")
    for n in st["nodes"]:
        res = n["Resources"]
        av = n["Available"]
        parts = []
        for r in sorted(res):
            if r.startswith("node:") or r == "memory":
                continue
            parts.append(f"{r} {res[r] - av.get(r, 0):g}/{res[r]:g}")
        click.echo(f"  {n['NodeID']}  {n['NodeManagerHostname']}  {'alive' if n['Alive'] else 'dead'}  "
                   f"used: {', '.join(parts)}  executors: {n['Executors']}")
    tasks = st["tasks"]
    click.echo(f"Tasks: {tasks.get('queued', 0)} queued, {tasks.get('waiting_args', 0)} waiting for "
               f"arguments, {tasks.get('running', 0)} running")
    click.echo(f"Actors: {st['actors']} alive   Objects: {st['objects']} "
               f"({st['object_bytes'] / 1e6:.1f} MB)")
    if "fd_limit" in st:
        click.echo(f"File descriptors: {st['fd_open']} open of {st['fd_limit']} (broker)")
        if st["accept_failed_no_fds"]:
            click.echo(f"WARNING: the broker ran out of file descriptors and refused "
                       f"{st['accept_failed_no_fds']} connection(s): raise its limit "
                       f"(LimitNOFILE= in systemd, ulimit -n) and restart it")
    _print_demand(demand)


def _print_demand(demand: dict) -> None:
    """Pending demand: queued tasks by shape and placement groups not placed yet."""
    if demand["tasks"]:
        click.echo("Pending demand:")
        for d in demand["tasks"]:
            click.echo(f"  {d['shape']}{' ' + d['strategy'] if d['strategy'] else ''}: "
                       f"{d['count']} task(s)"
                       f"{'  (infeasible: no node has that; waiting for one)' if d['infeasible'] else ''}")
    if demand["placement_groups"]:
        click.echo("Pending placement groups:")
        for g in demand["placement_groups"]:
            click.echo(f"  {g['placement_group_id']}  {g['name'] or '-'}  {g['state']}  "
                       f"{g['strategy']}  {list(g['bundles'].values())}"
                       f"{'  (infeasible: no set of nodes can hold it)' if g['infeasible'] else ''}")


@main.command()
@cluster_options
@click.option("--top", default=10, show_default=True, help="How many of the largest objects to list.")
def memory(address, key_file, top):
    """Per-node object store use: objects, bytes in memory, bytes spilled, largest objects."""
    from zray import _protocol as P
    from zray._api import format_memory

    c = _client(address, key_file)
    try:
        m = c.request("memory", {"top": top})
        c.send(P.encode(P.Exit()))
    finally:
        c.close()
    click.echo(format_memory(m))


@main.command()
@click.option("--filter", "filter_", default="", help="Run only cases whose name contains this.")
@click.option("--repeat", default=3, show_default=True, help="Repetitions per case.")
def microbenchmark(filter_, repeat):
    """Ray's microbenchmark cases on an embedded local cluster."""
    from benchmarks.microbenchmark import main as run_bench

    sys.exit(run_bench(filter_, repeat))


@main.command()
@cluster_options
@click.option("--dashboard-host", default="127.0.0.1", show_default=True,
              help="Interface to serve on (0.0.0.0: every interface).")
@click.option("--port", "--dashboard-port", "port", default=None, type=int,
              help="HTTP port (default: $ZRAY_DASHBOARD_PORT or 8265; 0: any free one).")
@click.option("--session-dir", default=None, help="Where its logs and job logs go.")
def dashboard(address, key_file, dashboard_host, port, session_dir):
    """Serve the read-only web dashboard, its JSON API (/api/) and /metrics, and run
    submitted jobs (`zray job`), in the foreground."""
    from zray.dashboard import default_port
    from zray.dashboard.server import main as serve

    if key_file:
        if not os.path.isfile(key_file):
            raise click.BadParameter(f"no key file at {key_file}", param_hint="--key-file")
        os.environ["ZRAY_KEY_FILE"] = os.path.abspath(key_file)
    try:
        port = default_port() if port is None else port
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    argv = ["--address", _resolve(address), "--dashboard-host", dashboard_host,
            "--port", str(port)]
    if session_dir:
        argv += ["--session-dir", session_dir]
    sys.exit(serve(argv))


from zray._job_cli import job  # noqa: E402  (zray job ...)

main.add_command(job)

from zray import _cli_state  # noqa: E402  (list, get, summary, timeline)

_cli_state.add_commands(main, cluster_options)

from zray import _cli_start  # noqa: E402  (start, stop)

_cli_start.add_commands(main, _parse_labels, _address_file)

from zray import _cli_logs  # noqa: E402  (logs)

_cli_logs.add_commands(main, cluster_options, _client)


if __name__ == "__main__":
    sys.exit(main())
