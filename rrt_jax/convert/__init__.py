"""The vanilla -> recursive -> relaxed conversion (checkpoint readers: rrt_jax.pretrained)."""

from rrt_jax.convert.recursive import source_layers, tied_depths, to_recursive

__all__ = ['source_layers', 'tied_depths', 'to_recursive']
