"""Flax model: one decoder module for the vanilla, recursive and relaxed models."""

from rrt_jax.model.decoder import FUSED_PROJECTIONS, Decoder, cache_length, lora_specs, target_dims
from rrt_jax.model.propagation import propagate_kv
from rrt_jax.model.scoring import cross_entropy
from rrt_jax.model.variables import (
    LAYER_PATH,
    MIDDLE,
    PART_PATHS,
    ParamCount,
    check_variables,
    count_params,
    dynamic_loop_variables,
    first_loops,
    init_cache,
    init_variables,
    layer_layout,
    layer_tree,
    logical_axes,
    loop_variables,
    multi_lora_variables,
    one_loop,
    per_layer_cache,
    variable_shapes,
    with_layer_layout,
    with_layer_tree,
)

__all__ = ['FUSED_PROJECTIONS', 'LAYER_PATH', 'MIDDLE', 'PART_PATHS', 'Decoder', 'ParamCount', 'cache_length',
           'check_variables', 'count_params', 'cross_entropy', 'dynamic_loop_variables', 'first_loops', 'init_cache',
           'init_variables', 'layer_layout', 'layer_tree', 'logical_axes', 'loop_variables', 'lora_specs',
           'multi_lora_variables', 'one_loop', 'per_layer_cache', 'propagate_kv', 'target_dims', 'variable_shapes',
           'with_layer_layout', 'with_layer_tree']
