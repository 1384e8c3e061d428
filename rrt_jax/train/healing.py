"""Layer-wise healing (local distillation, as in SHARP / Lillama): before end-to-end KD, each depth position's
own relaxation (its (loop, layer) LoRA and vector deltas) is trained to reproduce the ORIGINAL layer's output
from the inputs the converted model itself produces there.

Depth by depth, in order: the original layer l applied to the converted stream h_l gives the target y_l; a few
Adam steps on the relative squared error ||f_l(h_l) - y_l||^2 / ||y_l - h_l||^2 (real tokens only) fit the LoRA of
position l with the shared weights frozen (only the LoRA is differentiated); the stream then moves on through
the healed layer. A held-out part of the batches measures the error before and after; a position whose
held-out error would rise keeps its previous LoRA, so healing never makes a layer worse on held-out text.

Cost: per position, one original and (steps + 1) converted layer passes over the batches, i.e. about
(steps_per_layer * batch tokens) layer-steps of training per position.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from rrt_jax.config import VANILLA, ModelConfig, RecursionConfig
from rrt_jax.model.layers import LORA
from rrt_jax.model.layerwise import apply_layer, depth_variables, embed, with_depth_lora

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HealingConfig:
  steps_per_layer: int = 16  # Adam steps per depth position (one batch each, cycling over the batches).
  lr: float = 1e-3
  heldout_batches: int = 1  # The last batches, never trained on, measure the error before and after.
  dtype: str = 'float32'  # Compute dtype of the trained layer ('bfloat16': bf16 matmuls, fp32 params).
  tokens: int = 16_384  # Healing text for pipelines that draw the batches (train.setup); heal() takes batches.

  def __post_init__(self):
    if self.steps_per_layer < 0 or self.lr <= 0 or self.heldout_batches < 0:
      raise ValueError(f'HealingConfig needs steps_per_layer >= 0, lr > 0 and heldout_batches >= 0, got {self}.')


@dataclasses.dataclass
class HealingReport:
  """Per healed depth position (the looped ones): held-out relative error of the layer output before and after."""

  before: list[float] = dataclasses.field(default_factory=list)
  after: list[float] = dataclasses.field(default_factory=list)
  kept_previous: list[int] = dataclasses.field(default_factory=list)  # Positions where healing did not help.
  final_train_loss: list[float] = dataclasses.field(default_factory=list)


@jax.jit
def _update_norm(h, y, segment_ids):
  """sum ||y - h||^2 over real tokens: the size of the layer's update, the loss's normaliser."""
  real = (segment_ids > 0).astype(jnp.float32)[..., None]
  return jnp.sum(jnp.square(y - h.astype(jnp.float32)) * real)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(cfg, rec, layer_variables, h, positions, segment_ids):
  return apply_layer(cfg, rec, layer_variables, h, positions, segment_ids)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _errors(cfg, rec, layer_variables, h, y, positions, segment_ids):
  """(sum ||f(h) - y||^2, sum ||y - h||^2) over real tokens."""
  out = apply_layer(cfg, rec, layer_variables, h, positions, segment_ids)[0].astype(jnp.float32)
  real = (segment_ids > 0).astype(jnp.float32)[..., None]
  return jnp.sum(jnp.square(out - y) * real), jnp.sum(jnp.square(y - h.astype(jnp.float32)) * real)


def _relative_error(cfg, rec, layer_variables, hidden, targets, batches) -> float:
  if not batches:
    return float('nan')
  err = [_errors(cfg, rec, layer_variables, h, y, b['positions'], b['segment_ids'])
         for h, y, b in zip(hidden, targets, batches, strict=True)]
  return float(np.sqrt(sum(float(e) for e, _ in err) / max(sum(float(d) for _, d in err), 1e-30)))


def _make_step(cfg: ModelConfig, rec: RecursionConfig, tx: optax.GradientTransformation):
  @jax.jit
  def step(lora, opt_state, params, h, y, positions, segment_ids, norm):
    def loss_fn(lora):
      out = apply_layer(cfg, rec, {'params': params, LORA: lora}, h, positions, segment_ids)[0]
      real = (segment_ids > 0).astype(jnp.float32)[..., None]
      return jnp.sum(jnp.square(out.astype(jnp.float32) - y) * real) / norm

    loss, grads = jax.value_and_grad(loss_fn)(lora)  # Only the LoRA: the shared weights are not differentiated.
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return step


def heal(vanilla: dict, cfg: ModelConfig, rec: RecursionConfig, variables: dict, batches: Sequence[dict],
         config: HealingConfig = HealingConfig(), progress: bool = True) -> tuple[dict, HealingReport]:
  """Heals every depth position of a relaxed model (see the module docstring). batches: packed windows
  ({'inputs', 'positions', 'segment_ids'}), the last `config.heldout_batches` held out. Returns (variables,
  report); the shared weights and every other collection are returned unchanged."""
  if LORA not in variables:
    raise ValueError('Healing trains the per-depth relaxation: convert with lora_rank set (a relaxed model).')
  if len(batches) <= config.heldout_batches:
    raise ValueError(f'Healing needs more batches ({len(batches)}) than heldout_batches ({config.heldout_batches}).')
  vanilla = {'params': vanilla['params'] if 'params' in vanilla else vanilla}
  train_cfg = cfg.replace(dtype=config.dtype)
  tx = optax.adam(config.lr)
  n_train = len(batches) - config.heldout_batches
  hidden = [embed(cfg, vanilla, b['inputs']) for b in batches]
  report = HealingReport()
  depths = tqdm(range(cfg.num_layers), desc='healing', unit='layer', disable=not progress)
  steps = {}  # One compiled step per attention type (a model mixing local and global layers has two).
  for depth in depths:
    layer_cfg = cfg.layer_config(depth)  # This depth's layer, run on its own.
    if rec.is_unique_depth(depth, cfg.num_layers):  # Middle-cycle's unique layers are the original ones.
      layer = depth_variables(variables, cfg, rec, depth)
      hidden = [_forward(layer_cfg, rec, layer, h, b['positions'], b['segment_ids']) for h, b in zip(hidden, batches,
                                                                                              strict=True)]
      continue
    original = depth_variables(vanilla, cfg, VANILLA, depth)
    targets = [_forward(layer_cfg, VANILLA, original, h, b['positions'], b['segment_ids']).astype(jnp.float32)
               for h, b in zip(hidden, batches, strict=True)]
    layer = depth_variables(variables, cfg, rec, depth)
    held = slice(n_train, None)
    before = _relative_error(layer_cfg, rec, layer, hidden[held], targets[held], batches[held])
    lora, opt_state, loss = layer[LORA], tx.init(layer[LORA]), float('nan')
    norms = [max(float(_update_norm(h, y, b['segment_ids'])), 1e-30)
             for h, y, b in zip(hidden[:n_train], targets[:n_train], batches[:n_train], strict=True)]
    if layer_cfg not in steps:
      steps[layer_cfg] = _make_step(train_cfg.layer_config(depth), rec, tx)
    step = steps[layer_cfg]
    for i in range(config.steps_per_layer):
      j = i % n_train
      lora, opt_state, loss = step(lora, opt_state, layer['params'], hidden[j], targets[j], batches[j]['positions'],
                                   batches[j]['segment_ids'], norms[j])
    healed = {'params': layer['params'], LORA: lora}
    after = _relative_error(layer_cfg, rec, healed, hidden[held], targets[held], batches[held])
    if config.heldout_batches and not after < before:
      healed, after = layer, before
      report.kept_previous.append(depth)
    else:
      variables = with_depth_lora(variables, cfg, rec, depth, lora)
    report.before.append(before)
    report.after.append(after)
    report.final_train_loss.append(float(loss))
    depths.set_postfix(before=f'{before:.3f}', after=f'{after:.3f}')
    hidden = [_forward(layer_cfg, rec, healed, h, b['positions'], b['segment_ids']) for h, b in zip(hidden, batches,
                                                                                             strict=True)]
  return variables, report
