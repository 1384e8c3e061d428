"""AdamW with warmup + cosine/linear decay, global-norm clipping, and optional freezing of the shared weights."""

from __future__ import annotations

import jax
import optax

from rrt_jax.model.layers import LORA

SCHEDULES = ('cosine', 'linear', 'constant')
FROZEN_SHARED_TRAINABLE = (LORA,)  # What trains when the shared weights are frozen.


def trainable_collections(freeze_shared: bool) -> tuple[str, ...] | None:
  """The `trainable` of train.step's init_state / make_train_step: only LoRA with frozen shared weights, else
  None (every collection)."""
  return FROZEN_SHARED_TRAINABLE if freeze_shared else None


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, decay: str = 'cosine',
                           end_ratio: float = 0.1) -> optax.Schedule:
  if decay not in SCHEDULES:
    raise ValueError(f'Unknown decay {decay!r}: choose one of {SCHEDULES}.')
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  if decay == 'cosine':
    after = optax.cosine_decay_schedule(peak, rest, alpha=end_ratio)
  elif decay == 'linear':
    after = optax.linear_schedule(peak, peak * end_ratio, rest)
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warmup, after], [warmup_steps])


def _decay_mask(variables):
  """Weight decay on kernels, embeddings and LoRA matrices; not on norms, biases or vector deltas."""
  def decays(path, _):
    name = getattr(path[-1], 'key', '')
    return name in ('kernel', 'embedding', 'lm_head', 'a', 'b')
  return jax.tree_util.tree_map_with_path(decays, variables)


def make_optimizer(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1,
                   clip_norm: float = 1.0, freeze_shared: bool = False) -> optax.GradientTransformation:
  """AdamW; with freeze_shared only the 'lora' collection trains (an optax mask on the collection).

  A step with trainable=trainable_collections(True) hands this optimizer the LoRA collection alone (no
  gradients of the shared weights are computed); the mask keeps it correct for a step that differentiates
  every collection too (the frozen ones then get zero updates and no optimizer moments)."""
  tx = optax.chain(optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
                   optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=_decay_mask))
  if not freeze_shared:
    return tx

  def labels(variables):
    label = lambda c: 'train' if c in FROZEN_SHARED_TRAINABLE else 'frozen'  # noqa: E731
    return {c: jax.tree.map(lambda _, c=c: label(c), tree) for c, tree in variables.items()}

  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
