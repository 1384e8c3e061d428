"""The jitted, sharded train step: student (all loop exits) + frozen teacher in one program.

Gradient accumulation runs as a scan over micro-batches inside the step (one optimizer update per step).
The state buffers are donated, so params and optimizer state are updated in place.

Trainable collections: with `trainable=('lora',)` (frozen shared weights) the step differentiates only those
collections of the student's variables; the rest is an input of the loss, not a differentiated argument, so
no gradient of the shared weights (nor of the embedding) is ever computed, and the optimizer state covers the
trainable collections only. `init_state` and `make_train_step` must be given the same `trainable`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from rrt_jax.model import Decoder
from rrt_jax.train.losses import EARLY_EXIT_SCHEMES, KD_TARGETS, chunked_uptraining_loss, uptraining_loss


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  variables: dict  # {'params', 'lora'?}: every collection, trained or frozen.
  opt_state: Any  # Of the trainable collections only.


@dataclasses.dataclass(frozen=True)
class LossConfig:
  ce_weight: float = 1.0
  kd_weight: float = 0.0
  temperature: float = 1.0
  early_exit: str = 'none'
  exit_alpha: float = 0.1
  kd_target: str = 'teacher'
  # > 0: the loss runs over chunks of this many tokens from the hidden states (chunked_uptraining_loss), so the
  # [E, B, S, V] student and [B, S, V] teacher logits are never whole in memory; 0: from the full logits.
  chunk_size: int = 0

  def __post_init__(self):
    if self.early_exit not in EARLY_EXIT_SCHEMES:
      raise ValueError(f'Unknown loss.early_exit {self.early_exit!r}: choose one of {EARLY_EXIT_SCHEMES}.')
    if self.kd_target not in KD_TARGETS:
      raise ValueError(f'Unknown loss.kd_target {self.kd_target!r}: choose one of {KD_TARGETS}.')
    if self.ce_weight < 0 or self.kd_weight < 0 or self.ce_weight + self.kd_weight <= 0:
      raise ValueError(f'loss.ce_weight={self.ce_weight} and loss.kd_weight={self.kd_weight} must be >= 0 and not '
                       'both 0.')
    if not self.temperature > 0 or not 0 <= self.exit_alpha <= 1:
      raise ValueError(f'loss.temperature={self.temperature} must be > 0 and loss.exit_alpha={self.exit_alpha} in '
                       '[0, 1].')
    if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
      raise ValueError(f'loss.chunk_size={self.chunk_size!r} must be an int >= 0 (tokens per loss chunk; 0 = the '
                       'loss from the full logits).')


def split_trainable(variables: dict, trainable: Sequence[str] | None) -> tuple[dict, dict]:
  """(trained collections, frozen collections) of `variables`; trainable None = every collection trains."""
  if trainable is None:
    return dict(variables), {}
  missing = [c for c in trainable if c not in variables]
  if missing:
    raise ValueError(f'The trainable collections {missing} are not in the variables ({sorted(variables)}): '
                     'freezing the shared weights trains only LoRA, so it needs recursion.lora_rank set.')
  return ({c: v for c, v in variables.items() if c in trainable},
          {c: v for c, v in variables.items() if c not in trainable})


def init_state(variables: dict, tx: optax.GradientTransformation,
               trainable: Sequence[str] | None = None) -> TrainState:
  """Step 0 with the optimizer state of the `trainable` collections (None = all)."""
  return TrainState(step=jnp.zeros((), jnp.int32), variables=variables,
                    opt_state=tx.init(split_trainable(variables, trainable)[0]))


def make_train_step(student: Decoder, teacher: Decoder | None, tx: optax.GradientTransformation,
                    loss_cfg: LossConfig, grad_accum: int = 1, trainable: Sequence[str] | None = None):
  """step(state, teacher_variables, batch) -> (state, metrics). batch: dict of [global_batch, S] arrays.
  trainable: the collections that get gradients and updates (None = all); the state must come from
  `init_state` with the same value. metrics['grad_norm'] is the norm of the trained collections' gradients."""
  use_teacher = teacher is not None and loss_cfg.kd_weight > 0
  trainable = None if trainable is None else tuple(trainable)

  loss_kwargs = dataclasses.asdict(loss_cfg)
  chunk_size = loss_kwargs.pop('chunk_size')

  def loss_fn(train_vars, frozen_vars, teacher_variables, batch):
    args = (batch['inputs'], batch['positions'], batch['segment_ids'])
    variables = {**frozen_vars, **train_vars}
    if chunk_size:
      # Hidden states only; the chunked loss applies the heads a chunk at a time.
      hidden, _ = student.apply(variables, *args, method=Decoder.hidden_states)
      teacher_hidden = teacher_head = None
      if use_teacher:
        teacher_hidden = teacher.apply(teacher_variables, *args, method=Decoder.hidden_states)[0][-1]
        teacher_head = lambda h: teacher.apply(teacher_variables, h, method=Decoder.logits)  # noqa: E731
      loss, metrics = chunked_uptraining_loss(
          hidden, lambda h: student.apply(variables, h, method=Decoder.logits), batch['targets'],
          batch['loss_mask'], teacher_hidden, teacher_head, chunk_size=chunk_size, **loss_kwargs)
    else:
      logits, _ = student.apply(variables, *args, all_exits=True)
      teacher_logits = teacher.apply(teacher_variables, *args)[0] if use_teacher else None
      loss, metrics = uptraining_loss(logits, batch['targets'], batch['loss_mask'], teacher_logits, **loss_kwargs)
    metrics['tokens'] = jnp.sum(batch['loss_mask'])
    return loss, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # w.r.t. the trained collections only.

  def step(state: TrainState, teacher_variables, batch):
    train_vars, frozen_vars = split_trainable(state.variables, trainable)
    if grad_accum == 1:
      (loss, metrics), grads = grad_fn(train_vars, frozen_vars, teacher_variables, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, mb):
        (loss, metrics), grads = grad_fn(train_vars, frozen_vars, teacher_variables, mb)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, train_vars, frozen_vars, teacher_variables,
                                                          jax.tree.map(lambda x: x[0], micro)))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, micro)
      loss, grads = loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads)
      metrics = {k: v if k == 'tokens' else v / grad_accum for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, state.opt_state, train_vars)
    variables = {**frozen_vars, **optax.apply_updates(train_vars, updates)}
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    return TrainState(state.step + 1, variables, opt_state), metrics

  return step
