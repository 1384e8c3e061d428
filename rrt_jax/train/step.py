"""The jitted, sharded train step: student (all loop exits) + frozen teacher in one program.

Gradient accumulation runs as a scan over micro-batches inside the step (one optimizer update per step).
The state buffers are donated, so params and optimizer state are updated in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from rrt_jax.model import Decoder
from rrt_jax.train.losses import uptraining_loss


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  variables: dict  # {'params', 'lora'?}
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
  ce_weight: float = 1.0
  kd_weight: float = 0.0
  temperature: float = 1.0
  early_exit: str = 'none'
  exit_alpha: float = 0.1
  kd_target: str = 'teacher'


def init_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), variables=variables, opt_state=tx.init(variables))


def make_train_step(student: Decoder, teacher: Decoder | None, tx: optax.GradientTransformation,
                    loss_cfg: LossConfig, grad_accum: int = 1):
  """step(state, teacher_variables, batch) -> (state, metrics). batch: dict of [global_batch, S] arrays."""
  use_teacher = teacher is not None and loss_cfg.kd_weight > 0

  def loss_fn(variables, teacher_variables, batch):
    args = (batch['inputs'], batch['positions'], batch['segment_ids'])
    logits, _ = student.apply(variables, *args, all_exits=True)
    teacher_logits = teacher.apply(teacher_variables, *args)[0] if use_teacher else None
    loss, metrics = uptraining_loss(logits, batch['targets'], batch['loss_mask'], teacher_logits,
                                    **dataclasses.asdict(loss_cfg))
    metrics['tokens'] = jnp.sum(batch['loss_mask'])
    return loss, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, teacher_variables, batch):
    if grad_accum == 1:
      (loss, metrics), grads = grad_fn(state.variables, teacher_variables, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, mb):
        (loss, metrics), grads = grad_fn(state.variables, teacher_variables, mb)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.variables, teacher_variables,
                                                          jax.tree.map(lambda x: x[0], micro)))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, micro)
      loss, grads = loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads)
      metrics = {k: v if k == 'tokens' else v / grad_accum for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, state.opt_state, state.variables)
    variables = optax.apply_updates(state.variables, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    return TrainState(state.step + 1, variables, opt_state), metrics

  return step
