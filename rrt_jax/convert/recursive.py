"""Vanilla params -> recursive params (looping init) -> relaxed (per-depth LoRA, SVD or zero init).

Paper section 2. The same `RecursionConfig.depth_to_shared` decides which depth positions are tied to which
shared layer, here and in the model's scan order.

SVD init, in our (d_in, d_out) kernel layout: the residual R_l = W_l - W'_k (fp32) of every depth position l
and target is factored R = U S Vh; A = U_r, B = S_r Vh_r / scale, so that scale * x A B = x R_r for every
lora_alpha, and = x R exactly at full rank (r = min(d_in, d_out)).
"""

from __future__ import annotations

import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rrt_jax.config import InitMethod, LoraInit, ModelConfig, NormInit, RecursionConfig
from rrt_jax.model import layer_tree, lora_specs, variable_shapes, with_layer_tree
from rrt_jax.model.layers import LORA
from rrt_jax.model.lora import lora_a_init

log = logging.getLogger(__name__)

NORM_MODULES = ('attn_norm', 'mlp_norm')


def source_layers(rec: RecursionConfig, num_layers: int) -> list[int]:
  """0-indexed source layer of each shared layer for the selection inits (not Average)."""
  k = rec.shared_layers(num_layers)
  b = rec.loops
  if rec.init == InitMethod.STEPWISE:
    return [i * b for i in range(k)]
  if rec.init == InitMethod.STEPWISE_ENDS:
    return [int(x) for x in np.round(np.linspace(0, num_layers - 1, k))]
  if rec.init == InitMethod.LOWER:
    return list(range(k))
  if rec.init == InitMethod.UPPER:
    return list(range(num_layers - k, num_layers))
  if rec.init == InitMethod.RANDOM:
    rng = np.random.default_rng(rec.seed)
    return sorted(int(x) for x in rng.choice(num_layers, size=k, replace=False))
  if rec.init == InitMethod.AVERAGE:  # For norm 'choice' under Average: the first tied depth position.
    return [tied_depths(rec, num_layers, i)[0] for i in range(k)]
  raise ValueError(f'Unknown init method {rec.init!r}.')


def tied_depths(rec: RecursionConfig, num_layers: int, shared: int) -> list[int]:
  """Depth positions of the unrolled model that use shared layer `shared`."""
  return [d for d in range(num_layers) if rec.depth_to_shared(d, num_layers) == shared]


def _norm_init(rec: RecursionConfig) -> NormInit:
  if rec.norm_init != NormInit.AUTO:
    return rec.norm_init
  return NormInit.AVG if rec.init == InitMethod.AVERAGE else NormInit.CHOICE


def _identity_norm(cfg: ModelConfig, leaf_name: str, shape) -> np.ndarray:
  one = leaf_name == 'scale' and cfg.norm != 'rms_one_plus'
  return np.ones(shape, np.float32) if one else np.zeros(shape, np.float32)


def shared_layers_from(vanilla_layers: dict, cfg: ModelConfig, rec: RecursionConfig) -> dict:
  """The K shared layers [K, ...] from the vanilla layers [L, ...] by the looping and norm init."""
  num_layers = cfg.num_layers
  k = rec.shared_layers(num_layers)
  src = source_layers(rec, num_layers)
  groups = [tied_depths(rec, num_layers, i) for i in range(k)]
  norm_init = _norm_init(rec)
  shared = {}
  for path, leaf in traverse_util.flatten_dict(vanilla_layers).items():
    leaf = np.asarray(leaf, np.float32)
    if leaf.shape[0] != num_layers:
      raise ValueError(f'Layer param {"/".join(path)} has {leaf.shape[0]} layers, expected {num_layers}.')
    is_norm = path[0] in NORM_MODULES
    method = norm_init.value if is_norm else ('avg' if rec.init == InitMethod.AVERAGE else 'choice')
    if method == 'avg':
      value = np.stack([leaf[g].mean(axis=0) for g in groups])
    elif method == 'choice':
      value = leaf[src]
    else:
      value = _identity_norm(cfg, path[-1], (k,) + leaf.shape[1:])
    shared[path] = value.astype(leaf.dtype)
  return traverse_util.unflatten_dict(shared)


@jax.jit
def _svd(residual_IxO):
  return jnp.linalg.svd(residual_IxO, full_matrices=False)


def svd_lora(residual_IxO: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """A [d_in, r], B [r, d_out] with scale * A @ B = best rank-r approximation of the residual."""
  u, s, vh = (np.asarray(x, np.float64) for x in _svd(jnp.asarray(residual_IxO, jnp.float32)))
  a = u[:, :rank]
  b = (s[:rank, None] * vh[:rank]) / scale
  return a.astype(np.float32), b.astype(np.float32)


def relax(vanilla_layers: dict, shared: dict, cfg: ModelConfig, rec: RecursionConfig,
          progress: bool = False) -> dict:
  """Per-(loop, layer) LoRA and vector deltas [B, K, ...] (the 'lora' layer subtree)."""
  num_layers = cfg.num_layers
  specs = lora_specs(cfg, rec)
  flat_vanilla = traverse_util.flatten_dict(vanilla_layers)
  flat_shared = traverse_util.flatten_dict(shared)
  template = traverse_util.flatten_dict(layer_tree(variable_shapes(cfg, rec)[LORA]))
  out = {path: np.zeros(t.shape, np.float32) for path, t in template.items()}
  rng = jax.random.key(rec.seed)
  depths = range(num_layers)
  if progress:
    from tqdm import tqdm
    depths = tqdm(depths, desc=f'relax ({rec.lora_init.value} LoRA)', unit='layer')
  for depth in depths:
    b = rec.depth_to_loop(depth, num_layers)
    k = rec.depth_to_shared(depth, num_layers)
    for path in template:
      *module, leaf = path
      module = tuple(module)
      if leaf in ('scale_delta', 'bias_delta'):
        if rec.lora_init == LoraInit.SVD:  # Zero init leaves the deltas at 0: the recursive model.
          name = module + (leaf.removesuffix('_delta'),)
          out[path][b, k] = flat_vanilla[name][depth] - flat_shared[name][k]
      elif leaf == 'a':
        spec = specs[module[-1]]
        kernel = module + ('kernel',)
        if rec.lora_init == LoraInit.SVD:
          residual = np.asarray(flat_vanilla[kernel][depth], np.float32) - flat_shared[kernel][k]
          a, b_mat = svd_lora(residual, spec.rank, spec.scale)
          out[path][b, k], out[module + ('b',)][b, k] = a, b_mat
        else:
          key = jax.random.fold_in(jax.random.fold_in(rng, depth), zlib.crc32('/'.join(module).encode()))
          out[path][b, k] = np.asarray(lora_a_init(key, template[path].shape[2:], jnp.float32))
  return traverse_util.unflatten_dict(out)


def to_recursive(vanilla: dict, cfg: ModelConfig, rec: RecursionConfig, progress: bool = False) -> dict:
  """Vanilla variables {'params'} -> recursive variables {'params'[, 'lora']} for Decoder(cfg, rec)."""
  params = vanilla['params'] if 'params' in vanilla else vanilla
  vanilla_layers = jax.tree.map(np.asarray, layer_tree(params))
  shared = shared_layers_from(vanilla_layers, cfg, rec)
  variables = {'params': with_layer_tree(params, shared)}
  if rec.has_lora:
    variables[LORA] = with_layer_tree({}, relax(vanilla_layers, shared, cfg, rec, progress))
  return jax.tree.map(jnp.asarray, variables)
