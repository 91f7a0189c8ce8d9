"""Utilities with Ray's names. ``import zray`` imports this package and its submodules
(as ``import ray`` does), so ``zray.util.scheduling_strategies`` needs no import of its own."""

from zray.util import multiprocessing, queue, scheduling_strategies
from zray.util.actor_pool import ActorPool
from zray.util.check_serialize import inspect_serializability
from zray.util.named_actors import list_named_actors
from zray.util.node import get_node_ip_address
from zray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from zray.util.serialization import deregister_serializer, register_serializer

__all__ = ["scheduling_strategies", "queue", "multiprocessing", "ActorPool",
           "inspect_serializability", "list_named_actors", "get_node_ip_address",
           "register_serializer", "deregister_serializer", "PlacementGroup",
           "get_current_placement_group", "get_placement_group", "placement_group",
           "placement_group_table", "remove_placement_group"]
