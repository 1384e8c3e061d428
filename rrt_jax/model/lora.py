"""Dense layer with a shared kernel and an optional per-(loop, layer) low-rank delta.

    y = x @ W (+ b + b_delta) + scale * (x @ A) @ B,   scale = alpha / r

W and b live in 'params' (shared across loops); A [d_in, r], B [r, d_out] and b_delta live in the 'lora'
collection, which the recursive stack scans over loops so each depth position has its own.

Multi-LoRA (continuous depth-wise batching): given a one-hot [rows, R] of each row's loop, the 'lora'
variables hold all R loops' adapters on a leading axis and every row uses its own loop's. x is multiplied by
all R A's at once and the products of other loops are masked out before the B's, so one batched matmul serves
rows at different depths (R times the LoRA FLOPs, no per-row weight gathers).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rrt_jax.model.layers import LORA, dtype_of, select_per_row

INTERMEDIATES = 'intermediates'  # Collection of sown projection inputs (calibration only).

# PEFT's LoRA A init (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in)).
lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """LoRA of one projection: its capped rank and output scale; rank None = no LoRA."""

  rank: int | None = None
  scale: float = 1.0
  relax_bias: bool = False


class LoraDense(nn.Module):
  """x @ W + b with a per-depth LoRA; `axes` are the logical names of (d_in, d_out).

  base=False: the per-depth part alone (the LoRA delta, and the bias delta of a biased projection): W and b live
  in a fused projection that computes several projections of the same input in one matmul (the per-layer serving
  layout, see `fused_projections`); the 'lora' variables are the same either way."""

  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  lora: LoraSpec = LoraSpec()
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  base: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, loop_onehot_BxR: jax.Array | None = None) -> jax.Array:
    d_in = x.shape[-1]
    # Calibration (convert/calibration.py) reads every projection's input; a no-op unless 'intermediates'
    # is mutable, so training and decoding never store it.
    self.sow(INTERMEDIATES, 'inputs', x)
    dtype, param_dtype = dtype_of(self.dtype), dtype_of(self.param_dtype)
    x = x.astype(dtype)
    y = jnp.zeros((), dtype)
    if self.base:
      kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
                          (d_in, self.features), param_dtype)
      y = jnp.einsum('...i,io->...o', x, kernel.astype(dtype))
    if self.use_bias:
      bias = jnp.zeros((), param_dtype)
      if self.base:
        bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                          (self.features,), param_dtype)
      if self.lora.relax_bias:
        init = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:])
        delta = self.variable(LORA, 'bias_delta', init, None, (self.features,), param_dtype).value
        bias = bias + select_per_row(delta, loop_onehot_BxR)
      y = y + bias.astype(dtype)
    if self.lora.rank:
      r = self.lora.rank
      a_init = nn.with_logical_partitioning(lora_a_init, (self.axes[0], 'lora_rank'))
      # The rng is drawn lazily: at apply time the variable exists and no 'lora' rng is needed.
      a = self.variable(LORA, 'a', lambda: a_init(self.make_rng(LORA), (d_in, r), param_dtype)).value
      b = self.variable(LORA, 'b', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                ('lora_rank', self.axes[1])),
                        None, (r, self.features), param_dtype).value
      if loop_onehot_BxR is None:
        delta = jnp.einsum('...r,ro->...o', jnp.einsum('...i,ir->...r', x, a.astype(dtype)), b.astype(dtype))
      else:  # x [rows, S, d_in]; a [R, d_in, r]; b [R, r, d_out].
        xa = jnp.einsum('bsi,lir->bslr', x, a.astype(dtype)) * loop_onehot_BxR.astype(dtype)[:, None, :, None]
        delta = jnp.einsum('bslr,lro->bso', xa, b.astype(dtype))
      y = y + jnp.asarray(self.lora.scale, dtype) * delta
    return y


def fused_dense(fused: LoraDense, parts: list[LoraDense], x: jax.Array,
                loop_onehot_BxR: jax.Array | None = None) -> list[jax.Array]:
  """Several projections of x in one matmul: `fused` (no LoRA) holds their kernels side by side; each part
  (base=False, named as the projection, so its 'lora' variables are the unfused layout's) adds its own delta."""
  y = fused(x)
  splits = np.cumsum([p.features for p in parts])[:-1].tolist()
  return [base + part(x, loop_onehot_BxR) for base, part in zip(jnp.split(y, splits, axis=-1), parts, strict=True)]
