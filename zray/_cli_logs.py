"""``zray logs``: list and read the log files of a running cluster's broker, nodes and
executors, on any host (see ``zray._logfiles`` for the layout).

::

    zray logs                              the log files of the broker and every node
    zray logs 'node*.log' [--node ID]      files by name (a glob); the last --tail lines
    zray logs --actor-id ID | --pid PID    one actor's / process's log
    zray logs --task-id ID                 the lines one task printed
    ... --follow                           then keep printing what is appended (rotation
                                           followed), until Ctrl-C

    zray logs --REQ log_dirs-->  broker: where each node keeps its logs
              --REQ node_logs--> broker --LOG_READ--> node: _logfiles.serve(op, args)
              <--REPLY---------- broker <--LOG_DATA-- node   (the broker's own: it answers)

A node reads its own files and sends text: nothing is unpickled, only names directly in
its log directory are read, an answer holds at most 1 MiB.
"""

from __future__ import annotations

import fnmatch
import sys
import time

import click

from zray import _logfiles


class _Cluster:
    """The log files of the broker and the nodes, asked through one connection."""

    def __init__(self, address, key_file, node: str | None):
        from zray import _protocol as P

        self.P = P
        self.c = _HOOKS["client"](address, key_file)
        info = self.ask_broker("log_dirs")
        b = info["broker"]
        nodes = [n for n in info["nodes"]
                 if not node or n["node_id"].startswith(node.lower())]
        if node and not nodes:
            self.close()
            raise click.ClickException(f"no node {node} in the cluster")
        # (label, target: node id hex or "" for the broker, daemon pid, daemon log)
        self.targets = [(f"node {n['node_id']} ({n['host']}: {n['log_dir']})", n["node_id"],
                         n["pid"], "node.log") for n in nodes if n["log_dir"]]
        shared = {(n["host"], n["log_dir"]) for n in nodes}
        if not node and b["log_dir"] and (b["host"], b["log_dir"]) not in shared:
            self.targets.insert(0, (f"broker ({b['host']}: {b['log_dir']})", "", b["pid"],
                                    "broker.log"))
        self.broker_pid = b["pid"]
        self.broker_shared = next((t for _, t, _, _ in self.targets
                                   if (b["host"], b["log_dir"]) in shared
                                   and any(n["node_id"] == t and n["log_dir"] == b["log_dir"]
                                           for n in nodes)), None)

    def ask_broker(self, op: str, args=None):
        try:
            return self.c.request(op, args, timeout=30)
        except ValueError as e:
            raise click.ClickException(str(e).removeprefix("ValueError: ")) from None

    def ask(self, target: str, op: str, **args):
        return self.ask_broker("node_logs", {"node_id": target, "op": op, "args": args})

    def close(self):
        try:
            self.c.send(self.P.encode(self.P.Exit()))
        finally:
            self.c.close()

    def pid_log(self, pid: int):
        """(target, file name) of a process's log: the broker, a node, or an executor."""
        if pid == self.broker_pid:
            target = self.broker_shared if self.broker_shared is not None else ""
            return target, "broker.log"
        for _label, target, daemon_pid, daemon_log in self.targets:
            if pid == daemon_pid:
                return target, daemon_log
        for _label, target, _pid, _log in self.targets:
            for epid, cid in self.ask(target, "list")["executors"]:
                if epid == pid:
                    return target, f"executor-{cid}.log"
        return None

    def follow(self, target: str, name: str, keep, stop_after: float | None) -> None:
        """Print what is appended to a file (lines ``keep`` accepts), across rotations,
        until Ctrl-C (or ``stop_after`` seconds, for tests)."""
        now = self.ask(target, "tail", name=name, lines=0)
        ino, offset = now["ino"], now["size"]
        start = time.monotonic()
        buf = ""
        try:
            while stop_after is None or time.monotonic() - start < stop_after:
                got = self.ask(target, "read", name=name, offset=offset, ino=ino)
                if got["ino"] != ino:
                    ino = got["ino"]
                offset = got["offset"]
                if got["text"]:
                    buf += got["text"]
                    *lines, buf = buf.split("\n")
                    for line in lines:
                        if keep(line + "\n"):
                            sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                    continue
                time.sleep(0.3)
        except KeyboardInterrupt:
            pass


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


_HOOKS: dict = {}  # from zray.cli (which imports this module): client


def add_commands(main: click.Group, cluster_options, client) -> None:
    """Add ``logs`` to the ``zray`` command group; ``client(address, key_file)`` connects
    to the cluster as the CLI does."""
    _HOOKS["client"] = client

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
        """List the cluster's log files (broker, nodes, executors), or print one of them."""
        chosen = [x for x in (glob and "GLOB", actor_id and "--actor-id",
                              task_id and "--task-id", pid is not None and "--pid") if x]
        if len(chosen) > 1:
            raise click.UsageError(f"give one of GLOB, --actor-id, --task-id, --pid (got "
                                   f"{', '.join(chosen)})")
        if tail < -1:
            raise click.BadParameter("must be >= -1", param_hint="--tail")
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
        cluster = _Cluster(address, key_file, node)
        try:
            _show(cluster, glob, task_id, pid, follow, tail, stop_after)
        finally:
            cluster.close()


def _show(cluster: _Cluster, glob, task_id, pid, follow, tail, stop_after) -> None:
    if pid is not None:
        found = cluster.pid_log(pid)
        if found is None:
            raise click.ClickException(f"no log of pid {pid} in the cluster")
        files = [found]
    elif task_id:
        for _label, target, _pid, _log in cluster.targets:
            got = cluster.ask(target, "task", task_id=task_id)
            if got["files"]:
                break
        else:
            raise click.ClickException(f"task {task_id} printed nothing (no output of it in "
                                       f"the executor logs)")
        if got["truncated"]:
            click.echo("(older output of the task left out: 1 MiB shown)", err=True)
        text = got["text"].splitlines(keepends=True)
        sys.stdout.write("".join(text if tail < 0 else text[-tail:] if tail else []))
        sys.stdout.flush()
        if follow:
            keep = _task_filter(task_id)
            keep(f"{_logfiles.MARKER}{task_id}\n")  # we are past its marker
            cluster.follow(target, got["files"][-1], keep, stop_after)
        return
    elif glob:
        files = [(target, name) for _l, target, _p, _d in cluster.targets
                 for name, _size in cluster.ask(target, "list")["files"]
                 if fnmatch.fnmatch(name, glob)]
        if not files:
            raise click.ClickException(f"no log file matches {glob!r}")
    else:
        if follow:
            raise click.UsageError("--follow needs a file: GLOB, --actor-id, --task-id or --pid")
        for label, target, _pid, _log in cluster.targets:
            click.echo(label)
            for name, size in cluster.ask(target, "list")["files"]:
                click.echo(f"  {name:<48} {size:>12,d} B")
        return
    if follow and len(files) != 1:
        raise click.UsageError(f"--follow needs exactly one file; {len(files)} match: "
                               f"{', '.join(name for _, name in files)}")
    for target, name in files:
        if len(files) > 1:
            click.echo(f"==> {target or 'broker'}: {name} <==")
        got = cluster.ask(target, "tail", name=name, lines=tail)
        if got["truncated"]:
            click.echo(f"({name}: older output left out, 1 MiB shown)", err=True)
        sys.stdout.write(got["text"])
    sys.stdout.flush()
    if follow:
        target, name = files[0]
        cluster.follow(target, name, lambda line: True, stop_after)
