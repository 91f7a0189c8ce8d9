"""``zray logs``: list and read the log files of a running cluster's broker, nodes and
executors (see ``zray._logfiles`` for the layout).

::

    zray logs                              the log files of every node on this host
    zray logs 'node*.log' [--node ID]      files by name (a glob); the last --tail lines
    zray logs --actor-id ID | --pid PID    one actor's / process's log
    zray logs --task-id ID                 the lines one task printed
    ... --follow                           then keep printing what is appended (rotation
                                           followed), until Ctrl-C

The broker says where each node keeps its logs (REQ log_dirs); the files are read
here, so a node's files can be read on that node's host only (the command says which
host when asked for a node elsewhere).
"""

from __future__ import annotations

import fnmatch
import os
import socket
import sys
import time

import click

from zray import _logfiles


def _tail_lines(paths: list, n: int) -> list:
    """The last ``n`` lines (all for n < 0) of the concatenation of ``paths``."""
    out: list = []
    for path in reversed(paths):
        need = None if n < 0 else n - len(out)
        if need is not None and need <= 0:
            break
        out = _tail_of(path, need) + out
    return out


def _tail_of(path: str, n) -> list:
    try:
        with open(path, "rb") as f:
            if n is None:
                data = f.read()
            else:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                pos, data = end, b""
                while pos > 0 and data.count(b"\n") <= n:
                    step = min(65536, pos)
                    pos -= step
                    f.seek(pos)
                    data = f.read(step) + data
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines(keepends=True)
    return lines if n is None else lines[-n:] if n else []


def _follow(path: str, keep, stop_after: float | None = None) -> None:
    """Print what is appended to ``path`` (lines ``keep`` accepts), across rotations,
    until Ctrl-C (or ``stop_after`` seconds, for tests)."""
    f = open(path, "rb")
    f.seek(0, os.SEEK_END)
    ident = os.fstat(f.fileno()).st_ino
    start = time.monotonic()
    buf = b""
    try:
        while stop_after is None or time.monotonic() - start < stop_after:
            chunk = f.read(65536)
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace") + "\n"
                    if keep(text):
                        sys.stdout.write(text)
                sys.stdout.flush()
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino != ident or st.st_size < f.tell()):
                # rotated (or truncated): finish the old file, go on with the new one
                rest = f.read()
                if rest:
                    buf += rest
                    continue
                f.close()
                f = open(path, "rb")
                ident = os.fstat(f.fileno()).st_ino
                continue
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        f.close()


def _task_filter(task_hex: str):
    """A line filter: True for the lines between this task's marker and the next marker."""
    state = {"in": False}
    marker = f"{_logfiles.MARKER}{task_hex}"

    def keep(line: str) -> bool:
        if line.startswith(_logfiles.MARKER):
            state["in"] = line.startswith(marker)
            return False
        return state["in"]

    return keep


def _dirs(address, key_file, node: str | None) -> list:
    """[(label, daemon pid, log dir, daemon log name)] on this host (the broker says where);
    a node elsewhere is an error when asked for, a note otherwise."""
    from zray import _protocol as P
    from zray.cli import _client

    c = _client(address, key_file)
    try:
        info = c.request("log_dirs")
        c.send(P.encode(P.Exit()))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    finally:
        c.close()
    here = socket.gethostname()
    found, elsewhere, seen = [], [], set()
    b = info["broker"]
    for n in info["nodes"]:
        if node and not n["node_id"].startswith(node.lower()):
            continue
        if n["host"] != here:
            elsewhere.append(n)
            continue
        if n["log_dir"] and n["log_dir"] not in seen:
            seen.add(n["log_dir"])
            found.append((f"node {n['node_id']}", n["pid"], n["log_dir"], "node.log"))
    if not node and b["host"] == here and b["log_dir"]:
        found.insert(0, ("broker", b["pid"], b["log_dir"], "broker.log"))
    if node and not found:
        if elsewhere:
            n = elsewhere[0]
            raise click.ClickException(f"node {n['node_id']} runs on host {n['host']}: its "
                                       f"logs are in {n['log_dir']} there (run zray logs "
                                       f"on that host)")
        raise click.ClickException(f"no node {node} in the cluster")
    for n in elsewhere:
        click.echo(f"(node {n['node_id']} is on host {n['host']}: run zray logs there)",
                   err=True)
    return found


def add_commands(main: click.Group, cluster_options) -> None:
    """Add ``logs`` to the ``zray`` command group."""

    @main.command()
    @click.argument("glob", required=False)
    @cluster_options
    @click.option("--node", "--node-id", "node", default=None,
                  help="Only this node (its id, or a prefix of it).")
    @click.option("--actor-id", default=None, help="The log of this actor's process.")
    @click.option("--task-id", default=None, help="The lines this task printed.")
    @click.option("--pid", default=None, type=int,
                  help="The log of this process (an executor, node or broker).")
    @click.option("--follow", "-f", is_flag=True, help="Keep printing what is appended.")
    @click.option("--tail", default=1000, show_default=True, type=int,
                  help="Print the last N lines first (-1: all).")
    @click.option("--_stop-after", "stop_after", default=None, type=float, hidden=True)
    def logs(glob, address, key_file, node, actor_id, task_id, pid, follow, tail, stop_after):
        """List the cluster's log files on this host, or print one of them."""
        chosen = [x for x in (glob and "GLOB", actor_id and "--actor-id",
                              task_id and "--task-id", pid is not None and "--pid") if x]
        if len(chosen) > 1:
            raise click.UsageError(f"give one of GLOB, --actor-id, --task-id, --pid (got "
                                   f"{', '.join(chosen)})")
        if tail < -1:
            raise click.BadParameter("must be >= -1", param_hint="--tail")
        keep = None
        if actor_id or task_id:
            from zray._cli_state import _call
            from zray.util import state

            if actor_id:
                row = _call(state.get_actor, key_file, id=actor_id, address=address)
                if row is None:
                    raise click.ClickException(f"no actor with id {actor_id}")
                if not row.get("pid"):
                    raise click.ClickException(f"actor {actor_id} has no process now "
                                               f"(state {row['state']})")
                pid, node = row["pid"], row["node_id"]
            else:
                row = _call(state.get_task, key_file, id=task_id, address=address)
                if row is None:
                    raise click.ClickException(f"no task with id {task_id} (or it left the "
                                               f"broker's event log)")
                node = node or row.get("node_id")
                task_id = row["task_id"]
        dirs = _dirs(address, key_file, node)
        unique = list(dict.fromkeys(d for _, _, d, _ in dirs))
        if pid is not None:
            path = _pid_log(dirs, pid)
            if path is None:
                raise click.ClickException(f"no log of pid {pid} on this host")
            paths = [path]
        elif task_id:
            paths = [p for d in unique for p in _logfiles.files_with_task(d, task_id)]
            if not paths:
                raise click.ClickException(f"task {task_id} printed nothing (no output of it "
                                           f"in the executor logs on this host)")
            keep = _task_filter(task_id)
        elif glob:
            paths = [os.path.join(d, name) for d in unique for name in sorted(os.listdir(d))
                     if fnmatch.fnmatch(name, glob) and os.path.isfile(os.path.join(d, name))]
            if not paths:
                raise click.ClickException(f"no log file matches {glob!r}")
        else:
            if follow:
                raise click.UsageError("--follow needs a file: GLOB, --actor-id, --task-id "
                                       "or --pid")
            shown = set()
            for label, _, d, _ in dirs:
                click.echo(f"{label}: {d}")
                if d in shown:
                    click.echo("  (the files above)")
                    continue
                shown.add(d)
                for name in sorted(os.listdir(d)):
                    try:
                        size = os.path.getsize(os.path.join(d, name))
                    except OSError:
                        continue
                    click.echo(f"  {name:<48} {size:>12,d} B")
            return
        if follow and len(paths) != 1:
            raise click.UsageError(f"--follow needs exactly one file; {len(paths)} match: "
                                   f"{', '.join(os.path.basename(p) for p in paths)}")
        for path in paths:
            if len(paths) > 1:
                click.echo(f"==> {path} <==")
            if keep is not None:
                lines = _logfiles.task_lines(_logfiles.with_backups(path), task_id)
                lines = lines if tail < 0 else lines[-tail:] if tail else []
            else:
                lines = _tail_lines(_logfiles.with_backups(path), tail)
            sys.stdout.write("".join(lines))
        sys.stdout.flush()
        if follow:
            if keep is not None:  # where the file ends now, are we inside the task's lines?
                for line in _tail_lines([paths[0]], -1):
                    keep(line)
            _follow(paths[0], keep or (lambda line: True), stop_after)


def _pid_log(dirs: list, pid: int):
    """The log file of a process: an executor (by its node's index), a node or the broker."""
    for _label, daemon_pid, d, daemon_log in dirs:
        if pid == daemon_pid:
            return os.path.join(d, daemon_log)
        cid = _logfiles.executor_index(d).get(pid)
        if cid:
            return _logfiles.executor_log(d, cid)
    return None
