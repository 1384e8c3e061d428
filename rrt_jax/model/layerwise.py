"""One depth position at a time: the variables of depth position l and one decoder layer run on its own.

Conversion (calibration statistics, sequential calibration) and layer-wise healing walk the unrolled model
depth by depth; this module is how they do it without knowing variable paths or scan order.

Depth position l of the unrolled model (L = R * K positions) uses shared layer `rec.depth_to_shared(l)` and the
LoRA of (loop `rec.depth_to_loop(l)`, that layer). Under MIDDLE_CYCLE the first and last U positions are unique
layers instead (`rec.unique_part(l)`): their own weights, no LoRA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model.attention import causal_mask
from rrt_jax.model.decoder import Decoder, DecoderLayer, lora_specs
from rrt_jax.model.layers import LORA
from rrt_jax.model.lora import INTERMEDIATES
from rrt_jax.model.variables import layer_tree, with_layer_tree

# The input each LoRA target reads, by the name of the module that produces it: q, k and v read the attention
# norm's output, gate and up the MLP norm's, o the attention context and down the activated MLP hidden.
TARGET_INPUTS = {'q': 'attn_in', 'k': 'attn_in', 'v': 'attn_in', 'o': 'attn_context', 'gate': 'mlp_in',
                 'up': 'mlp_in', 'down': 'mlp_hidden'}
_MODULE_OF = {'q': 'attn', 'k': 'attn', 'v': 'attn', 'o': 'attn', 'gate': 'mlp', 'up': 'mlp', 'down': 'mlp'}


def depth_variables(variables: dict, cfg: ModelConfig, rec: RecursionConfig, depth: int) -> dict:
  """{'params'[, 'lora']} of the ONE layer at depth position `depth` (no leading axes): the shared layer it
  uses and its own (loop, layer) LoRA; for a unique layer of MIDDLE_CYCLE, {'params'} of that layer."""
  part = rec.unique_part(depth, cfg.num_layers)
  if part is not None:
    return {'params': jax.tree.map(lambda x: x[part[1]], layer_tree(variables['params'], part[0]))}
  k, r = rec.depth_to_shared(depth, cfg.num_layers), rec.depth_to_loop(depth, cfg.num_layers)
  out = {'params': jax.tree.map(lambda x: x[k], layer_tree(variables['params']))}
  if LORA in variables:
    out[LORA] = jax.tree.map(lambda x: x[r, k], layer_tree(variables[LORA]))
  return out


def layer_module(cfg: ModelConfig, rec: RecursionConfig, relaxed: bool = True) -> DecoderLayer:
  """The decoder layer of (cfg, rec), for `depth_variables`; relaxed=False: without LoRA (a unique layer)."""
  return DecoderLayer(cfg, rec if relaxed else rec.replace(lora_rank=None))


def embed(cfg: ModelConfig, variables: dict, tokens_BxS: jax.Array) -> jax.Array:
  """The embedded tokens: the input of depth position 0."""
  return Decoder(cfg).apply({'params': variables['params']}, tokens_BxS, method=Decoder.embed)


def apply_layer(cfg: ModelConfig, rec: RecursionConfig, layer_variables: dict, h_BxSxD: jax.Array,
                positions_BxS: jax.Array | None = None, segment_ids_BxS: jax.Array | None = None,
                capture_inputs: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs one layer on full sequences (no cache). Returns (h_out [B, S, D], inputs): with capture_inputs, the
  input of every projection by TARGET_INPUTS name ({'attn_in', 'attn_context', 'mlp_in', 'mlp_hidden'},
  [B, S, d_in] each), else {}. Layer variables without 'lora' (a unique layer of MIDDLE_CYCLE, or a model
  without LoRA) run as a plain layer whatever rec's LoRA settings."""
  b, s, _ = h_BxSxD.shape
  if positions_BxS is None:
    positions_BxS = jnp.broadcast_to(jnp.arange(s), (b, s))
  mask = causal_mask(positions_BxS, segment_ids_BxS)
  layer = layer_module(cfg, rec, LORA in layer_variables)
  if not capture_inputs:
    return layer.apply(layer_variables, h_BxSxD, None, positions_BxS, mask)[0], {}
  (h, _), state = layer.apply(layer_variables, h_BxSxD, None, positions_BxS, mask, mutable=[INTERMEDIATES])
  sown = state[INTERMEDIATES]
  inputs = {}
  for target, name in TARGET_INPUTS.items():
    if target in lora_specs(cfg, rec) and name not in inputs:
      inputs[name] = sown[_MODULE_OF[target]][target]['inputs'][0]
  return h, inputs


def with_depth_lora(variables: dict, cfg: ModelConfig, rec: RecursionConfig, depth: int, layer_lora: dict) -> dict:
  """A copy of `variables` whose (loop, layer) LoRA of depth position `depth` is `layer_lora` (a tree like
  `depth_variables(...)['lora']`). A unique depth of MIDDLE_CYCLE has no LoRA: it raises."""
  k, r = rec.depth_to_shared(depth, cfg.num_layers), rec.depth_to_loop(depth, cfg.num_layers)
  lora = jax.tree.map(lambda full, new: full.at[r, k].set(new.astype(full.dtype)), layer_tree(variables[LORA]),
                      layer_lora)
  return {**variables, LORA: with_layer_tree(variables[LORA], lora)}
