"""What the model's logits score: per-token cross-entropy, shared by training losses and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_ExBxSxV: jax.Array, targets_BxS: jax.Array) -> jax.Array:
  """Per-token CE [E, B, S] in fp32 (any leading axes of the logits; targets broadcast over them)."""
  logp = jax.nn.log_softmax(logits_ExBxSxV.astype(jnp.float32))
  return -jnp.take_along_axis(logp, jnp.broadcast_to(targets_BxS, logp.shape[:-1])[..., None], axis=-1)[..., 0]
