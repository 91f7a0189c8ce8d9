"""Utilities with Ray's names (zray.util.scheduling_strategies, ...)."""
