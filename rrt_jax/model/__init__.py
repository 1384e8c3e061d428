"""Flax model: one decoder module for the vanilla, recursive and relaxed models."""

from rrt_jax.model.decoder import (
    Decoder,
    init_cache,
    init_variables,
    layer_tree,
    logical_axes,
    lora_specs,
    target_dims,
)

__all__ = ['Decoder', 'init_cache', 'init_variables', 'layer_tree', 'logical_axes', 'lora_specs', 'target_dims']
