"""Uptraining losses: CE, knowledge distillation (forward KL) and early-exit weighting over loops.

Shapes: logits [E, B, S, V] (one row per loop exit), targets [B, S], mask [B, S] (1 = scored).
chunked_uptraining_loss computes the same loss from hidden states [E, B, S, D], a chunk of tokens at a time, so
the logits never exist whole (their size is V / D times the hidden states').
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rrt_jax.model.scoring import cross_entropy

EARLY_EXIT_SCHEMES = ('none', 'aggressive', 'weighted')
KD_TARGETS = ('teacher', 'last_loop')


def exit_weights(num_exits: int, scheme: str, alpha: float = 0.1) -> jnp.ndarray:
  """Loss weight of each loop exit.

  none: only the last loop (weight 1). aggressive (paper's Agg(alpha)): last loop 1, the others alpha.
  weighted (CALM-style): w_b = b / sum_j j, proportional to depth.
  """
  if scheme not in EARLY_EXIT_SCHEMES:
    raise ValueError(f'Unknown early-exit scheme {scheme!r}: choose one of {EARLY_EXIT_SCHEMES}.')
  if scheme == 'none':
    return jnp.zeros(num_exits).at[-1].set(1.0)
  if scheme == 'aggressive':
    return jnp.full(num_exits, alpha).at[-1].set(1.0)
  depth = jnp.arange(1, num_exits + 1, dtype=jnp.float32)
  return depth / depth.sum()


def masked_mean(x_ExBxS: jax.Array, mask_BxS: jax.Array) -> jax.Array:
  """Mean over scored tokens, per exit: [E]."""
  return jnp.sum(x_ExBxS * mask_BxS, axis=(-2, -1)) / jnp.maximum(jnp.sum(mask_BxS), 1.0)


def forward_kl(student_ExBxSxV: jax.Array, teacher_xBxSxV: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Per-token KL(teacher || student) [E, B, S] on temperature-softened distributions, scaled by T^2 so its
  gradient magnitude does not shrink with T (Hinton et al.). The teacher gets no gradient."""
  t = jax.lax.stop_gradient(teacher_xBxSxV.astype(jnp.float32)) / temperature
  s = student_ExBxSxV.astype(jnp.float32) / temperature
  teacher_logp = jax.nn.log_softmax(t)
  kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - jax.nn.log_softmax(s)), axis=-1)
  return kl * temperature ** 2


def uptraining_loss(student_ExBxSxV: jax.Array, targets_BxS: jax.Array, mask_BxS: jax.Array,
                    teacher_BxSxV: jax.Array | None, *, ce_weight: float = 1.0, kd_weight: float = 0.0,
                    temperature: float = 1.0, early_exit: str = 'none', exit_alpha: float = 0.1,
                    kd_target: str = 'teacher') -> tuple[jax.Array, dict]:
  """sum_b w_b (ce_weight * CE_b + kd_weight * KD_b); returns (loss, metrics with per-loop CE and KD)."""
  if kd_target not in KD_TARGETS:
    raise ValueError(f'Unknown KD target {kd_target!r}: choose one of {KD_TARGETS}.')
  num_exits = student_ExBxSxV.shape[0]
  weights = exit_weights(num_exits, early_exit, exit_alpha)
  ce = masked_mean(cross_entropy(student_ExBxSxV, targets_BxS), mask_BxS)
  metrics = {'ce_per_loop': ce, 'exit_weights': weights}
  per_loop = ce_weight * ce
  if kd_weight:
    if teacher_BxSxV is None:
      raise ValueError('kd_weight > 0 needs teacher logits.')
    kd = masked_mean(forward_kl(student_ExBxSxV, teacher_BxSxV[None], temperature), mask_BxS)
    if kd_target == 'last_loop' and num_exits > 1:
      # Intermediate loops distil from the model's own last loop (no gradient into it); the last loop
      # still distils from the teacher.
      self_kd = masked_mean(forward_kl(student_ExBxSxV[:-1], student_ExBxSxV[-1:], temperature), mask_BxS)
      kd = jnp.concatenate([self_kd, kd[-1:]])
    metrics['kd_per_loop'] = kd
    per_loop = per_loop + kd_weight * kd
  return jnp.sum(weights * per_loop), metrics


Head = Callable[[jax.Array], jax.Array]


def chunked_uptraining_loss(student_hidden_ExBxSxD: jax.Array, student_head: Head, targets_BxS: jax.Array,
                            mask_BxS: jax.Array, teacher_hidden_BxSxD: jax.Array | None,
                            teacher_head: Head | None, *, chunk_size: int, ce_weight: float = 1.0,
                            kd_weight: float = 0.0, temperature: float = 1.0, early_exit: str = 'none',
                            exit_alpha: float = 0.1, kd_target: str = 'teacher') -> tuple[jax.Array, dict]:
  """uptraining_loss from hidden states, `chunk_size` tokens at a time: the same (loss, metrics), but neither the
  [E, B, S, V] student logits nor the [B, S, V] teacher logits are ever whole in memory.

  student_head / teacher_head: hidden [..., D] -> fp32 logits [..., V] (e.g. Decoder.logits with the variables
  closed over; gradients reach the student's through the closure, the teacher gets none). A scan over sequence
  chunks sums each chunk's masked CE / KD; the chunk body is rematerialised, so the backward pass recomputes its
  logits rather than keeping every chunk's. S need not divide by chunk_size: the last chunk is padded with
  mask 0 (a chunk_size >= S is one chunk of S tokens).
  """
  if kd_target not in KD_TARGETS:
    raise ValueError(f'Unknown KD target {kd_target!r}: choose one of {KD_TARGETS}.')
  if chunk_size < 1:
    raise ValueError(f'chunk_size={chunk_size} must be >= 1 (tokens per chunk).')
  use_kd = bool(kd_weight)
  if use_kd and (teacher_hidden_BxSxD is None or teacher_head is None):
    raise ValueError('kd_weight > 0 needs the teacher hidden states and head.')
  num_exits, _, seq = student_hidden_ExBxSxD.shape[:3]
  self_kd = kd_target == 'last_loop' and num_exits > 1
  mask_BxS = mask_BxS.astype(jnp.float32)
  chunk = min(chunk_size, seq)
  num_chunks = -(-seq // chunk)
  pad = num_chunks * chunk - seq

  def chunks(x, seq_axis: int):
    """[..., S, ...] -> [num_chunks, ..., chunk, ...]: the scan's leading axis (padding with zeros)."""
    if pad:
      x = jnp.pad(x, [(0, pad if a == seq_axis else 0) for a in range(x.ndim)])
    x = x.reshape(*x.shape[:seq_axis], num_chunks, chunk, *x.shape[seq_axis + 1:])
    return jnp.moveaxis(x, seq_axis, 0)

  xs = {'h': chunks(student_hidden_ExBxSxD, 2), 'y': chunks(targets_BxS, 1), 'm': chunks(mask_BxS, 1)}
  if use_kd:
    xs['t'] = chunks(jax.lax.stop_gradient(teacher_hidden_BxSxD), 1)

  # prevent_cse=False: the scan already keeps the recomputation from being merged with the forward pass.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_sums(x: dict) -> dict:
    """Masked sums over this chunk's tokens, per exit: {'ce': [E], 'kd': [E]}."""
    logits_ExBxCxV = student_head(x['h'])
    sums = {'ce': jnp.sum(cross_entropy(logits_ExBxCxV, x['y']) * x['m'], axis=(-2, -1))}
    if use_kd:
      teacher_1xBxCxV = teacher_head(x['t'])[None]
      # With the last_loop target only the last exit distils from the teacher (no wasted teacher KL).
      kd = forward_kl(logits_ExBxCxV[-1:] if self_kd else logits_ExBxCxV, teacher_1xBxCxV, temperature)
      if self_kd:  # Intermediate loops distil from the last loop (no gradient into it, as in uptraining_loss).
        kd = jnp.concatenate([forward_kl(logits_ExBxCxV[:-1], logits_ExBxCxV[-1:], temperature), kd])
      sums['kd'] = jnp.sum(kd * x['m'], axis=(-2, -1))
    return sums

  def body(carry: dict, x: dict) -> tuple[dict, None]:
    return jax.tree.map(jnp.add, carry, chunk_sums(x)), None

  zeros = {'ce': jnp.zeros(num_exits, jnp.float32)}
  if use_kd:
    zeros['kd'] = jnp.zeros(num_exits, jnp.float32)
  sums, _ = jax.lax.scan(body, zeros, xs)
  count = jnp.maximum(jnp.sum(mask_BxS), 1.0)
  weights = exit_weights(num_exits, early_exit, exit_alpha)
  ce = sums['ce'] / count
  metrics = {'ce_per_loop': ce, 'exit_weights': weights}
  per_loop = ce_weight * ce
  if use_kd:
    kd = sums['kd'] / count
    metrics['kd_per_loop'] = kd
    per_loop = per_loop + kd_weight * kd
  return jnp.sum(weights * per_loop), metrics
