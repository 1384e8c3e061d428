"""Calibration statistics for data-aware relaxation, and conversion with them.

One pass of a model over calibration text (packed windows of the training split, like training batches)
accumulates, for every depth position l, the Gram matrix G = X^T X of the input of each LoRA target: the
attention-norm output (q, k, v), the attention context (o), the MLP-norm output (gate, up) and the activated
MLP hidden (down); see model.layerwise.TARGET_INPUTS. Whitened SVD (convert/recursive.py) then fits each
LoRA where those inputs live.

Two modes:
  plain       the ORIGINAL model's inputs, one pass, cached in a directory keyed by model, data and count;
  sequential  depth position l sees the inputs that the already-converted positions 0..l-1 produce (GPTQ /
              SVD-LLM practice), so each LoRA corrects the error that reaches it; the residual is still to
              the original layer's weights.

Memory: one fp64 matrix per (depth, input): L * (3 d^2 + m^2) * 8 bytes (m the MLP width). SmolLM2-135M:
30 * (3 * 576^2 + 1536^2) * 8 B = 0.8 GB in RAM (kept as fp32 on disk, 0.4 GB). Gemma-2B's down projection
alone is 16,384^2 per layer: 18 * 2.1 GB in fp64, which does not fit a host; use diagonal=True there (keeps
only diag(G), ASVD-like scaling, L * (3 d + m) numbers).

Streamed: hidden states of the calibration windows stay on the host between layers ([tokens, D] fp32, 75 MB
for 32k tokens of SmolLM2), one jitted layer runs per batch; Gram sums are fp32 per batch on the device,
accumulated in fp64 on the host. Multi-process: every process reads its own shard (lm_dataset shards by
process) and the sums are added across processes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from rrt_jax.config import VANILLA, LoraInit, ModelConfig, RecursionConfig
from rrt_jax.convert.recursive import (
  lora_template,
  recursive_params,
  relax_depth,
  shared_layers_from,
  to_recursive,
  vanilla_layer_arrays,
)
from rrt_jax.model import with_layer_tree
from rrt_jax.model.layers import LORA
from rrt_jax.model.layerwise import apply_layer, depth_variables, embed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  tokens: int = 32_768  # Calibration tokens over all processes.
  seq_len: int = 512  # Window length (packed documents, like training).
  batch_size: int = 4  # Windows per jitted layer call.
  ridge: float = 1e-3  # Added to G as ridge * mean(diag G) * I: keeps G positive definite.
  diagonal: bool = False  # Keep only diag(G): for models whose MLP width makes full Gram matrices too big.
  sequential: bool = False  # Inputs of position l from the converted positions 0..l-1.

  def __post_init__(self):
    if self.seq_len < 2 or self.batch_size < 1:
      raise ValueError(f'calibration seq_len must be >= 2 and batch_size >= 1, got {self.seq_len}, '
                       f'{self.batch_size}.')
    if self.tokens < self.seq_len:
      raise ValueError(f'calibration tokens={self.tokens} is less than one window (seq_len={self.seq_len}): '
                       'calibrate on at least a few thousand tokens (e.g. 32768).')
    if self.ridge < 0:
      raise ValueError(f'calibration ridge must be >= 0, got {self.ridge}.')

  @property
  def batches(self) -> int:
    """Batches per process."""
    per_batch = self.seq_len * self.batch_size * jax.process_count()
    return -(-self.tokens // per_batch)


@dataclasses.dataclass
class GramStats:
  """grams[l][name]: sum over calibration tokens of x x^T ([d_in, d_in], or its diagonal [d_in]) of depth
  position l's input `name`; tokens: how many tokens were summed."""

  grams: list[dict[str, np.ndarray]]
  tokens: int
  diagonal: bool
  ridge: float = 1e-3

  def save(self, path: str) -> None:
    flat = {f'{depth}/{name}': g.astype(np.float32) for depth, grams in enumerate(self.grams)
            for name, g in grams.items()}
    meta = json.dumps({'tokens': self.tokens, 'diagonal': self.diagonal, 'depths': len(self.grams)})
    tmp = path + '.tmp.npz'
    np.savez(tmp, __meta__=np.frombuffer(meta.encode(), np.uint8), **flat)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str, ridge: float = 1e-3) -> GramStats:
    with np.load(path) as data:
      meta = json.loads(bytes(data['__meta__']).decode())
      grams = [{} for _ in range(meta['depths'])]
      for key in data.files:
        if key != '__meta__':
          depth, name = key.split('/')
          grams[int(depth)][name] = data[key].astype(np.float64)
    return cls(grams, meta['tokens'], meta['diagonal'], ridge)


def calibration_batches(source, tokenizer, config: CalibrationConfig, max_seq_len: int | None = None,
                        seed: int = 1234, replicated: bool = False) -> list[dict]:
  """This process's calibration batches: packed windows of `source` documents ({'inputs', 'positions',
  'segment_ids', ...} of [batch_size, seq_len], as the training pipeline makes them). replicated: every process
  reads the same config.tokens tokens (instead of its shard of them)."""
  from rrt_jax.data.pipeline import PipelineConfig, lm_dataset
  pipeline = PipelineConfig(config.seq_len, config.batch_size, seed=seed, num_epochs=1)
  shard = dict(shard_index=0, shard_count=1) if replicated else {}
  it = iter(lm_dataset(source, tokenizer, pipeline, max_seq_len=max_seq_len, **shard))
  count = -(-config.tokens // (config.seq_len * config.batch_size)) if replicated else config.batches
  batches = []
  for _ in range(count):
    try:
      batches.append(jax.tree.map(np.asarray, next(it)))
    except StopIteration:
      break
  got = sum(int((b['segment_ids'] > 0).sum()) for b in batches)
  wanted = config.tokens if replicated else config.tokens // jax.process_count()
  if got < wanted // 2:
    raise ValueError(f'The calibration source gave {got} tokens on this process, far fewer than the {wanted} asked '
                     'for: lower calibration tokens or use a larger split.')
  return batches


def data_fingerprint(batches: Sequence[dict]) -> str:
  digest = hashlib.sha256()
  for b in batches:
    digest.update(np.ascontiguousarray(b['inputs']).tobytes())
    digest.update(np.ascontiguousarray(b['segment_ids']).tobytes())
  return digest.hexdigest()[:16]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _layer_with_grams(cfg: ModelConfig, rec: RecursionConfig, diagonal: bool, layer_variables: dict,
                      h_BxSxD: jax.Array, positions_BxS: jax.Array, segment_ids_BxS: jax.Array):
  """One layer on a batch: (output hidden states, {input name: fp32 Gram sum over the batch's real tokens})."""
  h_out, inputs = apply_layer(cfg, rec, layer_variables, h_BxSxD, positions_BxS, segment_ids_BxS,
                              capture_inputs=True)
  real = (segment_ids_BxS > 0).astype(jnp.float32)[..., None]
  grams = {}
  for name, x in inputs.items():
    x = x.astype(jnp.float32).reshape(-1, x.shape[-1]) * real.reshape(-1, 1)
    grams[name] = (jnp.sum(x * x, axis=0) if diagonal
                   else jnp.einsum('ni,nj->ij', x, x, precision=jax.lax.Precision.HIGHEST))
  return h_out, grams


@functools.partial(jax.jit, static_argnums=(0, 1))
def _layer(cfg: ModelConfig, rec: RecursionConfig, layer_variables: dict, h_BxSxD: jax.Array,
           positions_BxS: jax.Array, segment_ids_BxS: jax.Array) -> jax.Array:
  return apply_layer(cfg, rec, layer_variables, h_BxSxD, positions_BxS, segment_ids_BxS)[0]


def _sum_over_processes(grams: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  if jax.process_count() == 1:
    return grams
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather({k: v.astype(np.float32) for k, v in grams.items()})
  return {k: np.asarray(v, np.float64).sum(axis=0) for k, v in gathered.items()}


def _accumulate(cfg, rec, diagonal, layer_variables, hidden: list, batches) -> tuple[list, dict[str, np.ndarray]]:
  """Runs one layer over every batch: (its outputs per batch, fp64 Gram sums of its inputs)."""
  sums, outputs = {}, []
  for h, batch in zip(hidden, batches, strict=True):
    h_out, grams = _layer_with_grams(cfg, rec, diagonal, layer_variables, h, batch['positions'],
                                     batch['segment_ids'])
    outputs.append(h_out)
    for name, g in grams.items():
      sums[name] = sums.get(name, 0.0) + np.asarray(g, np.float64)
  return outputs, _sum_over_processes(sums)


def _vanilla_depth(vanilla: dict, cfg: ModelConfig, depth: int) -> dict:
  return depth_variables(vanilla, cfg, VANILLA, depth)


def collect_grams(cfg: ModelConfig, vanilla: dict, batches: Sequence[dict], config: CalibrationConfig,
                  cache_dir: str | None = None, progress: bool = True) -> GramStats:
  """Gram matrices of the ORIGINAL model's projection inputs at every depth position (one pass). With
  cache_dir, reuses a file keyed by the model config, the calibration tokens and the mode."""
  tokens = int(sum((b['segment_ids'] > 0).sum() for b in batches))
  path = None
  if cache_dir:
    key = hashlib.sha256(json.dumps([dataclasses.asdict(cfg), data_fingerprint(batches), tokens, config.diagonal,
                                     jax.process_count()], sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f'grams-{key}.npz')
    if os.path.exists(path):
      log.info('Calibration statistics from %s', path)
      return GramStats.load(path, config.ridge)
  vanilla = {'params': vanilla['params'] if 'params' in vanilla else vanilla}
  hidden = [embed(cfg, vanilla, b['inputs']) for b in batches]
  grams = []
  for depth in tqdm(range(cfg.num_layers), desc='calibration', unit='layer', disable=not progress):
    hidden, sums = _accumulate(cfg.layer_config(depth), VANILLA, config.diagonal, _vanilla_depth(vanilla, cfg, depth),
                               hidden, batches)
    grams.append(sums)
  stats = GramStats(grams, tokens * jax.process_count(), config.diagonal, config.ridge)
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    if jax.process_index() == 0:
      stats.save(path)
  return stats


def convert_sequential(vanilla: dict, cfg: ModelConfig, rec: RecursionConfig, batches: Sequence[dict],
                       config: CalibrationConfig, progress: bool = True) -> dict:
  """Relaxed variables whose LoRA at depth position l is fitted (whitened SVD) to the inputs that the
  converted positions 0..l-1 produce, against the original layer l's weights. MIDDLE_CYCLE's unique layers are
  copies of the original ones: the stream passes through them, nothing is fitted there."""
  if rec.lora_init != LoraInit.WHITENED_SVD:
    raise ValueError(f"Sequential calibration fits whitened SVD LoRA: use lora_init='whitened_svd', not "
                     f'{rec.lora_init.value!r}.')
  params = vanilla['params'] if 'params' in vanilla else vanilla
  vanilla = {'params': params}
  vanilla_layers = vanilla_layer_arrays(params)
  shared = shared_layers_from(vanilla_layers, cfg, rec)
  flat_vanilla, flat_shared = traverse_util.flatten_dict(vanilla_layers), traverse_util.flatten_dict(shared)
  out = {path: np.zeros(t.shape, np.float32) for path, t in lora_template(cfg, rec).items()}
  converted_params = recursive_params(params, vanilla_layers, shared, cfg, rec)
  hidden = [embed(cfg, vanilla, b['inputs']) for b in batches]
  for depth in tqdm(range(cfg.num_layers), desc='sequential calibration', unit='layer', disable=not progress):
    if not rec.is_unique_depth(depth, cfg.num_layers):
      _, grams = _accumulate(cfg.layer_config(depth), VANILLA, config.diagonal, _vanilla_depth(vanilla, cfg, depth),
                             hidden, batches)
      relax_depth(depth, flat_vanilla, flat_shared, out, cfg, rec, grams, config.ridge)
    converted = {'params': converted_params, LORA: with_layer_tree({}, traverse_util.unflatten_dict(out))}
    layer = depth_variables(converted, cfg, rec, depth)
    layer_cfg = cfg.layer_config(depth)  # One layer of this depth's attention type.
    hidden = [_layer(layer_cfg, rec, layer, h, b['positions'], b['segment_ids']) for h, b in zip(hidden, batches,
                                                                                                 strict=True)]
  variables = {'params': converted_params, LORA: with_layer_tree({}, traverse_util.unflatten_dict(out))}
  return jax.tree.map(jnp.asarray, variables)


def convert(vanilla: dict, cfg: ModelConfig, rec: RecursionConfig, batches: Iterable[dict] | None = None,
            config: CalibrationConfig = CalibrationConfig(), cache_dir: str | None = None,
            progress: bool = True) -> dict:
  """Vanilla -> recursive/relaxed variables, calibrated where the init needs it: whitened SVD uses Gram
  matrices of the original model (cached in cache_dir), or sequential calibration with config.sequential."""
  if not rec.has_lora or rec.lora_init != LoraInit.WHITENED_SVD:
    return to_recursive(vanilla, cfg, rec, progress=progress)
  batches = list(batches or [])
  if not batches or not any((b['segment_ids'] > 0).any() for b in batches):
    raise ValueError("lora_init='whitened_svd' needs calibration batches with real tokens (see calibration_batches).")
  if config.sequential:
    return convert_sequential(vanilla, cfg, rec, batches, config, progress)
  stats = collect_grams(cfg, vanilla, batches, config, cache_dir, progress)
  return to_recursive(vanilla, cfg, rec, progress=progress, calibration=stats)
