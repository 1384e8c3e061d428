"""Vanilla params -> recursive params (looping init) -> relaxed (per-depth LoRA, SVD or zero init).

Paper section 2. The same `RecursionConfig.depth_to_shared` decides which depth positions are tied to which
shared layer, here and in the model's scan order. Under looping='middle_cycle' the first and last U layers are
copied as they are (the prelude and the coda, no LoRA) and the looping inits and relaxation apply to the middle
L - 2U layers alone.

SVD init, in our (d_in, d_out) kernel layout: the residual R_l = W_l - W'_k (fp32) of every depth position l
and target is factored R = U S Vh; A = U_r, B = S_r Vh_r / scale, so that scale * x A B = x R_r for every
lora_alpha, and = x R exactly at full rank (r = min(d_in, d_out)).

Whitened SVD init (lora_init='whitened_svd', SVD-LLM): the same residual, factored to minimise the error on the
projection's calibration inputs X rather than in weight space (`whitened_svd_lora`); also exact at full rank.
"""

from __future__ import annotations

import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rrt_jax.config import CODA, PRELUDE, InitMethod, Looping, LoraInit, ModelConfig, NormInit, RecursionConfig
from rrt_jax.model import layer_tree, lora_specs, variable_shapes, with_layer_tree
from rrt_jax.model.layers import LORA
from rrt_jax.model.lora import lora_a_init

log = logging.getLogger(__name__)

NORM_MODULES = ('attn_norm', 'mlp_norm', 'attn_post_norm', 'mlp_post_norm')
QK_NORMS = ('q_norm', 'k_norm')  # Under 'attn' (ModelConfig.qk_norm).


def source_layers(rec: RecursionConfig, num_layers: int) -> list[int]:
  """0-indexed source layer of each shared layer for the selection inits (not Average). MIDDLE_CYCLE: the
  init picks among the middle layers (depths U..L-U-1) as CYCLE would among the layers of an L - 2U model."""
  if rec.looping == Looping.MIDDLE_CYCLE:
    u = rec.unique_layers
    middle = rec.replace(looping=Looping.CYCLE, unique_layers=0)
    return [u + d for d in source_layers(middle, num_layers - 2 * u)]
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
  return [d for d in looped_depths(rec, num_layers) if rec.depth_to_shared(d, num_layers) == shared]


def looped_depths(rec: RecursionConfig, num_layers: int) -> list[int]:
  """The depth positions that use a shared layer (all of them but MIDDLE_CYCLE's unique ones)."""
  return [d for d in range(num_layers) if not rec.is_unique_depth(d, num_layers)]


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
    is_norm = path[0] in NORM_MODULES or (path[0] == 'attn' and path[1] in QK_NORMS)
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


def whitening_factor(gram_IxI: np.ndarray, ridge: float, what: str = 'the Gram matrix') -> np.ndarray:
  """S with S S^T = G + ridge * mean(diag G) * I (lower Cholesky factor; a vector = diagonal S for a diagonal
  Gram matrix given as its diagonal). `what` names the matrix in the error."""
  gram = np.asarray(gram_IxI, np.float64)
  diag = gram if gram.ndim == 1 else np.diag(gram)
  damp = ridge * max(float(np.mean(diag)), 0.0)
  fix = (f'raise the calibration ridge (now {ridge:g}; e.g. {max(ridge * 10, 1e-6):g}) or calibrate on more '
         'tokens')
  if gram.ndim == 1:
    if not np.all(diag + damp > 0):
      raise ValueError(f'{what} has non-positive diagonal entries: it is not positive definite; {fix}.')
    return np.sqrt(diag + damp)
  try:
    return np.linalg.cholesky(gram + damp * np.eye(gram.shape[0]))
  except np.linalg.LinAlgError:
    raise ValueError(f'{what} is not positive definite; {fix}.') from None


def whitened_svd_lora(residual_IxO: np.ndarray, gram_IxI: np.ndarray, rank: int, scale: float,
                      ridge: float = 1e-3, what: str = 'the Gram matrix') -> tuple[np.ndarray, np.ndarray]:
  """A [d_in, r], B [r, d_out] minimising ||X (R - scale A B)||_F given G = X^T X (SVD-LLM / EoRA).

  With G + ridge = S S^T, ||X M||_F = ||S^T M||_F, so the best rank-r M is S^-T [S^T R]_r: take the SVD
  S^T R = U s Vh and set A = S^-T U_r sqrt(s_r), B = sqrt(s_r) Vh_r / scale (the singular values split
  between the factors, as PiSSA does, so both train at similar scales). At full rank A B = S^-T S^T R = R."""
  residual = np.asarray(residual_IxO, np.float64)
  s_factor = whitening_factor(gram_IxI, ridge, what)
  if s_factor.ndim == 1:  # Diagonal whitening: S^T R scales the rows of R.
    u, s, vh = np.linalg.svd(s_factor[:, None] * residual, full_matrices=False)
    a = u[:, :rank] / s_factor[:, None]
  else:
    u, s, vh = np.linalg.svd(s_factor.T @ residual, full_matrices=False)
    a = np.linalg.solve(s_factor.T, u[:, :rank])
  root = np.sqrt(s[:rank])
  return (a * root).astype(np.float32), ((root[:, None] * vh[:rank]) / scale).astype(np.float32)


def lora_template(cfg: ModelConfig, rec: RecursionConfig) -> dict:
  """Flat {path: ShapeDtypeStruct} of the 'lora' layer subtree ([R, K, ...] leaves)."""
  return traverse_util.flatten_dict(layer_tree(variable_shapes(cfg, rec)[LORA]))


def relax_depth(depth: int, flat_vanilla: dict, flat_shared: dict, out: dict, cfg: ModelConfig,
                rec: RecursionConfig, grams: dict | None = None, ridge: float = 1e-3) -> None:
  """Fills depth position `depth`'s (loop, layer) entries of the flat 'lora' arrays `out` in place.

  grams: for whitened SVD, {input name (model.layerwise.TARGET_INPUTS): G [d_in, d_in] or its diagonal} of
  this depth position's calibration inputs."""
  from rrt_jax.model.layerwise import TARGET_INPUTS
  num_layers = cfg.num_layers
  specs = lora_specs(cfg, rec)
  b, k = rec.depth_to_loop(depth, num_layers), rec.depth_to_shared(depth, num_layers)
  for path in list(out):
    *module, leaf = path
    module = tuple(module)
    if leaf in ('scale_delta', 'bias_delta'):
      if rec.lora_init != LoraInit.ZERO:  # Zero init leaves the deltas at 0: the recursive model.
        name = module + (leaf.removesuffix('_delta'),)
        out[path][b, k] = flat_vanilla[name][depth] - flat_shared[name][k]
    elif leaf == 'a':
      target = module[-1]
      spec = specs[target]
      kernel = module + ('kernel',)
      if rec.lora_init == LoraInit.ZERO:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(rec.seed), depth),
                                 zlib.crc32('/'.join(module).encode()))
        out[path][b, k] = np.asarray(lora_a_init(key, out[path].shape[2:], jnp.float32))
        continue
      residual = np.asarray(flat_vanilla[kernel][depth], np.float32) - flat_shared[kernel][k]
      if rec.lora_init == LoraInit.SVD:
        a, b_mat = svd_lora(residual, spec.rank, spec.scale)
      else:
        if grams is None:
          raise ValueError("lora_init='whitened_svd' needs calibration statistics: convert with "
                           'rrt_jax.convert.calibration.convert (or pass calibration= to to_recursive).')
        name = TARGET_INPUTS[target]
        a, b_mat = whitened_svd_lora(residual, grams[name], spec.rank, spec.scale, ridge,
                                     f'The Gram matrix of {name} (input of {target}) at depth {depth}')
      out[path][b, k], out[module + ('b',)][b, k] = a, b_mat


def relax(vanilla_layers: dict, shared: dict, cfg: ModelConfig, rec: RecursionConfig,
          progress: bool = False, calibration=None) -> dict:
  """Per-(loop, layer) LoRA and vector deltas [R, K, ...] (the 'lora' layer subtree). calibration: a
  convert.calibration.GramStats, needed for lora_init='whitened_svd'."""
  flat_vanilla = traverse_util.flatten_dict(vanilla_layers)
  flat_shared = traverse_util.flatten_dict(shared)
  out = {path: np.zeros(t.shape, np.float32) for path, t in lora_template(cfg, rec).items()}
  depths = looped_depths(rec, cfg.num_layers)  # Unique layers are exact copies: nothing to relax.
  if progress:
    from tqdm import tqdm
    depths = tqdm(depths, desc=f'relax ({rec.lora_init.value} LoRA)', unit='layer')
  for depth in depths:
    grams = calibration.grams[depth] if calibration is not None else None
    relax_depth(depth, flat_vanilla, flat_shared, out, cfg, rec, grams,
                calibration.ridge if calibration is not None else 1e-3)
  return traverse_util.unflatten_dict(out)


def vanilla_layer_arrays(vanilla: dict) -> dict:
  """The vanilla model's layer subtree as numpy arrays [L, ...]."""
  params = vanilla['params'] if 'params' in vanilla else vanilla
  return jax.tree.map(np.asarray, layer_tree(params))


def recursive_params(params: dict, vanilla_layers: dict, shared: dict, cfg: ModelConfig,
                     rec: RecursionConfig) -> dict:
  """The recursive model's 'params': the vanilla ones with the shared layers [K, ...] in place of the L layers
  and, under MIDDLE_CYCLE, the first and last U vanilla layers as the prelude and the coda."""
  out = with_layer_tree(params, shared)
  u = rec.unique_layers
  if u:
    out = with_layer_tree(out, jax.tree.map(lambda x: x[:u], vanilla_layers), PRELUDE)
    out = with_layer_tree(out, jax.tree.map(lambda x: x[cfg.num_layers - u:], vanilla_layers), CODA)
  return out


def to_recursive(vanilla: dict, cfg: ModelConfig, rec: RecursionConfig, progress: bool = False,
                 calibration=None) -> dict:
  """Vanilla variables {'params'} -> recursive variables {'params'[, 'lora']} for Decoder(cfg, rec).
  calibration: convert.calibration.GramStats of the original model, for lora_init='whitened_svd'."""
  params = vanilla['params'] if 'params' in vanilla else vanilla
  vanilla_layers = vanilla_layer_arrays(params)
  shared = shared_layers_from(vanilla_layers, cfg, rec)
  variables = {'params': recursive_params(params, vanilla_layers, shared, cfg, rec)}
  if rec.has_lora:
    variables[LORA] = with_layer_tree({}, relax(vanilla_layers, shared, cfg, rec, progress, calibration))
  return jax.tree.map(jnp.asarray, variables)
