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

from rrt_jax.config import layer_kinds
from rrt_jax.model.attention import KVCache
from rrt_jax.model.decoder import Decoder, DecoderLayer
from rrt_jax.model.layers import LORA
from rrt_jax.model.variables import layer_tree


def propagate_kv(model: Decoder, variables: dict, h_BxSxD: jax.Array, positions_BxS: jax.Array,
                 loops: Sequence[int]) -> KVCache:
  """{'k', 'v'} of [len(loops), K, B, S, kv_heads, head_dim]: what layer k of each loop in `loops` caches for
  hidden states h at these positions. Without LoRA every loop shares the layer, so it is computed once."""
  cfg, rec = model.cfg, model.rec
  layer = DecoderLayer(cfg, rec)

  kinds = layer_kinds(cfg, rec)  # Each shared layer's attention type, when they mix local and global ones.
  sliding_K = None if kinds is None else jnp.asarray(kinds['stack'], bool)

  def layer_kv(layer_params: dict, layer_lora: dict | None, sliding) -> tuple[jax.Array, jax.Array]:
    layer_vars = {'params': layer_params} if layer_lora is None else {'params': layer_params, LORA: layer_lora}
    return layer.apply(layer_vars, h_BxSxD, positions_BxS, sliding, method=DecoderLayer.project_kv)

  over_layers = jax.vmap(layer_kv, in_axes=(0, None if LORA not in variables else 0, 0))  # Axis K.
  params = layer_tree(variables['params'])
  if LORA not in variables:
    k, v = (jnp.broadcast_to(x, (len(loops),) + x.shape) for x in over_layers(params, None, sliding_K))
  else:
    lora = jax.tree.map(lambda x: x[jnp.asarray(list(loops))], layer_tree(variables[LORA]))  # [loops, K, ...]
    k, v = jax.vmap(over_layers, in_axes=(None, 0, None))(params, lora, sliding_K)
  return {'k': k, 'v': v}
