"""Scheduling strategies with Ray's names."""

from __future__ import annotations


class NodeAffinitySchedulingStrategy:
    """Run on the node with ``node_id`` (hex); ``soft=True`` allows another node if it cannot."""

    def __init__(self, node_id: str, soft: bool, _spill_on_unavailable: bool = False,
                 _fail_on_unavailable: bool = False):
        if not isinstance(node_id, str):
            raise ValueError(f"node_id must be a hex string, got {node_id!r}")
        bytes.fromhex(node_id)
        self.node_id = node_id
        self.soft = soft

    def _to_wire(self) -> dict:
        return {"type": "node_affinity", "node_id": self.node_id, "soft": bool(self.soft)}

    def __repr__(self):
        return f"NodeAffinitySchedulingStrategy(node_id={self.node_id}, soft={self.soft})"


class PlacementGroupSchedulingStrategy:
    """Run in placement group ``placement_group``: on bundle
    ``placement_group_bundle_index`` (-1: any bundle with room).
    ``placement_group_capture_child_tasks=True``: the tasks and actors it starts that
    name no strategy of their own run in the group too."""

    def __init__(self, placement_group, placement_group_bundle_index: int = -1,
                 placement_group_capture_child_tasks=None):
        # (duck-typed: zray.util.placement_group imports this module, not the reverse)
        if placement_group is not None and not (
                hasattr(placement_group, "id") and hasattr(placement_group, "is_empty")):
            raise ValueError(f"placement_group must be a PlacementGroup, got "
                             f"{type(placement_group).__name__}")
        if type(placement_group_bundle_index) is not int:
            raise ValueError(f"placement_group_bundle_index must be an int, got "
                             f"{placement_group_bundle_index!r}")
        # (the index is checked against the group's bundles at .remote(), as in Ray)
        self.placement_group = placement_group
        self.placement_group_bundle_index = placement_group_bundle_index
        self.placement_group_capture_child_tasks = placement_group_capture_child_tasks

    def _to_wire(self):
        pg = self.placement_group
        if pg is None or pg.is_empty:
            return None  # no group: the default strategy (and no capture from a parent)
        return {"type": "placement_group", "pg_id": pg.id.binary(),
                "bundle_index": self.placement_group_bundle_index,
                "capture": bool(self.placement_group_capture_child_tasks)}

    def __repr__(self):
        return (f"PlacementGroupSchedulingStrategy(placement_group={self.placement_group}, "
                f"placement_group_bundle_index={self.placement_group_bundle_index}, "
                f"placement_group_capture_child_tasks="
                f"{self.placement_group_capture_child_tasks})")


def _check_values(values, op: str) -> list:
    if not values:
        raise ValueError(f"{op} needs at least one value")
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"The values of {op} must be str, got {v!r} of type {type(v)}.")
    return list(values)


class In:
    """The label's value is one of ``values``."""

    def __init__(self, *values):
        self.values = _check_values(values, "In")


class NotIn:
    """The node has no such label, or its value is none of ``values``."""

    def __init__(self, *values):
        self.values = _check_values(values, "NotIn")


class Exists:
    """The node has the label."""


class DoesNotExist:
    """The node does not have the label."""


_OPS = {In: "in", NotIn: "not_in", Exists: "exists", DoesNotExist: "does_not_exist"}


def _expressions(exprs, param: str) -> list:
    if exprs is None:
        return []
    if not isinstance(exprs, dict):
        raise ValueError(f'The {param} parameter must be a map (e.g. {{"key1": In("value1")}}) '
                         f"but got type {type(exprs)}.")
    out = []
    for key, op in exprs.items():
        if not isinstance(key, str):
            raise ValueError(f"The map key of the {param} parameter must be of type str, got "
                             f"{key!r} of type {type(key)}.")
        kind = _OPS.get(type(op))
        if kind is None:
            raise ValueError(f"The map value for key {key} of the {param} parameter must be "
                             f"one of the `In`, `NotIn`, `Exists` or `DoesNotExist` operator "
                             f"but got {op!r} of type {type(op)}.")
        out.append([key, kind, list(getattr(op, "values", []))])
    return out


class NodeLabelSchedulingStrategy:
    """Run on a node whose labels satisfy every ``hard`` expression, preferring nodes
    that satisfy the ``soft`` ones: ``{"zone": In("a", "b"), "gpu": Exists()}``."""

    def __init__(self, hard, *, soft=None):
        self.hard = _expressions(hard, "hard")
        self.soft = _expressions(soft, "soft")
        if not (self.hard or self.soft):
            raise ValueError("The `hard` and `soft` parameter of NodeLabelSchedulingStrategy "
                             "cannot both be empty.")

    def _to_wire(self) -> dict:
        return {"type": "node_label", "hard": self.hard, "soft": self.soft}

    def __repr__(self):
        return f"NodeLabelSchedulingStrategy(hard={self.hard}, soft={self.soft})"
