"""A recursive or relaxed model as the plain vanilla model its final exit computes.

Depth position l of the unrolled model holds the shared layer it uses with its own (loop, layer) relaxation merged
in: kernel + scale * A @ B for every LoRA target, scale + scale_delta and bias + bias_delta for the vector deltas
(exactly the sums LoraDense and Norm compute on the fly). MIDDLE_CYCLE's prelude and coda are copied as they are.
The result is {'params'} of Decoder(cfg) with cfg.num_layers layers; the forward pass of that model equals the
recursive model's last exit (every loop, then the coda), up to float rounding of the merged sums.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from rrt_jax.config import CODA, PRELUDE, VANILLA, ModelConfig, RecursionConfig
from rrt_jax.model import PART_PATHS, check_variables, lora_specs, with_layer_tree
from rrt_jax.model.layers import LORA
from rrt_jax.model.layerwise import depth_variables

_LORA_FACTORS = ('a', 'b')
_DELTA_SUFFIX = '_delta'


def merge_layer(cfg: ModelConfig, rec: RecursionConfig, layer_variables: dict) -> dict:
  """One layer's params with its relaxation merged in (fp32), from `depth_variables`' {'params'[, 'lora']}.
  Every 'lora' leaf must find its place: a relaxation kind this function does not know is an error, never
  silently dropped."""
  params = traverse_util.flatten_dict(jax.tree.map(np.asarray, layer_variables['params']))
  lora = traverse_util.flatten_dict(jax.tree.map(np.asarray, layer_variables.get(LORA, {})))
  specs = lora_specs(cfg, rec)
  used = set()
  merged = {}
  for path, value in params.items():
    module, leaf = path[:-1], path[-1]
    w = value.astype(np.float64)  # Merge in float64: the sum is then rounded once, to fp32.
    if leaf == 'kernel' and module + ('a',) in lora:
      a, b = lora[module + ('a',)], lora[module + ('b',)]
      w = w + specs[module[-1]].scale * (a.astype(np.float64) @ b.astype(np.float64))
      used |= {module + ('a',), module + ('b',)}
    delta = module + (leaf + _DELTA_SUFFIX,)
    if delta in lora:
      w = w + lora[delta].astype(np.float64)
      used.add(delta)
    merged[path] = w.astype(np.float32)
  if unused := sorted('/'.join(p) for p in set(lora) - used):
    raise ValueError(f'Relaxation variables {unused[:4]} have no shared weight to merge into: cannot unroll.')
  return traverse_util.unflatten_dict(merged)


def unroll(cfg: ModelConfig, rec: RecursionConfig, variables: dict) -> dict:
  """{'params'} of the vanilla Decoder(cfg) (cfg.num_layers layers, fp32) equal to the final exit of
  Decoder(cfg, rec) with `variables`. A vanilla model (rec = VANILLA) comes back as it is, in fp32."""
  check_variables(variables, cfg, rec, 'variables to unroll')
  variables = jax.tree.map(np.asarray, variables)  # Once to the host, not once per depth position.
  depths = [traverse_util.flatten_dict(merge_layer(cfg, rec, depth_variables(variables, cfg, rec, d)))
            for d in range(cfg.num_layers)]
  layers = traverse_util.unflatten_dict({path: np.stack([d[path] for d in depths]) for path in depths[0]})
  unique_roots = {PART_PATHS[PRELUDE][0], PART_PATHS[CODA][0]}
  rest = {k: jax.tree.map(lambda x: np.asarray(x, np.float32), v)
          for k, v in variables['params'].items() if k not in unique_roots}
  out = {'params': with_layer_tree(rest, layers)}
  check_variables(out, cfg, VANILLA, 'the unrolled params')
  return out
