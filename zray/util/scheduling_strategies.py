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
        from zray.util.placement_group import PlacementGroup

        if placement_group is not None and not isinstance(placement_group, PlacementGroup):
            raise ValueError(f"placement_group must be a PlacementGroup, got "
                             f"{type(placement_group).__name__}")
        if type(placement_group_bundle_index) is not int:
            raise ValueError(f"placement_group_bundle_index must be an int, got "
                             f"{placement_group_bundle_index!r}")
        if placement_group is None or placement_group.is_empty:
            if placement_group_bundle_index != -1:
                raise ValueError("If placement group is not set, the value of bundle "
                                 "index must be -1.")
        elif not -1 <= placement_group_bundle_index < placement_group.bundle_count:
            raise ValueError(f"placement group bundle index {placement_group_bundle_index} "
                             f"is invalid. Valid placement group indexes: "
                             f"0-{placement_group.bundle_count}")
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
