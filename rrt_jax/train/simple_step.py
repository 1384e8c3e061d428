"""A plain next-token cross-entropy train step (loss, grads, optimizer update), used by the benchmarks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rrt_jax.model import Decoder
from rrt_jax.model.scoring import cross_entropy


def next_token_loss(model: Decoder, variables: dict, tokens_BxS1: jax.Array) -> jax.Array:
  """Mean CE of predicting tokens[:, 1:] from tokens[:, :-1] at the last exit."""
  logits, _ = model.apply(variables, tokens_BxS1[:, :-1])
  return jnp.mean(cross_entropy(logits[None], tokens_BxS1[:, 1:]))


def train_step_fn(model: Decoder, optimizer: optax.GradientTransformation):
  """step(variables, opt_state, tokens [B, S + 1]) -> (variables, opt_state, loss); jit it."""

  def step(variables, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda v: next_token_loss(model, v, tokens))(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  return step
