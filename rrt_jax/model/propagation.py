"""K/V propagation: the keys and values an early-exited token would have cached in the loops it skipped.

A token that exits after loop r never runs loops r+1..R-1, yet later tokens attend to its K/V there. CALM-style
propagation fills those (loop, layer) cache entries from the token's exit state: each layer's attention norm and
K/V projections (with that loop's LoRA) applied to the exit hidden state. Every decode path (rrt_jax.serve: the
unrolled and vmapped steps of generation, the depth-wise batching engine) fills them with `propagate_kv`: the
model itself has no second propagation mechanism.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from rrt_jax.config import LayerLayout, layer_kinds
from rrt_jax.model.attention import KVCache, to_cache_layout
from rrt_jax.model.decoder import Decoder, DecoderLayer
from rrt_jax.model.layers import LORA
from rrt_jax.model.variables import layer_layout, layer_tree, layer_variables


def propagate_kv(model: Decoder, variables: dict, h_BxSxD: jax.Array, positions_BxS: jax.Array,
                 loops: Sequence[int]) -> KVCache:
  """{'k', 'v'} of [len(loops), K, B, kv_heads, S, head_dim] (the cache's layout): what layer k of each loop
  in `loops` caches for hidden states h at these positions. Without LoRA every loop shares the layer, so it is
  computed once."""
  cfg, rec = model.cfg, model.rec
  layer = DecoderLayer(cfg, rec)

  kinds = layer_kinds(cfg, rec)  # Each shared layer's attention type, when they mix local and global ones.
  sliding_K = None if kinds is None else jnp.asarray(kinds['stack'], bool)

  def layer_kv(layer_params: dict, layer_lora: dict | None, sliding) -> tuple[jax.Array, jax.Array]:
    layer_vars = {'params': layer_params} if layer_lora is None else {'params': layer_params, LORA: layer_lora}
    k, v = layer.apply(layer_vars, h_BxSxD, positions_BxS, sliding, method=DecoderLayer.project_kv)
    return to_cache_layout(k), to_cache_layout(v)

  def over_loops(layer_fn, params: dict, sliding) -> tuple[jax.Array, jax.Array]:
    """layer_fn's K/V for each of `loops` ([loops, ...]); the LoRA variables' leading axis is the loop."""
    if LORA not in variables:
      return tuple(jnp.broadcast_to(x, (len(loops),) + x.shape) for x in layer_fn(params['params'], None, sliding))
    lora = jax.tree.map(lambda x: x[jnp.asarray(list(loops))], params[LORA])
    return jax.vmap(layer_fn, in_axes=(None, 0, None))(params['params'], lora, sliding)

  if layer_layout(variables) == LayerLayout.PER_LAYER:  # One buffer per layer: a Python loop, no slicing copies.
    count = len(layer_tree(variables['params']))
    per_layer = [over_loops(layer_kv, layer_variables(variables, k), None if sliding_K is None else sliding_K[k])
                 for k in range(count)]
    k, v = (jnp.stack(xs, axis=1) for xs in zip(*per_layer, strict=True))
  else:
    over_layers = jax.vmap(layer_kv, in_axes=(0, None if LORA not in variables else 0, 0))  # Axis K.
    stacked = {collection: layer_tree(variables[collection]) for collection in variables}
    k, v = over_loops(over_layers, stacked, sliding_K)
  return {'k': k, 'v': v}
