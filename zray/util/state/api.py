"""The state API: list, get and summarize what a running cluster holds, with Ray's
function names, arguments and field names; rows are dicts (JSON-serialisable) whose
columns are also attributes (``row.state``), as Ray's rows are.

::

    list_tasks(filters, limit, detail) --REQ state_list--> broker: brokerd/state.py builds
    summarize_tasks()                  --REQ state_summary-->      the rows, filters them,
    get_task(id) = list_tasks([("task_id", "=", id)], detail)       sends the first `limit`

``address=None`` uses this process's connection when ``zray.init()`` was called, else
the running cluster found as ``address="auto"`` finds it; an explicit address opens a
short-lived connection (with the cluster key, as the CLI does).

Task history comes from the broker's bounded transition log: a task whose every event
fell off it is no longer listed. When events were dropped, ``list_tasks`` and
``summarize_tasks`` raise ``RayStateApiException`` with ``raise_on_missing_output=True``
(Ray's default) and warn otherwise.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, List, Optional, Tuple, Union

from zray import _ids, _runtime
from zray.util.state.common import (
    COLUMNS,
    DEFAULT_LIMIT,
    DEFAULT_RPC_TIMEOUT,
    MAX_LIMIT,
    check_filters,
)
from zray.util.state.exception import RayStateApiException

Filter = Tuple[str, str, Union[str, int, float, bool, None]]


def _request(address: Optional[str], op: str, args: dict, timeout: float) -> Any:
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address must be a str, got {type(address).__name__}")
    client = _runtime.client
    connected = client is not None and not client.closed
    if address is None and connected:
        return _ask(client, op, args, timeout)
    from zray import _protocol as P
    from zray._api import _resolve_address
    from zray._client import Client

    try:
        resolved = _resolve_address(address or "auto")
    except ConnectionError:
        if address == "auto" and connected:  # the cluster init() started: no address file
            return _ask(client, op, args, timeout)
        raise
    c = Client(resolved, kind="cli", connect_timeout=min(float(timeout), 15.0))
    try:
        result = _ask(c, op, args, timeout)
        c.send(P.encode(P.Exit()))
        return result
    finally:
        c.close()


def _ask(client, op: str, args: dict, timeout: float) -> Any:
    try:
        return client.request(op, args, timeout=float(timeout))
    except ValueError as e:  # the broker refused the query: say why, without its wrapping
        text = str(e)
        if text.startswith("ValueError: "):
            raise ValueError(text[len("ValueError: "):]) from None
        raise RayStateApiException(f"state query {op} failed: {text}") from None


def _list(resource: str, address, filters, limit, timeout, detail,
          raise_on_missing_output, _explain) -> List[dict]:
    if filters is not None and not isinstance(filters, (list, tuple)):
        raise ValueError(f"filters must be a list of (key, predicate, value) tuples, got "
                         f"{type(filters).__name__}")
    filters = [list(f) if isinstance(f, (list, tuple)) else f for f in (filters or [])]
    check_filters(resource, filters)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an int in 1..{MAX_LIMIT}, got {limit!r}")
    if not isinstance(detail, bool):
        raise ValueError(f"detail must be a bool, got {detail!r}")
    t0 = time.monotonic()
    reply = _request(address, "state_list", {"resource": resource, "filters": filters,
                                             "limit": limit, "detail": detail}, timeout)
    rows, total = reply["rows"], reply["total"]
    if resource == "tasks":
        _missing(reply.get("dropped_events", 0), raise_on_missing_output)
    if total > len(rows):
        warnings.warn(f"Limit last {len(rows)} entries (Total {total}). Use `limit` to "
                      f"return more entries.", stacklevel=3)
    if _explain:
        print(f"zray state API: list {resource}: {len(rows)} of {total} rows in "
              f"{(time.monotonic() - t0) * 1000:.1f} ms")
    return [StateRow(r) for r in rows]


class StateRow(dict):
    """A row of ``list_*``/``get_*``: a dict (JSON-serialisable) whose columns are also
    attributes, as Ray's state rows are (``list_actors()[0].state``)."""

    __slots__ = ()

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"state row has no column {name!r} (columns: "
                                 f"{', '.join(self)}; detail=True lists more)") from None

    def asdict(self) -> dict:
        return dict(self)


def _missing(dropped: int, raise_on_missing_output: bool) -> None:
    if not dropped:
        return
    text = (f"The broker's bounded event log dropped its {dropped} oldest events: the oldest "
            f"tasks are missing from the output.")
    if raise_on_missing_output:
        raise RayStateApiException(text + " To accept missing output, set "
                                          "`raise_on_missing_output=False`.")
    warnings.warn(text, stacklevel=4)


def _check_flags(raise_on_missing_output, _explain) -> None:
    if not isinstance(raise_on_missing_output, bool):
        raise ValueError(f"raise_on_missing_output must be a bool, got {raise_on_missing_output!r}")
    if not isinstance(_explain, bool):
        raise ValueError(f"_explain must be a bool, got {_explain!r}")


def _lister(resource: str, doc: str):
    def list_resource(address: Optional[str] = None, filters: Optional[List[Filter]] = None,
                      limit: int = DEFAULT_LIMIT, timeout: int = DEFAULT_RPC_TIMEOUT,
                      detail: bool = False, raise_on_missing_output: bool = True,
                      _explain: bool = False) -> List[dict]:
        _check_flags(raise_on_missing_output, _explain)
        return _list(resource, address, filters, limit, timeout, detail,
                     raise_on_missing_output, _explain)

    list_resource.__name__ = list_resource.__qualname__ = f"list_{resource}"
    base, more = COLUMNS[resource]
    list_resource.__doc__ = (
        f"{doc}\n\n``filters``: [(key, '=' | '!=', value), ...] on the columns; ``limit``: "
        f"at most this many rows (1..{MAX_LIMIT}); ``detail``: every column.\n\nColumns: "
        f"{', '.join(base)}" + (f"; with detail also {', '.join(more)}." if more else "."))
    return list_resource


list_tasks = _lister("tasks", "Tasks, actor creations and actor calls: live ones and those "
                              "still in the broker's bounded event log, oldest first.")
list_actors = _lister("actors", "Actors, dead ones included.")
list_nodes = _lister("nodes", "Nodes: those in the cluster, then those that left (DEAD).")
list_objects = _lister("objects", "Objects the cluster holds a record of.")
list_jobs = _lister("jobs", "Driver jobs (type DRIVER): RUNNING while the driver is connected, "
                            "then SUCCEEDED (as in Ray), with start_time and end_time (ms); "
                            "the broker keeps the newest ZRAY_MAX_ENDED_JOBS ended ones.")
list_placement_groups = _lister("placement_groups",
                                "Placement groups, removed ones too while the broker keeps them.")
list_cluster_events = _lister("cluster_events",
                              "Cluster events, oldest first: nodes lost, actors restarting or "
                              "dead, worker processes that died (from the broker's bounded "
                              "event log).")
list_workers = _lister("workers", "Worker processes: connected drivers (DRIVER) and the "
                                  "executors of every node (WORKER), while they live.")
list_runtime_envs = _lister("runtime_envs",
                            "Runtime environments set up on each node (Ray's RuntimeEnvState): "
                            "one row per environment and node, ``ref_cnt`` its live worker "
                            "processes; ``success`` False with ``error`` where a task failed "
                            "setting it up. zray does not measure the setup's latency: "
                            "``creation_time_ms`` is None.")


def _get(resource: str, key: str, id_hex: str, address, timeout, _explain) -> List[dict]:
    _check_flags(True, _explain)
    return _list(resource, address, [(key, "=", id_hex)], MAX_LIMIT, timeout, True, False,
                 _explain)


def _check_id(id, what: str, length: int) -> str:
    if not isinstance(id, str):
        raise TypeError(f"{what} id must be a hex string, got {type(id).__name__}")
    try:
        raw = bytes.fromhex(id)
    except ValueError:
        raise ValueError(f"{what} id {id!r:.80} is not a hex string") from None
    if len(raw) != length:
        raise ValueError(f"{what} id {id!r:.80} must be {length * 2} hex digits")
    return id.lower()


def get_task(id: Union[str, Any], address: Optional[str] = None,
             timeout: int = DEFAULT_RPC_TIMEOUT, _explain: bool = False) -> Optional[dict]:
    """A task by its hex id, or by an ObjectRef it returned; None if unknown (or gone
    from the event log). Every column."""
    from zray import _protocol as P

    if hasattr(id, "binary") and callable(id.binary):
        id = id.binary()[:P.TASK_ID_LEN].hex()
    rows = _get("tasks", "task_id", _check_id(id, "task", P.TASK_ID_LEN), address, timeout,
                _explain)
    return rows[0] if rows else None


def get_actor(id: str, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
              _explain: bool = False) -> Optional[dict]:
    """An actor by its hex id; None if unknown. Every column."""
    rows = _get("actors", "actor_id", _check_id(id, "actor", _ids.ActorID.SIZE), address,
                timeout, _explain)
    return rows[0] if rows else None


def get_node(id: str, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
             _explain: bool = False) -> Optional[dict]:
    """A node by its hex id; None if unknown. Every column."""
    rows = _get("nodes", "node_id", _check_id(id, "node", _ids.NodeID.SIZE), address,
                timeout, _explain)
    return rows[0] if rows else None


def get_worker(id: str, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
               _explain: bool = False) -> Optional[dict]:
    """A worker (a driver or an executor process) by its hex id; None if unknown."""
    from zray import _protocol as P

    rows = _get("workers", "worker_id", _check_id(id, "worker", P.ID_LEN), address, timeout,
                _explain)
    return rows[0] if rows else None


def get_job(id: str, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
            _explain: bool = False) -> Optional[dict]:
    """A driver job by its hex id; None if unknown."""
    rows = _get("jobs", "job_id", _check_id(id, "job", _ids.JobID.SIZE), address, timeout,
                _explain)
    return rows[0] if rows else None


def get_placement_group(id: str, address: Optional[str] = None,
                        timeout: int = DEFAULT_RPC_TIMEOUT,
                        _explain: bool = False) -> Optional[dict]:
    """A placement group by its hex id; None if unknown. Every column."""
    from zray.util.placement_group import PG_ID_LEN

    rows = _get("placement_groups", "placement_group_id",
                _check_id(id, "placement group", PG_ID_LEN), address,
                timeout, _explain)
    return rows[0] if rows else None


def get_objects(id: str, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
                _explain: bool = False) -> List[dict]:
    """The records of an object by its hex id (a list, as in Ray; empty if unknown)."""
    from zray import _protocol as P

    return _get("objects", "object_id", _check_id(id, "object", P.OBJECT_ID_LEN), address,
                timeout, _explain)


def _summary(resource: str, address, timeout, raise_on_missing_output, _explain) -> dict:
    _check_flags(raise_on_missing_output, _explain)
    t0 = time.monotonic()
    out = _request(address, "state_summary", {"resource": resource}, timeout)
    if resource == "tasks":
        _missing(out["cluster"].get("dropped_events", 0), raise_on_missing_output)
    if _explain:
        print(f"zray state API: summarize {resource} in {(time.monotonic() - t0) * 1000:.1f} ms")
    return out


def summarize_tasks(address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
                    raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Tasks by function (or class, for actor creations) name with counts per state:
    {"cluster": {"summary": {name: {func_or_class_name, type, state_counts}},
    "total_tasks", "summary_by", "dropped_events"}}."""
    return _summary("tasks", address, timeout, raise_on_missing_output, _explain)


def summarize_actors(address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
                     raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Actors by class name with counts per state:
    {"cluster": {"summary": {class_name: {class_name, state_counts}}, "total_actors"}}."""
    return _summary("actors", address, timeout, raise_on_missing_output, _explain)


def summarize_objects(address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
                      raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Objects by call site (call sites are not recorded: all under "disabled"), with
    counts, sizes, task states and reference types: {"cluster": {"summary": {...},
    "total_objects", "total_size_mb", "callsite_enabled", "summary_by"}}."""
    return _summary("objects", address, timeout, raise_on_missing_output, _explain)
