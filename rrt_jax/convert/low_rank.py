"""The low-rank baseline: an untied whitened low-rank compression of the original model.

Every projection kernel W [d_in, d_out] of every layer l is replaced by its whitened-SVD rank-r approximation
A B (A [d_in, r], B [r, d_out], minimising ||X (W - A B)||_F on the calibration inputs X of that projection, see
`recursive.whitened_svd_lora`), with the same rank r for every projection, capped per target at min(d_in, d_out)
as LoRA ranks are. Norms, biases and the embeddings are kept. It is the baseline for a relaxed recursive model
of the same non-embedding parameter count: compression without any sharing (`rank_for_budget` picks r).

Representation (no new modules): a Decoder with RecursionConfig(loops=1, lora_rank=r, relax_vectors=False)
whose projection kernels are zero and whose LoRA holds A and B, so each projection computes x @ 0 + x A B.
The zero kernels are a representation detail: they are not parameters of the compressed model
(`low_rank_param_count` leaves them out), and this form does not have the factored model's FLOPs or memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rrt_jax.config import VANILLA, LoraInit, ModelConfig, RecursionConfig
from rrt_jax.convert.calibration import GramStats
from rrt_jax.convert.recursive import lora_template, vanilla_layer_arrays, whitened_svd_lora
from rrt_jax.model import Decoder, count_params, lora_specs, target_dims, with_layer_tree
from rrt_jax.model.layers import LORA
from rrt_jax.model.layerwise import TARGET_INPUTS


def low_rank_recursion(rank: int) -> RecursionConfig:
  """The RecursionConfig of a rank-`rank` low-rank compressed model (for Decoder and loading its variables)."""
  return RecursionConfig(loops=1, lora_rank=rank, relax_vectors=False, lora_init=LoraInit.WHITENED_SVD)


def low_rank_compress(vanilla: dict, cfg: ModelConfig, calibration: GramStats, rank: int,
                      progress: bool = False) -> tuple[Decoder, dict]:
  """(Decoder, variables) of the original model with every projection of every layer replaced by its whitened
  rank-`rank` approximation. calibration: the ORIGINAL model's Gram statistics (calibration.collect_grams)."""
  if len(calibration.grams) != cfg.num_layers:
    raise ValueError(f'The calibration statistics have {len(calibration.grams)} depth positions, the model '
                     f'{cfg.num_layers} layers: collect them with calibration.collect_grams on this model.')
  rec = low_rank_recursion(rank)
  specs = lora_specs(cfg, rec)
  params = vanilla['params'] if 'params' in vanilla else vanilla
  layers = traverse_util.flatten_dict(vanilla_layer_arrays(params))  # [L, ...] per leaf.
  lora = {path: np.zeros(t.shape, np.float32) for path, t in lora_template(cfg, rec).items()}  # [1, L, ...]
  modules = [tuple(path[:-1]) for path in lora if path[-1] == 'a']
  depths = range(cfg.num_layers)
  if progress:
    from tqdm import tqdm
    depths = tqdm(depths, desc=f'low-rank compression (rank {rank})', unit='layer')
  for depth in depths:
    loop, layer = rec.depth_to_loop(depth, cfg.num_layers), rec.depth_to_shared(depth, cfg.num_layers)
    for module in modules:
      target = module[-1]
      name = TARGET_INPUTS[target]
      a, b = whitened_svd_lora(layers[module + ('kernel',)][depth], calibration.grams[depth][name],
                               specs[target].rank, specs[target].scale, calibration.ridge,
                               f'The Gram matrix of {name} (input of {target}) at depth {depth}')
      lora[module + ('a',)][loop, layer], lora[module + ('b',)][loop, layer] = a, b
  for module in modules:  # The kernels' work is done by the factors: zero (not counted, see low_rank_param_count).
    layers[module + ('kernel',)] = np.zeros_like(layers[module + ('kernel',)])
  variables = {'params': with_layer_tree(params, traverse_util.unflatten_dict(layers)),
               LORA: with_layer_tree({}, traverse_util.unflatten_dict(lora))}
  return Decoder(cfg, rec), jax.tree.map(jnp.asarray, variables)


@functools.cache
def _kept_params(cfg: ModelConfig) -> int:
  """Non-embedding parameters that are not projection kernels: norms, biases, the final norm."""
  kernels = cfg.num_layers * sum(d_in * d_out for d_in, d_out in target_dims(cfg).values())
  return count_params(cfg, VANILLA).non_embedding - kernels


def low_rank_param_count(cfg: ModelConfig, rank: int) -> int:
  """Non-embedding parameters a factored rank-`rank` model stores: per layer and projection r_t * (d_in + d_out)
  (r_t = min(rank, d_in, d_out)), plus the norms and biases. The zero kernels of the `low_rank_compress`
  representation are NOT counted: a factored model does not store them. (At r_t = min(d_in, d_out) the factors
  hold more numbers than the dense kernel would.)"""
  if rank < 1:
    raise ValueError(f'rank must be a positive integer, got {rank!r}.')
  factors = sum(min(rank, d_in, d_out) * (d_in + d_out) for d_in, d_out in target_dims(cfg).values())
  return cfg.num_layers * factors + _kept_params(cfg)


def rank_for_budget(cfg: ModelConfig, non_embedding_budget: int) -> int:
  """The largest uniform rank whose `low_rank_param_count` fits `non_embedding_budget` (e.g. the non-embedding
  count_params of the relaxed model to compare with). Ranks past every target's cap store the same, so the
  answer is at most max over targets of min(d_in, d_out)."""
  if low_rank_param_count(cfg, 1) > non_embedding_budget:
    raise ValueError(f'A non-embedding budget of {non_embedding_budget:,} parameters does not fit even rank 1 '
                     f'({low_rank_param_count(cfg, 1):,}): norms and biases alone are {_kept_params(cfg):,}.')
  lo, hi = 1, max(min(dims) for dims in target_dims(cfg).values())
  while lo < hi:  # The count is non-decreasing in the rank: the largest lo that fits.
    mid = (lo + hi + 1) // 2
    if low_rank_param_count(cfg, mid) <= non_embedding_budget:
      lo = mid
    else:
      hi = mid - 1
  return lo
