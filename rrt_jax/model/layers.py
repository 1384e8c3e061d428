"""Building blocks shared by every family: norms, rotary embeddings, activations, embedding.

Norms always compute in fp32. A norm created with `relax=True` carries a per-(loop, layer) delta on its
scale (and bias) in the 'lora' collection, so full-rank relaxation can reproduce untied norm weights.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrt_jax.config import RopeScaling

LORA = 'lora'  # Collection of per-(loop, layer) relaxation variables.


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


class Norm(nn.Module):
  """RMSNorm (w or 1 + w scale) or LayerNorm with bias, over the last axis, computed in fp32."""

  kind: str  # 'rms' | 'rms_one_plus' | 'layer'
  eps: float
  relax: bool = False
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x_BxSxD: jax.Array, loop_onehot_BxR: jax.Array | None = None) -> jax.Array:
    """loop_onehot: per-row loop selection of the deltas (see `select_per_row`)."""
    d = x_BxSxD.shape[-1]
    scale_init = nn.initializers.zeros if self.kind == 'rms_one_plus' else nn.initializers.ones
    scale = self.param('scale', nn.with_logical_partitioning(scale_init, ('norm',)), (d,),
                       dtype_of(self.param_dtype))
    scale = scale.astype(jnp.float32) + self._delta('scale_delta', d, loop_onehot_BxR)
    x = x_BxSxD.astype(jnp.float32)
    if self.kind == 'layer':
      x = x - jnp.mean(x, axis=-1, keepdims=True)
      y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)), (d,),
                        dtype_of(self.param_dtype))
      y = y * scale + bias.astype(jnp.float32) + self._delta('bias_delta', d, loop_onehot_BxR)
    else:
      y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
      y = y * (1.0 + scale if self.kind == 'rms_one_plus' else scale)
    return y.astype(dtype_of(self.dtype))

  def _delta(self, name: str, d: int, loop_onehot_BxR: jax.Array | None) -> jax.Array | float:
    if not self.relax:
      return 0.0
    init = nn.with_logical_partitioning(nn.initializers.zeros, ('norm',))
    var = self.variable(LORA, name, init, None, (d,), dtype_of(self.param_dtype))
    return select_per_row(var.value, loop_onehot_BxR).astype(jnp.float32)


def constrain(x: jax.Array, last_axis: str) -> jax.Array:
  """Sharding constraint on an activation [..., B, S, last] by logical names ('batch', 'length', last_axis):
  the residual stream ('embed') and logits ('vocab') shard by the same rule table as the variables, so XLA never
  chooses to gather the batch (it did, for FSDP-sharded weights). A no-op outside a mesh and rules context
  (train/loop.py's step sets both) and for arrays of fewer than 3 dimensions (decode rows)."""
  if x.ndim < 3:
    return x
  return nn.with_logical_constraint(x, (None,) * (x.ndim - 3) + ('batch', 'length', last_axis))


def select_per_row(value: jax.Array, loop_onehot_BxR: jax.Array | None) -> jax.Array:
  """Multi-LoRA selection for depth-wise batching: with a one-hot [rows, R] of each row's loop, a 'lora'
  vector variable holds all R loops' values on a leading axis ([R, d]) and each row gets its own loop's,
  shaped [rows, 1, d] to broadcast over the sequence. Without it the value is used as is."""
  if loop_onehot_BxR is None:
    return value
  return jnp.einsum('br,r...->b...', loop_onehot_BxR.astype(value.dtype), value)[:, None]


def rope_inv_freq(theta: float, rotary_dim: int, scaling: RopeScaling | None = None) -> jax.Array:
  """[rotary_dim / 2] fp32 inverse frequencies, scaled as HF transformers' 'linear' and 'llama3' RoPE types."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  if scaling is None:
    return inv_freq
  if scaling.rope_type == 'linear':
    return inv_freq / scaling.factor
  if scaling.rope_type == 'yarn':
    return _yarn_inv_freq(theta, rotary_dim, scaling)
  # llama3: keep short wavelengths, divide long ones by `factor`, interpolate in between.
  old_len, factor = scaling.original_max_position_embeddings, scaling.factor
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
  return jnp.where(medium, smoothed, scaled)


def _yarn_inv_freq(theta: float, rotary_dim: int, scaling: RopeScaling) -> jax.Array:
  """YaRN's inverse frequencies, as transformers' _compute_yarn_parameters computes them."""
  pos_freqs = theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
  extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
  beta_fast, beta_slow = scaling.beta_fast or 32, scaling.beta_slow or 1
  old_len = scaling.original_max_position_embeddings
  dim_of = lambda rotations: (rotary_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))  # noqa: E731
  low, high = dim_of(beta_fast), dim_of(beta_slow)
  if scaling.truncate is None or scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp.
  ramp = jnp.clip((jnp.arange(rotary_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  keep = 1 - ramp  # 1: extrapolate (high frequencies kept), 0: interpolate (divided by factor).
  return interpolation * (1 - keep) + extrapolation * keep


def apply_rotary(x_BxSxHxD: jax.Array, positions_BxS: jax.Array, theta: float,
                 rotary_dim: int, scaling: RopeScaling | None = None) -> jax.Array:
  """Rotate-half RoPE (HF convention) on the first `rotary_dim` dims of each head, in fp32."""
  inv_freq = rope_inv_freq(theta, rotary_dim, scaling)
  freqs = positions_BxS[..., None].astype(jnp.float32) * inv_freq  # [B, S, rotary_dim / 2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, S, 1, rotary_dim]
  x = x_BxSxHxD.astype(jnp.float32)
  x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if scaling is not None and scaling.cos_sin_scale != 1.0:  # YaRN's attention factor.
    cos, sin = cos * scaling.cos_sin_scale, sin * scaling.cos_sin_scale
  out = x_rot * cos + rotated * sin
  return jnp.concatenate([out, x_pass], axis=-1).astype(x_BxSxHxD.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap) (Gemma 2's soft-capping of logits); x unchanged for cap None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def activation(name: str):
  """The MLP non-linearity of each MLP kind."""
  return {
      'swiglu': jax.nn.silu,
      'geglu': lambda x: jax.nn.gelu(x, approximate=True),  # Gemma: gelu_pytorch_tanh.
      'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # GPT-NeoX: exact erf GELU.
  }[name]


class Embed(nn.Module):
  """Token embedding; `attend` is the tied LM head."""

  vocab_size: int
  features: int
  scale_by_sqrt_dim: bool = False
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def setup(self):
    # std 1/sqrt(d): the tied head's initial logits then have unit scale (std 1 gave logits of std sqrt(d) and
    # an initial loss of ~50 at d=128, spent hundreds of steps shrinking); Gemma's sqrt(d) input scaling then
    # gives unit-scale inputs.
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=self.features ** -0.5), ('vocab', 'embed'))
    self.embedding = self.param('embedding', init, (self.vocab_size, self.features),
                                dtype_of(self.param_dtype))

  def __call__(self, tokens_BxS: jax.Array) -> jax.Array:
    dtype = dtype_of(self.dtype)
    x = jnp.take(self.embedding, tokens_BxS, axis=0).astype(dtype)
    if self.scale_by_sqrt_dim:
      # HF Gemma rounds the normaliser to the compute dtype before multiplying.
      x = x * jnp.asarray(self.features ** 0.5, dtype)
    return x

  def attend(self, x_BxSxD: jax.Array) -> jax.Array:
    dtype = dtype_of(self.dtype)
    return jnp.einsum('...d,vd->...v', x_BxSxD.astype(dtype), self.embedding.astype(dtype))
