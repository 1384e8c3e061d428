"""Multi-head attention with GQA/MQA, partial rotary, per-depth LoRA and an optional KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrt_jax.config import ModelConfig
from rrt_jax.model.layers import apply_rotary, dtype_of
from rrt_jax.model.lora import LoraDense, LoraSpec

KVCache = dict[str, jax.Array]  # {'k', 'v'}: [batch, max_len, kv_heads, head_dim] for one depth position.


def causal_mask(positions_BxS: jax.Array, segment_ids_BxS: jax.Array | None) -> jax.Array:
  """[B, S, S] mask for a full sequence: causal by position, and within the same packed segment."""
  mask = positions_BxS[:, :, None] >= positions_BxS[:, None, :]
  if segment_ids_BxS is not None:
    mask &= segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]
  return mask


def cache_mask(positions_BxS: jax.Array, max_len: int) -> jax.Array:
  """[B, S, T] mask over cache slots: a query sees every slot at or before its own position."""
  return jnp.arange(max_len)[None, None, :] <= positions_BxS[:, :, None]


def write_cache(cache_BxTxHxD: jax.Array, new_BxSxHxD: jax.Array, start_B: jax.Array) -> jax.Array:
  """Writes each row's new keys/values at its own start position (rows may be at different positions)."""
  write = lambda c, u, s: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (s, 0, 0))  # noqa: E731
  return jax.vmap(write)(cache_BxTxHxD, new_BxSxHxD, start_B)


class Attention(nn.Module):
  """Self-attention over one layer's K/V (and cache). `project_kv` is the K/V half alone: the decoder uses it to
  fill an early-exited token's skipped K/V from its exit state (see `propagate_kv` in model/propagation.py)."""

  cfg: ModelConfig
  lora: dict[str, LoraSpec]

  def setup(self):
    cfg = self.cfg
    dense = lambda name, features, axes: LoraDense(  # noqa: E731
        features, axes, use_bias=cfg.attn_bias, lora=self.lora[name], dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = dense('q', h * hd, ('embed', 'heads'))
    self.k = dense('k', kvh * hd, ('embed', 'kv'))
    self.v = dense('v', kvh * hd, ('embed', 'kv'))
    self.o = dense('o', cfg.d_model, ('heads', 'embed'))

  def project_kv(self, x_BxSxD: jax.Array, positions_BxS: jax.Array,
                 loop_onehot_BxR: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Rotated keys and values [B, S, kv_heads, head_dim] of the inputs (after the attention norm)."""
    cfg = self.cfg
    b, s, _ = x_BxSxD.shape
    k = self.k(x_BxSxD, loop_onehot_BxR).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = self.v(x_BxSxD, loop_onehot_BxR).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    return apply_rotary(k, positions_BxS, cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling), v

  def __call__(self, x_BxSxD: jax.Array, positions_BxS: jax.Array, mask_BxSxT: jax.Array,
               cache: KVCache | None = None, kv_x_BxSxD: jax.Array | None = None,
               loop_onehot_BxR: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """kv_x: input of the K/V projections when it differs from the queries' (early-exit state propagation).
    loop_onehot: each row's loop, for multi-LoRA (see lora.py)."""
    cfg = self.cfg
    b, s, _ = x_BxSxD.shape
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    sel = loop_onehot_BxR
    q = self.q(x_BxSxD, sel).reshape(b, s, h, hd)
    q = apply_rotary(q, positions_BxS, cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)
    k, v = self.project_kv(x_BxSxD if kv_x_BxSxD is None else kv_x_BxSxD, positions_BxS, sel)

    new_cache = None
    if cache is not None:
      start = positions_BxS[:, 0]
      new_cache = {'k': write_cache(cache['k'], k, start), 'v': write_cache(cache['v'], v, start)}
      k, v = new_cache['k'].astype(q.dtype), new_cache['v'].astype(q.dtype)

    q = q.reshape(b, s, kvh, h // kvh, hd)
    logits = jnp.einsum('bsngd,btnd->bngst', q, k, preferred_element_type=jnp.float32)
    logits = logits * (hd ** -0.5)
    logits = jnp.where(mask_BxSxT[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype_of(cfg.dtype))
    out = jnp.einsum('bngst,btnd->bsngd', probs, v).reshape(b, s, h * hd)
    return self.o(out, sel), new_cache
