"""Placement groups with Ray's names: reserve bundles of resources across nodes, then
run tasks and actors in them.

::

    placement_group(bundles, strategy) --REQ pg_create--> broker (brokerd/pgroups.py)
    pg.ready()  --REQ pg_ready (a new object id of ours)--> resolved to the group once
                                                            every bundle is reserved
    f.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                --SUBMIT with options.strategy {"type": "placement_group", ...}-->
                  the broker runs it on the resources of bundle i (any bundle: -1)
    remove_placement_group(pg) --REQ pg_remove--> members killed, reservation given back

A task or actor started with ``placement_group_capture_child_tasks=True`` puts the
tasks and actors it starts, which name no strategy of their own, in its group
(``inherited_strategy``).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

from zray import _protocol as P
from zray import _runtime

PG_ID_LEN = 18
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementGroupID:
    """A placement group's id: ``hex()``, ``binary()``, ``is_nil()``."""

    __slots__ = ("_bytes",)

    def __init__(self, id_bytes: bytes):
        self._bytes = id_bytes

    def binary(self) -> bytes:
        return self._bytes

    def hex(self) -> str:
        return self._bytes.hex()

    def is_nil(self) -> bool:
        return not any(self._bytes)

    @classmethod
    def nil(cls):
        return cls(bytes(PG_ID_LEN))

    @classmethod
    def from_hex(cls, h: str):
        return cls(bytes.fromhex(h))

    def __eq__(self, other):
        return isinstance(other, PlacementGroupID) and other._bytes == self._bytes

    def __hash__(self):
        return hash(self._bytes)

    def __repr__(self):
        return f"PlacementGroupID({self.hex()})"

    def __reduce__(self):
        return (PlacementGroupID, (self._bytes,))


class PlacementGroup:
    """A handle to a placement group (``id``, ``bundle_specs``, ``ready()``, ``wait()``)."""

    def __init__(self, id, bundle_cache: Optional[list] = None):
        if isinstance(id, str):
            id = PlacementGroupID.from_hex(id)
        self.id = id
        self.bundle_cache = bundle_cache

    @staticmethod
    def empty() -> "PlacementGroup":
        return PlacementGroup(PlacementGroupID.nil())

    @property
    def is_empty(self) -> bool:
        return self.id.is_nil()

    def ready(self):
        """An ObjectRef that becomes ready (its value: this group) once every bundle is
        reserved."""
        from zray._refs import ObjectRef

        client = _runtime.require_client()
        if self.is_empty:
            return client.put(self, ObjectRef)
        oid = P.object_id(client.next_task_id(), 1)
        client.expect_push([oid])
        ref = ObjectRef(oid, client.cid, client)
        # No round trip: the broker resolves the object (with an error if the group is
        # unknown), requests keep their order.
        args = {"pg_id": self.id.binary(), "oid": oid}
        client.replay.record_pg_ready(oid, args, client.records)  # (for a broker restart)
        client.request_nowait("pg_ready", args)
        return ref

    def wait(self, timeout_seconds: float = 30) -> bool:
        """True once the group is created, False if ``timeout_seconds`` pass first."""
        from zray import exceptions

        client = _runtime.require_client()
        try:
            client.wait_objects([self.ready()], 1, timeout_seconds, fetch=False)
        except exceptions.GetTimeoutError:
            return False
        return True

    @property
    def bundle_specs(self) -> list:
        if not self.bundle_cache:
            row = placement_group_table(self)
            self.bundle_cache = [row["bundles"][i] for i in sorted(row["bundles"])]
        return self.bundle_cache

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def __eq__(self, other):
        return isinstance(other, PlacementGroup) and self.id == other.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"PlacementGroup(id={self.id.hex()})"

    def __reduce__(self):
        return (PlacementGroup, (self.id, self.bundle_cache))


MAX_BUNDLES = 10000  # brokerd/pgroups.py refuses more


def _check_bundles(bundles) -> list:
    if not isinstance(bundles, list):
        raise ValueError(f"Placement group bundles must be a list, got {type(bundles)}.")
    if not bundles:
        raise ValueError('Bundles must be a non-empty list of resource dictionaries. For '
                         'example: `[{"CPU": 1.0}, {"GPU": 1.0}]`. Got empty list instead.')
    if len(bundles) > MAX_BUNDLES:
        raise ValueError(f"A placement group has at most {MAX_BUNDLES} bundles, got "
                         f"{len(bundles)}")
    out = []
    for b in bundles:
        if (not isinstance(b, dict) or not all(isinstance(k, str) for k in b)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in b.values())):
            raise ValueError('Bundles must be a non-empty list of resource dictionaries. '
                             'For example: `[{"CPU": 1.0}, {"GPU": 1.0}]`.')
        if not b or all(v == 0 for v in b.values()):
            raise ValueError(f"Bundles cannot be an empty dictionary or resources with only "
                             f"0 values. Bundles: {bundles}")
        if any(v < 0 for v in b.values()):
            raise ValueError(f"Bundle resources must be >= 0, got {b}")
        for k, v in b.items():
            if not 0 < len(k) <= 256:
                raise ValueError(f"Bundle resource names are 1 to 256 characters, got "
                                 f"{k!r:.60}")
            if not math.isfinite(v) or v * P.UNIT >= 2**63:
                raise ValueError(f"Bundle resource {k!r} must be a finite number below "
                                 f"{2**63 // P.UNIT}, got {v!r}")
        if "object_store_memory" in b:
            raise ValueError("object_store_memory in a bundle reserves nothing (Ray "
                             "deprecates it); zray refuses it")
        out.append(P.to_units(b))
    return out


def placement_group(bundles: list, strategy: str = "PACK", name: str = "",
                    lifetime: Optional[str] = None, _soft_target_node_id=None,
                    bundle_label_selector=None, topology_strategy=None) -> PlacementGroup:
    """Reserve ``bundles`` (a list of resource dicts) with ``strategy``: "PACK" (as few
    nodes as possible), "SPREAD" (distinct nodes, best effort), "STRICT_PACK" (one node)
    or "STRICT_SPREAD" (one node per bundle). Returns at once; ``pg.ready()`` tells when
    it is reserved. ``lifetime="detached"``: it outlives its creator."""
    for opt, v in (("_soft_target_node_id", _soft_target_node_id),
                   ("bundle_label_selector", bundle_label_selector),
                   ("topology_strategy", topology_strategy)):
        if v:
            raise ValueError(f"placement_group({opt}=...) is not supported by zray")
    if strategy is None:
        strategy = "PACK"
    if strategy not in STRATEGIES:
        raise ValueError(f"Invalid placement group strategy {strategy}. Supported strategies "
                         f"are: {list(STRATEGIES)}.")
    if lifetime not in (None, "detached"):
        raise ValueError("Placement group `lifetime` argument must be either `None` or "
                         f"'detached'. Got {lifetime}.")
    if not isinstance(name, str):
        raise ValueError(f"Placement group name must be a str, got {name!r}")
    units = _check_bundles(bundles)
    client = _runtime.require_client()
    pg_id = os.urandom(PG_ID_LEN)
    client.request("pg_create", {"pg_id": pg_id, "bundles": units, "strategy": strategy,
                                 "name": name, "namespace": _runtime.current_namespace(),
                                 "lifetime": lifetime})
    return PlacementGroup(PlacementGroupID(pg_id), [P.from_units(b) for b in units])


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Remove a group: its tasks fail with TaskPlacementGroupRemoved, its actors die, its
    resources go back to the nodes."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"remove_placement_group expects a PlacementGroup, got "
                        f"{type(placement_group).__name__}")
    # Answered once the broker has removed it (one round trip): the group's actors are
    # dead by then, so a direct call made afterwards (zray/_direct.py, which does not go
    # through the broker) already knows it and fails as Ray's does.
    _runtime.require_client().request("pg_remove", {"pg_id": placement_group.id.binary()})


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The group named ``placement_group_name`` in the current namespace."""
    if not placement_group_name:
        raise ValueError("Please supply a non-empty value to get_placement_group")
    info = _runtime.require_client().request(
        "pg_get", {"name": placement_group_name, "namespace": _runtime.current_namespace()})
    if info is None:
        raise ValueError(f"Failed to look up placement group with name: "
                         f"{placement_group_name}")
    return PlacementGroup(PlacementGroupID(info["pg_id"]), info["bundles"])


def placement_group_table(placement_group: Optional[PlacementGroup] = None) -> dict:
    """The state of one group, or of every group by id (hex), as Ray shows it."""
    args = {"pg_id": placement_group.id.binary()} if placement_group is not None else {}
    return _runtime.require_client().request("pg_table", args)


def _current_strategy() -> Optional[dict]:
    """The placement-group strategy of the running task or actor, or None."""
    ex = _runtime.executor
    if ex is None:
        return None
    # An actor is in the group it was created in; a task in its own.
    spec = getattr(ex, "actor_spec", None) or getattr(ex, "spec", None)
    s = spec.options.get("strategy") if spec is not None else None
    return s if isinstance(s, dict) and s.get("type") == "placement_group" else None


def get_current_placement_group() -> Optional[PlacementGroup]:
    """The group the running task or actor is in; None in a driver or outside any."""
    s = _current_strategy()
    return PlacementGroup(PlacementGroupID(s["pg_id"])) if s is not None else None


def inherited_strategy() -> Optional[dict]:
    """A child's strategy when its parent captures child tasks (else None)."""
    s = _current_strategy()
    if s is None or not s.get("capture"):
        return None
    return {"type": "placement_group", "pg_id": s["pg_id"], "bundle_index": -1,
            "capture": True}


def strategy_from_options(options: dict):
    """The PlacementGroupSchedulingStrategy meant by the deprecated ``placement_group=``,
    ``placement_group_bundle_index=``, ``placement_group_capture_child_tasks=`` options
    (with Ray's DeprecationWarning), or None when they are not used."""
    from zray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = options.get("placement_group", "default")
    index = options.get("placement_group_bundle_index", -1)
    capture = options.get("placement_group_capture_child_tasks")
    if pg in ("default", None) and index == -1 and not capture:
        return None
    for opt, used in (("placement_group", pg not in ("default", None)),
                      ("placement_group_bundle_index", index != -1),
                      ("placement_group_capture_child_tasks", bool(capture))):
        if used:
            warnings.warn(f"{opt} parameter is deprecated. Use scheduling_strategy="
                          "PlacementGroupSchedulingStrategy(...) instead.",
                          DeprecationWarning, stacklevel=5)
    if options.get("scheduling_strategy") is not None:
        raise ValueError("Setting both the deprecated placement_group options and "
                         "scheduling_strategy is not allowed; use "
                         "scheduling_strategy=PlacementGroupSchedulingStrategy(...) only.")
    if pg in ("default", None):
        if index != -1:
            raise ValueError("If placement group is not set, the value of bundle index "
                             "must be -1.")
        return None  # capture alone, outside a group: nothing to capture into
    return PlacementGroupSchedulingStrategy(pg, index, capture)


def check_fits(options: dict, resources: dict, what: str) -> None:
    """Raise ValueError, as Ray does at submit, when a task names a bundle its placement
    group does not have, or its ``resources`` (units) fit in no bundle (or not in the
    bundle it names)."""
    s = options.get("scheduling_strategy")
    if s is None:
        s = strategy_from_options(options)
    pg = getattr(s, "placement_group", None)
    index = getattr(s, "placement_group_bundle_index", -1)
    if pg is None or pg.is_empty:
        if index != -1:
            raise ValueError("If placement group is not set, the value of bundle index "
                             "must be -1.")
        return
    if not -1 <= index < pg.bundle_count:
        raise ValueError(f"placement group bundle index {index} is invalid. Valid placement "
                         f"group indexes: 0-{pg.bundle_count}")
    bundles = pg.bundle_cache if index < 0 else [pg.bundle_cache[index]]
    need = P.from_units({r: u for r, u in resources.items() if u})
    if not any(all(b.get(r, 0) >= v for r, v in need.items()) for b in bundles):
        raise ValueError(f"Cannot schedule {what} with the placement group because the "
                         f"resource request {need} cannot fit into any bundles for the "
                         f"placement group, {pg.bundle_cache}.")
