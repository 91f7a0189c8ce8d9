"""``list_named_actors``: the named actors alive in the cluster, Ray's
``ray.util.list_named_actors``. The broker answers from its actor directory
(``brokerd/queries.py``, ``list_named_actors``)."""

from __future__ import annotations

from zray import _runtime


def list_named_actors(all_namespaces: bool = False) -> list:
    """Names of the named actors in this job's namespace; with ``all_namespaces``, a
    ``{"name": ..., "namespace": ...}`` dict for every named actor in the cluster."""
    if not isinstance(all_namespaces, bool):
        raise TypeError(f"all_namespaces must be a bool, got {type(all_namespaces).__name__}")
    client = _runtime.require_client()
    return client.request("list_named_actors", {"all_namespaces": all_namespaces,
                                                "namespace": _runtime.current_namespace()})


__all__ = ["list_named_actors"]
