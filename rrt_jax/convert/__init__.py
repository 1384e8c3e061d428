"""Checkpoint readers and the vanilla -> recursive -> relaxed conversion."""

from rrt_jax.convert.recursive import source_layers, tied_depths, to_recursive

__all__ = ['source_layers', 'tied_depths', 'to_recursive']
