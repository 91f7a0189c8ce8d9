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
    """Accepted for compatibility; placement groups are not implemented yet."""

    def __init__(self, placement_group, placement_group_bundle_index: int = -1,
                 placement_group_capture_child_tasks=None):
        raise NotImplementedError("placement groups are not supported by zray yet")
