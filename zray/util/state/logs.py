"""``list_logs`` and ``get_log``: Ray's log functions of the state API, on the path
``zray logs`` uses (see ``zray._cli_logs`` and ``zray._logfiles``)::

    list_logs(node_id)            --REQ log_dirs, node_logs{list}-->  broker (--LOG_READ--> node)
    get_log(filename | pid | actor_id | task_id, tail, follow)
                                  --REQ node_logs{tail | read | task}-->

A node reads only names directly in its log directory, answers at most 1 MiB per
request and never unpickles anything. Files are grouped by what wrote them:
``broker``, ``node`` (the worker daemon), ``worker`` (executor processes, one file each
for stdout and stderr together), ``dashboard`` and ``other``.

A node sends the file's bytes (``raw``); ``get_log`` decodes them with ``encoding`` and
``errors`` as Ray does (``errors="strict"``, the default, raises UnicodeDecodeError on
bytes that are not ``encoding``; ``encoding=None`` yields bytes).

Where zray differs from Ray (each refused by name, never ignored): an executor's stdout
and stderr share one file, so ``suffix="err"`` is refused; ``submission_id`` (use
``JobSubmissionClient.get_job_logs``) and ``attempt_number`` other than 0 are refused.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import re
import time
from typing import Dict, Generator, List, Optional

from zray import _logfiles
from zray.util.state.common import DEFAULT_RPC_TIMEOUT
from zray.util.state.exception import RayStateApiException

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_ANSI_BYTES = re.compile(_ANSI.pattern.encode())


@contextlib.contextmanager
def _connection(address: Optional[str], timeout: float):
    """ask(op, args): requests on one connection (this process's, or a short-lived one)."""
    from zray import _protocol as P
    from zray import _runtime
    from zray.util.state.api import _ask

    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address must be a str, got {type(address).__name__}")
    client = _runtime.client
    if address is None and client is not None and not client.closed:
        yield lambda op, args: _ask(client, op, args, timeout)
        return
    from zray._api import _resolve_address
    from zray._client import Client

    c = Client(_resolve_address(address or "auto"), kind="cli",
               connect_timeout=min(float(timeout), 15.0))
    try:
        yield lambda op, args: _ask(c, op, args, timeout)
        c.send(P.encode(P.Exit()))
    finally:
        c.close()


def _group(name: str) -> str:
    for prefix, group in (("broker", "broker"), ("node", "node"), ("executor-", "worker"),
                          ("dashboard", "dashboard")):
        if name.startswith(prefix):
            return group
    return "other"


def _check_hex(value, what: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a hex string, got {type(value).__name__}")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{what} {value!r:.80} is not a hex string") from None
    return value.lower()


def _node(ask, node_id: Optional[str], node_ip: Optional[str]) -> str:
    """The node_logs target: a node id hex, or "" for the broker itself."""
    node_id = _check_hex(node_id, "node_id")
    if node_ip is not None and not isinstance(node_ip, str):
        raise TypeError(f"node_ip must be a str, got {type(node_ip).__name__}")
    dirs = ask("log_dirs", None)
    nodes = dirs["nodes"]
    if node_id is not None:
        if not any(n["node_id"] == node_id for n in nodes):
            raise ValueError(f"no node {node_id} in the cluster")
        return node_id
    if node_ip is not None:
        rows = ask("state_list", {"resource": "nodes", "filters": [["node_ip", "=", node_ip]],
                                  "limit": 10, "detail": False})["rows"]
        alive = [r["node_id"] for r in rows if r["state"] == "ALIVE"]
        if not alive:
            raise ValueError(f"no live node with ip {node_ip} in the cluster")
        if len(alive) > 1:
            raise ValueError(f"{len(alive)} nodes have ip {node_ip}: give node_id instead "
                             f"(one of {', '.join(alive)})")
        return alive[0]
    # Neither: the head node (the one on the broker's host), as Ray's CLI does.
    host = dirs["broker"]["host"]
    head = [n["node_id"] for n in nodes if n["host"] == host and n["log_dir"]]
    return head[0] if head else ""


def list_logs(address: Optional[str] = None, node_id: Optional[str] = None,
              node_ip: Optional[str] = None, glob_filter: Optional[str] = None,
              timeout: int = DEFAULT_RPC_TIMEOUT) -> Dict[str, List[str]]:
    """The log files of a node (``node_id`` or ``node_ip``; neither: the head node), as
    {group: [file names]} with groups ``broker``, ``node``, ``worker``, ``dashboard``
    and ``other``; ``glob_filter`` keeps the names it matches (e.g. ``"*executor*"``)."""
    if glob_filter is not None and not isinstance(glob_filter, str):
        raise TypeError(f"glob_filter must be a str, got {type(glob_filter).__name__}")
    with _connection(address, timeout) as ask:
        target = _node(ask, node_id, node_ip)
        files = ask("node_logs", {"node_id": target, "op": "list", "args": {}})["files"]
    out: Dict[str, List[str]] = {}
    for name, _size in files:
        if glob_filter is None or fnmatch.fnmatch(name, glob_filter):
            out.setdefault(_group(name), []).append(name)
    return out


def _find_pid(ask, pid: int, target: Optional[str]):
    """(node target, file name) of a process's log: the broker, a node daemon, an executor."""
    dirs = ask("log_dirs", None)
    if pid == dirs["broker"]["pid"] and target in (None, ""):
        host, ldir = dirs["broker"]["host"], dirs["broker"]["log_dir"]
        shared = [n["node_id"] for n in dirs["nodes"]
                  if n["host"] == host and n["log_dir"] == ldir]
        return (shared[0] if shared else ""), "broker.log"
    for n in dirs["nodes"]:
        if target is not None and n["node_id"] != target:
            continue
        if n["pid"] == pid:
            return n["node_id"], "node.log"
        if not n["log_dir"]:
            continue
        for epid, cid in ask("node_logs", {"node_id": n["node_id"], "op": "list",
                                            "args": {}})["executors"]:
            if epid == pid:
                return n["node_id"], f"executor-{cid}.log"
    return None


def get_log(address: Optional[str] = None, node_id: Optional[str] = None,
            node_ip: Optional[str] = None, filename: Optional[str] = None,
            actor_id: Optional[str] = None, task_id: Optional[str] = None,
            pid: Optional[int] = None, follow: bool = False, tail: int = -1,
            timeout: int = DEFAULT_RPC_TIMEOUT, suffix: str = "out",
            encoding: Optional[str] = "utf-8", errors: Optional[str] = "strict",
            submission_id: Optional[str] = None, attempt_number: int = 0,
            _interval: Optional[float] = None,
            filter_ansi_code: bool = False) -> Generator[str, None, None]:
    """Chunks of a log: a file by name (on ``node_id``/``node_ip``, else the head node),
    a process's (``pid``), an actor's (``actor_id``) or the lines a task printed
    (``task_id``); the last ``tail`` lines (-1: all), then with ``follow`` what is
    appended, every ``_interval`` seconds (0.5), until the generator is closed."""
    given = [k for k, v in (("filename", filename), ("actor_id", actor_id),
                            ("task_id", task_id), ("pid", pid),
                            ("submission_id", submission_id)) if v is not None]
    if len(given) != 1:
        raise ValueError("get_log needs exactly one of filename, actor_id, task_id, pid "
                         f"(got {', '.join(given) or 'none'})")
    if submission_id is not None:
        raise ValueError("get_log(submission_id=...) is not supported by zray: read a "
                         "submitted job's output with JobSubmissionClient.get_job_logs")
    if suffix not in ("out", "err"):
        raise ValueError(f"suffix must be 'out' or 'err', got {suffix!r:.40}")
    if suffix == "err":
        raise ValueError("suffix='err' is not supported by zray: a worker's stdout and "
                         "stderr are one file, read it with suffix='out'")
    if encoding is not None:
        if not isinstance(encoding, str):
            raise TypeError(f"encoding must be a str or None, got {type(encoding).__name__}")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"encoding {encoding!r:.40}: no such codec") from None
    if errors is None:
        errors = "strict"  # (bytes.decode's default)
    if not isinstance(errors, str):
        raise TypeError(f"errors must be a str, got {type(errors).__name__}")
    try:
        codecs.lookup_error(errors)
    except LookupError:
        raise ValueError(f"errors {errors!r:.40}: no such error handler (one of 'strict', "
                         "'replace', 'ignore', 'backslashreplace', ...)") from None
    if isinstance(attempt_number, bool) or not isinstance(attempt_number, int):
        raise TypeError(f"attempt_number must be an int, got {attempt_number!r:.40}")
    if attempt_number != 0:
        raise ValueError("attempt_number other than 0 is not supported by zray: a task's "
                         "lines are those of every attempt")
    if isinstance(tail, bool) or not isinstance(tail, int) or tail < -1:
        raise ValueError(f"tail must be an int >= -1, got {tail!r:.40}")
    if not isinstance(follow, bool) or not isinstance(filter_ansi_code, bool):
        raise TypeError("follow and filter_ansi_code must be bools")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        raise TypeError(f"pid must be an int, got {type(pid).__name__}")
    interval = 0.5 if _interval is None else float(_interval)
    if interval <= 0:
        raise ValueError(f"_interval must be > 0, got {_interval!r}")
    if filename is not None and not isinstance(filename, str):
        raise TypeError(f"filename must be a str, got {type(filename).__name__}")
    actor_id = _check_hex(actor_id, "actor_id")
    task_id = _check_hex(task_id, "task_id")

    # The node sends bytes; they are decoded here as Ray decodes its chunks (bytes.decode
    # with ``encoding`` and ``errors``), with one incremental decoder for the whole stream
    # so that a character cut between two chunks is not an error.
    decoder = codecs.getincrementaldecoder(encoding)(errors) if encoding is not None else None

    def out(data: bytes):
        if decoder is None:
            return _ANSI_BYTES.sub(b"", data) if filter_ansi_code else data
        text = decoder.decode(data)
        return _ANSI.sub("", text) if filter_ansi_code else text

    return _stream(address, node_id, node_ip, filename, actor_id, task_id, pid, follow,
                   tail, timeout, interval, out)


def _stream(address, node_id, node_ip, filename, actor_id, task_id, pid, follow, tail,
            timeout, interval, out):
    with _connection(address, timeout) as ask:
        target = None if node_id is None and node_ip is None else _node(ask, node_id,
                                                                         node_ip)
        keep, pos = None, None
        if task_id is not None:
            dirs = ask("log_dirs", None)
            for n in dirs["nodes"]:
                if (target is not None and n["node_id"] != target) or not n["log_dir"]:
                    continue
                got = ask("node_logs", {"node_id": n["node_id"], "op": "task",
                                        "args": {"task_id": task_id, "raw": True}})
                if got["files"]:
                    target, name = n["node_id"], got["files"][-1]
                    break
            else:
                raise RayStateApiException(f"task {task_id} printed nothing (no output of it "
                                           "in the executor logs)")
            lines = got["text"].splitlines(keepends=True)
            text = b"".join(lines if tail < 0 else lines[-tail:] if tail else [])
            marker = f"{_logfiles.MARKER}{task_id}".encode()
            start = _logfiles.MARKER.encode()
            state = {"in": True}

            def keep(line: bytes) -> bool:
                if line.startswith(start):
                    state["in"] = line.startswith(marker)
                    return False
                return state["in"]
        else:
            if actor_id is not None:
                rows = ask("state_list", {"resource": "actors",
                                          "filters": [["actor_id", "=", actor_id]],
                                          "limit": 1, "detail": False})["rows"]
                if not rows or rows[0].get("pid") is None:
                    raise RayStateApiException(f"actor {actor_id} has no process (unknown, "
                                               "not started or dead)")
                pid = rows[0]["pid"]
            if pid is not None:
                found = _find_pid(ask, pid, target)
                if found is None:
                    raise RayStateApiException(f"no log of pid {pid} in the cluster")
                target, name = found
            else:
                if target is None:
                    target = _node(ask, None, None)
                name = filename
            got = ask("node_logs", {"node_id": target, "op": "tail",
                                    "args": {"name": name, "lines": tail, "raw": True}})
            text, pos = got["text"], (got["ino"], got["size"])
        if text:
            yield out(text)
        if not follow:
            return
        if pos is None:  # a task's lines: follow its file from its end now
            now = ask("node_logs", {"node_id": target, "op": "tail",
                                    "args": {"name": name, "lines": 0}})
            pos = (now["ino"], now["size"])
        (ino, offset), buf = pos, b""
        while True:
            got = ask("node_logs", {"node_id": target, "op": "read",
                                    "args": {"name": name, "offset": offset, "ino": ino,
                                             "raw": True}})
            ino, offset = got["ino"], got["offset"]
            if not got["text"]:
                time.sleep(interval)  # polling the file's end, as `tail -f` does
                continue
            if keep is None:
                yield out(got["text"])
                continue
            buf += got["text"]
            *lines, buf = buf.split(b"\n")
            chunk = b"".join(line + b"\n" for line in lines if keep(line + b"\n"))
            if chunk:
                yield out(chunk)
