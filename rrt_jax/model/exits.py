"""The early-exit rule, one for every user: generation, the depth-wise batching engine and early-exit scoring.

After each loop r the shared exit head gives logits; a confidence measure turns them (or the hidden states)
into one number per token, and a token exits at the FIRST loop whose confidence reaches the threshold, else at
the last loop. threshold >= 1 never exits early, which gives exactly the no-exit output.

Shapes: R loops (exits), N tokens, V vocabulary, D model width.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

CONFIDENCES = ('max_prob', 'margin', 'saturation')
KV_FILLS = ('propagate', 'full')


def check_threshold(threshold) -> None:
  """An exit threshold is a number >= 0 (inf allowed): NaN would silently never exit, a negative one always."""
  if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
    raise ValueError(f'Exit threshold must be a number >= 0 (0 = always exit after the first loop, >= 1 = never '
                     f'exit early), got {threshold!r}.')


@dataclasses.dataclass(frozen=True)
class ExitConfig:
  """threshold: >= 1 never exits early. confidence: max softmax prob | top-1 minus top-2 prob | cosine of the
  hidden states before and after the loop (saturation). kv_fill: how a decoder fills the (loop, layer) K/V an
  exited token skipped: from its exit state (CALM-style 'propagate') or by computing the loops ('full')."""

  threshold: float = 1.0
  confidence: str = 'max_prob'
  kv_fill: str = 'propagate'

  def __post_init__(self):
    check_threshold(self.threshold)
    if self.confidence not in CONFIDENCES:
      raise ValueError(f'Unknown confidence {self.confidence!r}: choose one of {CONFIDENCES}.')
    if self.kv_fill not in KV_FILLS:
      raise ValueError(f'Unknown kv_fill {self.kv_fill!r}: choose one of {KV_FILLS}.')

  @property
  def early(self) -> bool:
    """Whether any token can exit before the last loop."""
    return self.threshold < 1.0


def confidence(kind: str, logits_NxV: jax.Array, h_NxD: jax.Array, h_prev_NxD: jax.Array) -> jax.Array:
  """[N] confidence of each token's prediction after a loop (h_prev: the loop's input hidden state)."""
  if kind == 'saturation':
    cos = jnp.sum(h_NxD * h_prev_NxD, -1) / (jnp.linalg.norm(h_NxD, axis=-1) * jnp.linalg.norm(h_prev_NxD, axis=-1)
                                             + 1e-6)
    return cos.astype(jnp.float32)
  probs = jax.nn.softmax(logits_NxV.astype(jnp.float32), axis=-1)
  if kind == 'max_prob':
    return jnp.max(probs, axis=-1)
  if kind == 'margin':
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[:, 0] - top2[:, 1]
  raise ValueError(f'Unknown confidence {kind!r}: choose one of {CONFIDENCES}.')


def exits_at(conf: jax.Array, threshold: float) -> jax.Array:
  """Whether a confidence reaches the threshold (any shape); threshold >= 1 never exits early."""
  check_threshold(threshold)  # Also guards callers without an ExitConfig (early-exit perplexity's thresholds).
  return conf >= threshold if threshold < 1.0 else jnp.zeros(conf.shape, bool)


def first_exit(conf_Rx: jax.Array, threshold: float) -> jax.Array:
  """0-based exit loop of every token from its per-loop confidences [R, ...]: the first loop that reaches the
  threshold, else the last (R - 1)."""
  reached = exits_at(conf_Rx, threshold).at[-1].set(True)
  return jnp.argmax(reached, axis=0).astype(jnp.int32)


def select_exit(per_loop_Rx: jax.Array, exit_loop: jax.Array) -> jax.Array:
  """per_loop [R, N, ...] at each token's 0-based exit loop [N] -> [N, ...]."""
  index = exit_loop.reshape((1,) + exit_loop.shape + (1,) * (per_loop_Rx.ndim - 1 - exit_loop.ndim))
  return jnp.take_along_axis(per_loop_Rx, index, axis=0)[0]


__all__ = ['CONFIDENCES', 'KV_FILLS', 'ExitConfig', 'check_threshold', 'confidence', 'exits_at', 'first_exit',
           'select_exit']
