"""Utilities with Ray's names. ``import zray`` imports this package and its submodules
(as ``import ray`` does), so ``zray.util.scheduling_strategies`` needs no import of its own."""

from zray.util import scheduling_strategies
from zray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

__all__ = ["scheduling_strategies", "PlacementGroup", "get_current_placement_group",
           "get_placement_group", "placement_group", "placement_group_table",
           "remove_placement_group"]
