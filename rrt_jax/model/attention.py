"""Multi-head attention with GQA/MQA, partial rotary, per-depth LoRA and an optional KV cache.

Without a cache (training, scoring, prefill) attention runs as `ModelConfig.attention` resolves
(`resolve_attention`): rrt_jax's einsum, jax.nn.dot_product_attention ('xla' or 'cudnn') or the Pallas TPU splash
kernel. With a cache (decoding, prefill into a cache, early-exit K/V propagation, multi-LoRA rows) it is always the
einsum. The fused kernels ('cudnn', 'splash') take causality by sequence index and packing by segment ids, not the
position mask: the same mask wherever positions increase along each segment, as the data pipeline packs them
(rows of padding alone, whose positions are all 0, differ; their loss mask is 0).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrt_jax.config import AttentionImpl, LayerLayout, ModelConfig, QKNorm
from rrt_jax.model.layers import Norm, apply_rotary, dtype_of, softcap
from rrt_jax.model.lora import LoraDense, LoraSpec, fused_dense

# {'k', 'v'}: [batch, kv_heads, max_len, head_dim] for one depth position. Each (row, head) holds a contiguous
# [max_len, head_dim] block, which the decode attention's dots read as it lies: in the token layout
# [batch, max_len, kv_heads, head_dim] XLA:CPU transposed every buffer per step and copied it (BUILD_NOTES, issue 26).
KVCache = dict[str, jax.Array]
CACHE_TIME_AXIS = -2  # The position axis of a cache leaf.


def fused_projections(cfg: ModelConfig) -> bool:
  """Whether cfg's layers compute the projections of one input in one matmul (q/k/v here; gate/up in the MLP;
  decoder.FUSED_PROJECTIONS): in the per-layer serving layout, where each fusion saves a matmul's fixed cost per
  layer and token (batch-1 decoding is a chain of small matrix-vector products; BUILD_NOTES, issue 26). Training
  and checkpoints (stacked) keep one kernel per projection, which calibration, LoRA init and export read."""
  return cfg.layer_layout == LayerLayout.PER_LAYER and cfg.fuse_projections


def causal_mask(positions_BxS: jax.Array, segment_ids_BxS: jax.Array | None) -> jax.Array:
  """[B, S, S] mask for a full sequence: causal by position, and within the same packed segment."""
  mask = positions_BxS[:, :, None] >= positions_BxS[:, None, :]
  if segment_ids_BxS is not None:
    mask &= segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]
  return mask


class SelfMask(NamedTuple):
  """The no-cache path's mask (`self_mask`): the [B, S, S] `causal_mask`, which 'einsum' and 'xla' apply, and the
  [B, S] segment ids it was built from (None: one sequence per row), which 'cudnn' and 'splash' need instead."""

  mask: jax.Array
  segment_ids: jax.Array | None


def self_mask(positions_BxS: jax.Array, segment_ids_BxS: jax.Array | None) -> SelfMask:
  return SelfMask(causal_mask(positions_BxS, segment_ids_BxS), segment_ids_BxS)


_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SPLASH_BLOCKS = (512, 256, 128)  # Splash tile sizes tried, largest first; its KV tiles are multiples of 128 lanes.


def resolve_attention(cfg: ModelConfig, backend: str | None = None) -> str:
  """The no-cache attention implementation for `cfg` on `backend` (default: jax.default_backend()): 'einsum',
  'xla', 'cudnn' or 'splash'. 'auto' picks 'cudnn' on GPU for bf16/fp16 with a head_dim cuDNN flash attention
  takes on every GPU (a multiple of 8, at most 128), 'xla' on other GPU configs, 'splash' on TPU, 'einsum'
  elsewhere. An explicit 'cudnn' or 'splash' the backend cannot run raises, naming the fix."""
  backend = backend or jax.default_backend()
  impl = AttentionImpl(cfg.attention)
  half = dtype_of(cfg.dtype) in _HALF_DTYPES
  if impl == AttentionImpl.AUTO:
    if backend == 'gpu':
      return 'cudnn' if half and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128 else 'xla'
    return 'splash' if backend == 'tpu' else 'einsum'
  if impl == AttentionImpl.CUDNN and backend != 'gpu':
    raise ValueError(f"attention='cudnn' needs a GPU, but the backend is {backend!r}: use attention='auto' (picks "
                     "the backend's best) or 'xla'.")
  if impl == AttentionImpl.CUDNN and not half:
    raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16 (cuDNN flash attention), got "
                     f"{cfg.dtype!r}: use attention='xla' or 'auto', or a half-precision dtype.")
  if impl == AttentionImpl.SPLASH and backend != 'tpu':
    raise ValueError(f"attention='splash' (the Pallas TPU kernel) needs a TPU, but the backend is {backend!r}: use "
                     "attention='auto' (picks the backend's best) or 'xla'.")
  return impl.value


def attention_scale(cfg: ModelConfig) -> float:
  """The attention logits' scale: query_pre_attn_scalar^-1/2 (Gemma 2 and 3), else head_dim^-1/2."""
  return (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5


def _no_cache_impl(cfg: ModelConfig, seq_len: int, packed: bool) -> str:
  """resolve_attention, with 'auto' falling back to 'xla' where the shapes do not suit the fused kernel.
  Soft-capped logits need the einsum; a sliding window, a kernel that takes the mask ('einsum' or 'xla')."""
  impl = resolve_attention(cfg)
  if cfg.attn_softcap is not None:
    return 'einsum'
  if cfg.sliding_window and impl in ('cudnn', 'splash'):
    if cfg.attention != AttentionImpl.AUTO:
      raise ValueError(f"attention={impl!r} has no sliding window here (sliding_window={cfg.sliding_window}): use "
                       "attention='auto' or 'xla'.")
    return 'xla'
  if cfg.attention == AttentionImpl.AUTO:
    if impl == 'splash' and seq_len % _SPLASH_BLOCKS[-1]:
      return 'xla'
    if impl == 'cudnn' and packed and seq_len % 2:  # cuDNN's backward with a bias (our segment mask) needs even S.
      return 'xla'
  return impl


def dot_product_attention(impl: str, q_BxSxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                          mask: SelfMask, scale: float | None = None) -> jax.Array:
  """jax.nn.dot_product_attention (impl 'xla' or 'cudnn'; GQA native: K divides H) -> [B, S, H, D].

  'xla' applies the position mask exactly. 'cudnn' is causal by index (it skips the masked upper triangle); packed
  rows add the mask, which cuDNN takes as an additive bias: correct, but slower than causal alone (jax.nn's API has
  no segment ids for cuDNN; cuDNN's packed THD layout is reachable only through a private jax API)."""
  scale = q_BxSxHxD.shape[-1] ** -0.5 if scale is None else scale
  if impl == 'xla':
    return jax.nn.dot_product_attention(q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask.mask[:, None],
                                        scale=scale, implementation='xla')
  segments = None if mask.segment_ids is None else mask.mask[:, None]
  return jax.nn.dot_product_attention(q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, mask=segments, scale=scale,
                                      is_causal=True, implementation='cudnn')


def splash_attention(q_BxSxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                     segment_ids_BxS: jax.Array | None, interpret: bool = False,
                     scale: float | None = None) -> jax.Array:
  """Causal (by index) attention with the Pallas TPU splash kernel, vmapped over rows -> [B, S, H, D]. GQA is the
  kernel's own (K/V keep their K heads). S must be a multiple of 128. interpret=True runs the kernel in Pallas's
  interpreter (CPU tests). One device's kernel: under a multi-device mesh XLA cannot partition it (shard_map
  would be needed to keep it sharded)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Imported on use: TPU-only kernel.

  _, s, h, hd = q_BxSxHxD.shape
  block = next((n for n in _SPLASH_BLOCKS if s % n == 0), None)
  if block is None:
    raise ValueError(f"attention='splash' needs a sequence length that is a multiple of {_SPLASH_BLOCKS[-1]}, got "
                     f"{s}: pad the sequences, or use attention='auto' (falls back to 'xla') or 'xla'.")
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  heads_mask = splash.MultiHeadMask(tuple(splash.CausalMask((s, s)) for _ in range(h)))
  kernel = splash.make_splash_mha(heads_mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  # The kernel takes [heads, S, head_dim] per row and does not scale the logits.
  q = (q_BxSxHxD * (hd ** -0.5 if scale is None else scale)).astype(q_BxSxHxD.dtype).transpose(0, 2, 1, 3)
  k, v = k_BxSxKxD.transpose(0, 2, 1, 3), v_BxSxKxD.transpose(0, 2, 1, 3)
  if segment_ids_BxS is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    out = jax.vmap(kernel)(q, k, v, splash.SegmentIds(segment_ids_BxS, segment_ids_BxS))
  return out.transpose(0, 2, 1, 3)


def cache_mask(positions_BxS: jax.Array, max_len: int) -> jax.Array:
  """[B, S, T] mask over cache slots: a query sees every slot at or before its own position."""
  return jnp.arange(max_len)[None, None, :] <= positions_BxS[:, :, None]


def pick(sliding, local, full):
  """A sliding layer's value or a full layer's: chosen in Python for a static kind, by jnp.where for a traced one
  (a scan over layers of both types)."""
  if isinstance(sliding, bool):
    return local if sliding else full
  return jnp.where(sliding, local, full)


def window_mask(mask_BxSxT: jax.Array, positions_BxS: jax.Array, key_positions_BxT: jax.Array, window: int,
                sliding) -> jax.Array:
  """The mask of a sliding layer: also key position > query position - window (HF's sliding_window_overlay)."""
  near = positions_BxS[:, :, None] - key_positions_BxT[:, None, :] < window
  return pick(sliding, mask_BxSxT & near, mask_BxSxT)


def to_cache_layout(x_BxSxHxD: jax.Array) -> jax.Array:
  """Keys or values [..., B, S, kv_heads, head_dim] as the cache holds them: [..., B, kv_heads, S, head_dim]."""
  return jnp.swapaxes(x_BxSxHxD, -3, -2)


def write_cache(cache_BxHxTxD: jax.Array, new_BxHxSxD: jax.Array, start_B: jax.Array) -> jax.Array:
  """Writes each row's new keys/values (cache layout) at its own start position (rows may be at different
  positions)."""
  write = lambda c, u, s: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (0, s, 0))  # noqa: E731
  return jax.vmap(write)(cache_BxHxTxD, new_BxHxSxD, start_B)


def _slots_of_new(mask_BxSxT: jax.Array, start_B: jax.Array, count: int) -> jax.Array:
  """The mask's columns of the `count` slots from each row's start: [B, S, count]."""
  return jax.vmap(lambda m, s: jax.lax.dynamic_slice_in_dim(m, s, count, axis=1))(mask_BxSxT, start_B)


def _masked_softmax(logits_BxNxGxSxT: jax.Array, mask_BxSxT: jax.Array, scale: float, cap: float | None,
                    dtype) -> jax.Array:
  """Attention probabilities in `dtype` from fp32 logits: scaled, soft-capped, masked slots at the fp32 minimum."""
  logits = softcap(logits_BxNxGxSxT * scale, cap)
  logits = jnp.where(mask_BxSxT[:, None, None], logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def cached_attention(q_BxSxHxD: jax.Array, k_BxKxTxD: jax.Array, v_BxKxTxD: jax.Array, k_new_BxKxSxD: jax.Array,
                     v_new_BxKxSxD: jax.Array, start_B: jax.Array, mask_BxSxT: jax.Array, scale: float,
                     cap: float | None) -> jax.Array:
  """Attention of S new queries over a cache before their write -> [B, S, H, D]: the buffers' slots before each
  row's start, and the new tokens' own K/V (which `write_cache` then puts at slots start..start+S-1), one softmax
  over both. Reading the old buffers, not the written ones, lets XLA write each buffer in place after its reads
  (`_after`): a read of the written buffer made XLA:CPU copy every layer's K/V per step (BUILD_NOTES, issue 26).
  The mask is over cache slots, as `cache_mask` (and `window_mask`) give it."""
  b, s, h, hd = q_BxSxHxD.shape
  kvh, slots = k_BxKxTxD.shape[1], k_BxKxTxD.shape[2]
  q = q_BxSxHxD.reshape(b, s, kvh, h // kvh, hd)
  old_BxSxT = mask_BxSxT & (jnp.arange(slots)[None, None, :] < start_B[:, None, None])
  new_BxSxS = _slots_of_new(mask_BxSxT, start_B, s)
  dt = q.dtype
  logits_old = jnp.einsum('bsngd,bntd->bngst', q, k_BxKxTxD.astype(dt), preferred_element_type=jnp.float32)
  logits_new = jnp.einsum('bsngd,bntd->bngst', q, k_new_BxKxSxD.astype(dt), preferred_element_type=jnp.float32)
  probs = _masked_softmax(jnp.concatenate([logits_old, logits_new], axis=-1),
                          jnp.concatenate([old_BxSxT, new_BxSxS], axis=-1), scale, cap, dt)
  out = (jnp.einsum('bngst,bntd->bsngd', probs[..., :slots], v_BxKxTxD.astype(dt))
         + jnp.einsum('bngst,bntd->bsngd', probs[..., slots:], v_new_BxKxSxD.astype(dt)))
  return out.reshape(b, s, h, hd)


def _after(x: jax.Array, *ys: jax.Array) -> tuple[jax.Array, ...]:
  """ys, computed only once x is: a data dependency that orders the cache writes after the attention's reads of
  the old buffers, so XLA updates them in place instead of copying them."""
  zero = jnp.zeros((), x.dtype) * x.reshape(-1)[0]
  return tuple(y + zero.astype(y.dtype) for y in ys)


class Attention(nn.Module):
  """Self-attention over one layer's K/V (and cache). `project_kv` is the K/V half alone: the decoder uses it to
  fill an early-exited token's skipped K/V from its exit state (see `propagate_kv` in model/propagation.py)."""

  cfg: ModelConfig
  lora: dict[str, LoraSpec]

  def setup(self):
    cfg = self.cfg
    fused = fused_projections(cfg)
    dense = lambda name, features, axes, base=True: LoraDense(  # noqa: E731
        features, axes, use_bias=cfg.attn_bias or (cfg.qkv_bias and name != 'o'),
        lora=self.lora.get(name, LoraSpec()), dtype=cfg.dtype, param_dtype=cfg.param_dtype, base=base)
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if fused:  # One [d, (h + 2 kvh) * hd] kernel; q, k and v hold only their per-depth deltas.
      self.qkv = dense('qkv', (h + 2 * kvh) * hd, ('embed', 'heads'))
    self.q = dense('q', h * hd, ('embed', 'heads'), base=not fused)
    self.k = dense('k', kvh * hd, ('embed', 'kv'), base=not fused)
    self.v = dense('v', kvh * hd, ('embed', 'kv'), base=not fused)
    self.o = dense('o', cfg.d_model, ('heads', 'embed'))
    if cfg.qk_norm != QKNorm.NONE:
      relax = self.lora['q'].relax_bias  # Relaxed vectors: the q/k norms get per-(loop, layer) deltas too.
      self.q_norm = Norm(cfg.norm, cfg.norm_eps, relax, cfg.dtype, cfg.param_dtype)
      self.k_norm = Norm(cfg.norm, cfg.norm_eps, relax, cfg.dtype, cfg.param_dtype)

  def _qk(self, norm: nn.Module, x_BxSxF: jax.Array, heads: int, positions_BxS: jax.Array, sel, sliding):
    """A q or k projection [B, S, heads * head_dim] -> normed (qk_norm) and rotated [B, S, heads, head_dim]."""
    cfg = self.cfg
    b, s, _ = x_BxSxF.shape
    if cfg.qk_norm == QKNorm.PROJECTION:
      x_BxSxF = norm(x_BxSxF, sel)
    elif cfg.qk_norm == QKNorm.HEAD:  # Rows [B, S * heads, head_dim]: the norm's per-row deltas still broadcast.
      x_BxSxF = norm(x_BxSxF.reshape(b, s * heads, cfg.head_dim), sel)
    x = x_BxSxF.reshape(b, s, heads, cfg.head_dim)
    full = apply_rotary(x, positions_BxS, cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)
    if cfg.local_rope_theta is None or sliding is False:
      return full
    return pick(sliding, apply_rotary(x, positions_BxS, cfg.local_rope_theta, cfg.rotary_dim), full)

  def _project(self, x_BxSxD: jax.Array, sel) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The q, k and v projections [B, S, heads * head_dim] (one matmul where `fused_projections`)."""
    if fused_projections(self.cfg):
      return tuple(fused_dense(self.qkv, [self.q, self.k, self.v], x_BxSxD, sel))
    return self.q(x_BxSxD, sel), self.k(x_BxSxD, sel), self.v(x_BxSxD, sel)

  def _kv(self, k_BxSxF: jax.Array, v_BxSxF: jax.Array, positions_BxS: jax.Array, sel,
          sliding) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    b, s, _ = k_BxSxF.shape
    k = self._qk(getattr(self, 'k_norm', None), k_BxSxF, cfg.num_kv_heads, positions_BxS, sel, sliding)
    return k, v_BxSxF.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)

  def project_kv(self, x_BxSxD: jax.Array, positions_BxS: jax.Array,
                 loop_onehot_BxR: jax.Array | None = None, sliding=False) -> tuple[jax.Array, jax.Array]:
    """Rotated keys and values [B, S, kv_heads, head_dim] of the inputs (after the attention norm).
    sliding: whether this is a sliding-window layer (a bool, or a traced one in a scan over mixed layers).
    With fused projections the q part is computed too and dropped (slicing K/V's kernels out would copy them)."""
    _, k, v = self._project(x_BxSxD, loop_onehot_BxR)
    return self._kv(k, v, positions_BxS, loop_onehot_BxR, sliding)

  def __call__(self, x_BxSxD: jax.Array, positions_BxS: jax.Array, mask_BxSxT: jax.Array,
               cache: KVCache | None = None, loop_onehot_BxR: jax.Array | None = None,
               sliding=False) -> tuple[jax.Array, KVCache | None]:
    """mask: `self_mask`'s SelfMask without a cache (the decoder's), or a [B, S, T] array (cache slots, or a plain
    `causal_mask`), which always runs the einsum.
    loop_onehot: each row's loop, for multi-LoRA (see lora.py).
    sliding: whether this layer attends through cfg.sliding_window (see `project_kv`)."""
    cfg = self.cfg
    b, s, _ = x_BxSxD.shape
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    sel = loop_onehot_BxR
    q, k, v = self._project(x_BxSxD, sel)
    q = self._qk(getattr(self, 'q_norm', None), q, h, positions_BxS, sel, sliding)
    k, v = self._kv(k, v, positions_BxS, sel, sliding)
    if cfg.sliding_window and sliding is not False:
      slots = None if cache is None else cache['k'].shape[CACHE_TIME_AXIS]
      keys = positions_BxS if slots is None else jnp.broadcast_to(jnp.arange(slots), (b, slots))
      if isinstance(mask_BxSxT, SelfMask):
        mask_BxSxT = SelfMask(window_mask(mask_BxSxT.mask, positions_BxS, keys, cfg.sliding_window, sliding),
                              mask_BxSxT.segment_ids)
      else:
        mask_BxSxT = window_mask(mask_BxSxT, positions_BxS, keys, cfg.sliding_window, sliding)

    if cache is not None:
      start_B = positions_BxS[:, 0]
      k_new, v_new = to_cache_layout(k), to_cache_layout(v)
      out = cached_attention(q, cache['k'], cache['v'], k_new, v_new, start_B, mask_BxSxT, attention_scale(cfg),
                             cfg.attn_softcap)
      k_new, v_new = _after(out, k_new, v_new)
      new_cache = {'k': write_cache(cache['k'], k_new, start_B), 'v': write_cache(cache['v'], v_new, start_B)}
      return self.o(out.reshape(b, s, h * hd), sel), new_cache

    if isinstance(mask_BxSxT, SelfMask):
      impl = _no_cache_impl(cfg, s, mask_BxSxT.segment_ids is not None)
      scale = attention_scale(cfg)
      if impl == 'splash':
        out = splash_attention(q, k, v, mask_BxSxT.segment_ids, scale=scale)
        return self.o(out.reshape(b, s, h * hd), sel), None
      if impl in ('xla', 'cudnn'):
        return self.o(dot_product_attention(impl, q, k, v, mask_BxSxT, scale).reshape(b, s, h * hd), sel), None
      mask_BxSxT = mask_BxSxT.mask

    k, v = to_cache_layout(k), to_cache_layout(v)
    q = q.reshape(b, s, kvh, h // kvh, hd)
    logits = jnp.einsum('bsngd,bntd->bngst', q, k, preferred_element_type=jnp.float32)
    probs = _masked_softmax(logits, mask_BxSxT, attention_scale(cfg), cfg.attn_softcap, dtype_of(cfg.dtype))
    out = jnp.einsum('bngst,bntd->bsngd', probs, v).reshape(b, s, h * hd)
    return self.o(out, sel), None
