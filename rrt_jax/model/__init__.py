"""Flax model: one decoder module for the vanilla, recursive and relaxed models."""

from rrt_jax.model.decoder import Decoder, lora_specs, target_dims
from rrt_jax.model.variables import (
    ParamCount,
    check_variables,
    count_params,
    init_cache,
    init_variables,
    layer_tree,
    logical_axes,
    variable_shapes,
)

__all__ = ['Decoder', 'ParamCount', 'check_variables', 'count_params', 'init_cache', 'init_variables',
           'layer_tree', 'logical_axes', 'lora_specs', 'target_dims', 'variable_shapes']
