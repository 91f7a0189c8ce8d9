"""Utilities with Ray's names. ``import zray`` imports this package and its submodules
(as ``import ray`` does), so ``zray.util.scheduling_strategies`` needs no import of its own."""

from zray.util import multiprocessing, queue, scheduling_strategies
from zray.util.actor_pool import ActorPool

__all__ = ["scheduling_strategies", "queue", "multiprocessing", "ActorPool"]
