"""The decoder: embed -> [prelude] -> recursive stack (R loops over K shared layers) -> [coda] -> final norm -> head.

One module runs the vanilla model (R = 1, no LoRA), the recursive model and the relaxed model, for training,
scoring and KV-cached decoding. Under looping='middle_cycle' (unique_layers U > 0) U layers with their own
weights run before the loops (the prelude) and U after them (the coda); the coda runs on every exit.

Shape letters used across rrt_jax (in names like x_BxSxD and in docstrings):
  B batch rows          S sequence (new tokens)    T cache length (max_len)    D model width
  V vocabulary          H heads                    R loops (the paper's B)     K shared layers per loop
  L depth positions of the unrolled model (L = R * K + 2U)    E exits (R under CYCLE and MIDDLE_CYCLE, else 1)
  U unique layers at each end (unique_layers, MIDDLE_CYCLE only; else 0)
  N engine slots, or tokens flattened over batch and sequence

Variables (the same paths for every looping; `variables.LAYER_PATH` / `PART_PATHS`, read through `layer_tree`):
  params/stack/block/layer/...   shared layers, leading axis K (no loop axis: broadcast over loops).
  lora/stack/block/layer/...     per-(loop, layer) LoRA and vector deltas, leading axes [R, K].
  params/prelude/layer/..., params/coda/layer/...   MIDDLE_CYCLE's unique layers, leading axis U, no LoRA
                                 (`layer_tree(collection, 'prelude')`).
KV cache (an explicit pytree, not a collection; `variables.init_cache`): {'k', 'v'} of
[R, K, B, kv_heads, T, head_dim] (attention.KVCache's layout), one slot per depth position, so loops never
overwrite each other. MIDDLE_CYCLE adds 'prelude': {'k', 'v'} of [1, U, B, ...] and 'coda': {'k', 'v'} of
[E, U, B, ...]: the coda's K/V of a token depend on the exit its hidden state came from, so each exit has its own
coda slots (exit e's coda attends to every earlier token's exit-e coda K/V, exactly as when all exits are scored at
once). Every cache leaf has the
batch on axis 2.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrt_jax.config import (
  CODA,
  LORA_TARGETS,
  PRELUDE,
  VANILLA,
  LayerLayout,
  Looping,
  ModelConfig,
  RecursionConfig,
  layer_kinds,
  lora_rank_for,
)
from rrt_jax.model.attention import (
    CACHE_TIME_AXIS,
    Attention,
    KVCache,
    cache_mask,
    fused_projections,
    self_mask,
)
from rrt_jax.model.layers import LORA, Embed, Norm, activation, constrain, dtype_of, softcap
from rrt_jax.model.lora import INTERMEDIATES, LoraDense, LoraSpec, fused_dense

_CHECKPOINT_POLICIES = {  # ModelConfig.remat -> jax.checkpoint policy ('none' = no remat).
    'full': None,  # Save nothing, recompute the layer.
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def target_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """(d_in, d_out) of every LoRA-able projection of one layer."""
  q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  dims = {'q': (cfg.d_model, q_dim), 'k': (cfg.d_model, kv_dim), 'v': (cfg.d_model, kv_dim),
          'o': (q_dim, cfg.d_model), 'up': (cfg.d_model, cfg.mlp_dim), 'down': (cfg.mlp_dim, cfg.d_model)}
  if cfg.has_gate:
    dims['gate'] = (cfg.d_model, cfg.mlp_dim)
  return dims


# Projections of the same input that the per-layer serving layout runs as one matmul: {layer submodule: {fused
# projection: its parts, in kernel order}} (a part absent from a family, e.g. GPT-NeoX's gate, fuses nothing).
# `fused_projections(cfg)` says when; Attention and Mlp build them under these names.
FUSED_PROJECTIONS = {'attn': {'qkv': ('q', 'k', 'v')}, 'mlp': {'gate_up': ('gate', 'up')}}


def lora_specs(cfg: ModelConfig, rec: RecursionConfig) -> dict[str, LoraSpec]:
  """Per-target LoRA spec: rank capped at min(d_in, d_out), scale alpha / rank."""
  relax_bias = rec.has_lora and rec.relax_vectors
  specs = {}
  for name in LORA_TARGETS:
    dims = target_dims(cfg).get(name)
    if dims is None:
      continue
    rank = lora_rank_for(rec, *dims) if rec.has_lora and name in rec.lora_targets else None
    specs[name] = LoraSpec(rank, rec.lora_scale(rank) if rank else 1.0, relax_bias)
  return specs


class Mlp(nn.Module):
  cfg: ModelConfig
  lora: dict[str, LoraSpec]

  @nn.compact
  def __call__(self, x_BxSxD: jax.Array, loop_onehot_BxR: jax.Array | None = None) -> jax.Array:
    cfg, sel = self.cfg, loop_onehot_BxR
    dense = lambda name, features, axes, base=True: LoraDense(  # noqa: E731
        features, axes, use_bias=cfg.mlp_bias, lora=self.lora.get(name, LoraSpec()), dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, base=base, name=name)
    act = activation(cfg.mlp)
    if cfg.has_gate and fused_projections(cfg):  # One [d, 2 * mlp] matmul; each part adds its own LoRA.
      gate, up = fused_dense(dense('gate_up', 2 * cfg.mlp_dim, ('embed', 'mlp')),
                             [dense(n, cfg.mlp_dim, ('embed', 'mlp'), base=False) for n in ('gate', 'up')],
                             x_BxSxD, sel)
      hidden = act(gate) * up
    elif cfg.has_gate:  # GLU: act(gate(x)) * up(x).
      up = dense('up', cfg.mlp_dim, ('embed', 'mlp'))(x_BxSxD, sel)
      hidden = act(dense('gate', cfg.mlp_dim, ('embed', 'mlp'))(x_BxSxD, sel)) * up
    else:
      hidden = act(dense('up', cfg.mlp_dim, ('embed', 'mlp'))(x_BxSxD, sel))
    return dense('down', cfg.d_model, ('mlp', 'embed'))(hidden, sel)


class DecoderLayer(nn.Module):
  """Transformer layer with pre-, sandwich (Gemma 2/3) or post-norms (OLMo 2); sequential or parallel (GPT-NeoX)
  residual. Scan-friendly signature."""

  cfg: ModelConfig
  rec: RecursionConfig

  def setup(self):
    cfg, rec = self.cfg, self.rec
    specs = lora_specs(cfg, rec)
    norm = functools.partial(Norm, cfg.norm, cfg.norm_eps, rec.has_lora and rec.relax_vectors, cfg.dtype,
                             cfg.param_dtype)
    if cfg.norm_placement != 'post':
      self.attn_norm = norm()
      self.mlp_norm = norm()
    if cfg.norm_placement != 'pre':
      self.attn_post_norm = norm()
      self.mlp_post_norm = norm()
    self.attn = Attention(cfg, specs)
    self.mlp = Mlp(cfg, specs)

  def _norm(self, name: str, x_BxSxD: jax.Array, sel) -> jax.Array:
    """The named norm of this layer's placement; the identity where the placement has none."""
    pre = name in ('attn_norm', 'mlp_norm')
    if self.cfg.norm_placement == ('post' if pre else 'pre'):
      return x_BxSxD
    return getattr(self, name)(x_BxSxD, sel)

  def _sliding(self, sliding):
    """A scan over mixed local/global layers passes each layer's kind; elsewhere every layer has cfg's one."""
    if sliding is not None:
      return sliding
    if self.cfg.uniform_sliding is None:
      raise ValueError('This model mixes sliding-window and global layers: run a layer through the Decoder, or '
                       'on its own with cfg.layer_config(depth).')
    return self.cfg.uniform_sliding

  def __call__(self, h_BxSxD: jax.Array, cache: KVCache | None, positions_BxS: jax.Array,
               mask_BxSxT: jax.Array, loop_onehot_BxR=None,
               sliding=None) -> tuple[jax.Array, KVCache | None]:
    """loop_onehot_BxR: each row's loop when rows sit at different depths (multi-LoRA, see lora.py). The K/V an
    early-exited token skips are filled outside the layer, by rrt_jax.model.propagation.propagate_kv.
    sliding: this layer's attention type (a traced bool in a scan over mixed layers; None: cfg's only type)."""
    sel, sliding = loop_onehot_BxR, self._sliding(sliding)
    attn_in = self._norm('attn_norm', h_BxSxD, sel)
    attn_out, new_cache = self.attn(attn_in, positions_BxS, mask_BxSxT, cache, sel, sliding)
    attn_out = self._norm('attn_post_norm', attn_out, sel)
    if self.cfg.parallel_residual:
      h = h_BxSxD + attn_out + self.mlp(self.mlp_norm(h_BxSxD, sel), sel)
    else:
      h = h_BxSxD + attn_out
      h = h + self._norm('mlp_post_norm', self.mlp(self._norm('mlp_norm', h, sel), sel), sel)
    return constrain(h.astype(dtype_of(self.cfg.dtype)), 'embed'), new_cache

  def project_kv(self, h_BxSxD: jax.Array, positions_BxS: jax.Array, sliding=None) -> tuple[jax.Array, jax.Array]:
    """The K/V this layer would cache for hidden states h (its attention norm, then the K/V projections)."""
    return self.attn.project_kv(self._norm('attn_norm', h_BxSxD, None), positions_BxS, None,
                                self._sliding(sliding))


def _maybe_remat(layer_cls: type[nn.Module], policy: str) -> type[nn.Module]:
  if policy == 'none':
    return layer_cls
  # prevent_cse=False is safe and faster under scan (the scan already blocks CSE across iterations).
  return nn.remat(layer_cls, policy=_CHECKPOINT_POLICIES[policy], prevent_cse=False)


# (cache slice, positions, mask, loop_onehot, sliding): a scan over layers takes each layer's kind.
_BROADCAST_ARGS = (0, nn.broadcast, nn.broadcast, nn.broadcast, 0)
_OVER_LOOPS = _BROADCAST_ARGS[:-1] + (nn.broadcast,)  # A scan over loops: every loop has the same kinds.


def _scan(target, length: int, axis_name: str, params_scanned: bool, lora_axis: int = 0,
          in_axes=_BROADCAST_ARGS, out_axes=0, unroll: bool = False):
  """nn.scan over shared layers (params scanned, axis K) or over loops (params broadcast); LoRA is always
  scanned, on `lora_axis`, so each (loop, layer) has its own. `axis_name` is the new axis's logical name.
  unroll (ModelConfig.scan_unroll): the whole scan unrolled in the compiled program; the variables keep their
  stacked layout, so checkpoints are the same either way."""
  if params_scanned:
    variables = dict(variable_axes={'params': 0, LORA: lora_axis}, split_rngs={'params': True, LORA: True})
  else:
    variables = dict(variable_broadcast='params', variable_axes={LORA: lora_axis},
                     split_rngs={'params': False, LORA: True})
  return nn.scan(target, in_axes=in_axes, out_axes=out_axes, length=length, unroll=length if unroll else 1,
                 metadata_params={nn.PARTITION_NAME: axis_name}, **variables)


class LayerList(nn.Module):
  """`count` layers with one buffer each (ModelConfig.layer_layout='per_layer'; submodules '0', '1', ...), run in
  a Python loop: the same inputs and outputs as the nn.scan over layers it replaces. cache_K is either stacked
  ({'k', 'v'} of [count, ...]: a layer's slot is a static slice, a copy, and the new slots are stacked back, a copy
  of the whole cache) or per layer ({'k', 'v'} of tuples of `count` arrays, as the decode loop carries it:
  `per_layer_cache`), where a layer reads and writes its own buffers in place."""

  cfg: ModelConfig
  rec: RecursionConfig
  count: int

  @nn.compact
  def __call__(self, h_BxSxD, cache_K, positions_BxS, mask_BxSxT, loop_onehot=None, sliding_K=None):
    layer_cls = _maybe_remat(DecoderLayer, self.cfg.remat)
    new_slots = []
    per_layer = cache_K is not None and isinstance(cache_K['k'], tuple)
    for k in range(self.count):
      if cache_K is None:
        slot = None
      elif per_layer:
        slot = {'k': cache_K['k'][k], 'v': cache_K['v'][k]}
      else:
        slot = jax.tree.map(lambda x, k=k: x[k], cache_K)
      sliding = None if sliding_K is None else sliding_K[k]
      h_BxSxD, slot = layer_cls(self.cfg, self.rec, name=str(k))(h_BxSxD, slot, positions_BxS, mask_BxSxT,
                                                                 loop_onehot, sliding)
      new_slots.append(slot)
    if cache_K is None:
      return h_BxSxD, None
    if per_layer:
      return h_BxSxD, {name: tuple(slot[name] for slot in new_slots) for name in ('k', 'v')}
    return h_BxSxD, jax.tree.map(lambda *xs: jnp.stack(xs), *new_slots)


def _layers(cfg: ModelConfig, rec: RecursionConfig, count: int, name: str) -> nn.Module:
  """`count` layers with their own variables in cfg's layer layout: scanned (stacked variables) or a LayerList."""
  if cfg.layer_layout == LayerLayout.PER_LAYER:
    return LayerList(cfg, rec, count, name=name)
  return _scan(_maybe_remat(DecoderLayer, cfg.remat), count, 'layers', params_scanned=True,
               unroll=cfg.scan_unroll)(cfg, rec, name=name)


class CycleLoop(nn.Module):
  """One CYCLE loop: the K shared layers in order (params scanned over K, one LoRA per layer)."""

  cfg: ModelConfig
  rec: RecursionConfig

  @nn.compact
  def __call__(self, h_BxSxD, cache_K, positions_BxS, mask_BxSxT, loop_onehot=None, sliding_K=None):
    layers = _layers(self.cfg, self.rec, self.rec.shared_layers(self.cfg.num_layers), 'layer')
    h, new_cache = layers(h_BxSxD, cache_K, positions_BxS, mask_BxSxT, loop_onehot, sliding_K)
    return h, (h, new_cache)  # Emit the loop's final hidden state: every loop is an exit.


class SequenceRepeat(nn.Module):
  """One SEQUENCE group: a shared layer applied R times in a row (params broadcast, one LoRA per repeat)."""

  cfg: ModelConfig
  rec: RecursionConfig

  @nn.compact
  def __call__(self, h_BxSxD, cache_R, positions_BxS, mask_BxSxT, loop_onehot=None, sliding=None):
    repeats = _scan(_maybe_remat(DecoderLayer, self.cfg.remat), self.rec.loops, 'loops', params_scanned=False,
                    in_axes=_OVER_LOOPS, unroll=self.cfg.scan_unroll)
    return repeats(self.cfg, self.rec, name='layer')(h_BxSxD, cache_R, positions_BxS, mask_BxSxT,
                                                     loop_onehot, sliding)


class RecursiveStack(nn.Module):
  """R loops over K shared layers. Returns ([E, batch, S, D] exit hidden states, new cache).

  CYCLE (and MIDDLE_CYCLE's middle): outer scan over loops with the shared params broadcast and LoRA scanned;
  E = R exits.
  SEQUENCE: outer scan over shared layers, inner scan over repeats; E = 1 (only the last depth is complete).
  Both store LoRA and cache with leading axes [R, K] (loop, layer).
  """

  cfg: ModelConfig
  rec: RecursionConfig

  @nn.compact
  def __call__(self, h_BxSxD, cache, positions_BxS, mask_BxSxT, loop_onehot=None, sliding_K=None):
    """sliding_K: [K] bool kinds of the shared layers when they mix local and global ones (else None)."""
    cfg, rec = self.cfg, self.rec
    if rec.loops_are_exits:  # CYCLE, and MIDDLE_CYCLE's middle.
      loops = _scan(CycleLoop, rec.loops, 'loops', params_scanned=False, in_axes=_OVER_LOOPS,
                    unroll=cfg.scan_unroll)
      _, (hidden_ExBxSxD, new_cache) = loops(cfg, rec, name='block')(h_BxSxD, cache, positions_BxS,
                                                                     mask_BxSxT, loop_onehot, sliding_K)
      return hidden_ExBxSxD, new_cache
    groups = _scan(SequenceRepeat, rec.shared_layers(cfg.num_layers), 'layers', params_scanned=True, lora_axis=1,
                   in_axes=(1,) + _BROADCAST_ARGS[1:], out_axes=1, unroll=cfg.scan_unroll)
    h, new_cache = groups(cfg, rec, name='block')(h_BxSxD, cache, positions_BxS, mask_BxSxT, loop_onehot,
                                                  sliding_K)
    return h[None], new_cache


class UniqueStack(nn.Module):
  """MIDDLE_CYCLE's prelude or coda: `length` layers with their own weights (params scanned over U, no LoRA)."""

  cfg: ModelConfig
  length: int

  @nn.compact
  def __call__(self, h_BxSxD, cache_U, positions_BxS, mask_BxSxT, sliding_U=None):
    layers = _layers(self.cfg, VANILLA, self.length, 'layer')
    return layers(h_BxSxD, cache_U, positions_BxS, mask_BxSxT, None, sliding_U)


# The coda over exits: one set of weights (broadcast), each exit with its own hidden states and cache slots.
_OverExits = nn.vmap(UniqueStack, in_axes=(0, 0, None, None, None), out_axes=0, variable_axes={'params': None,
                     INTERMEDIATES: 0}, split_rngs={'params': False})


def cache_length(cache: KVCache) -> int:
  """T, the cache positions of `cache` ({'k', 'v'} of [..., kv_heads, T, head_dim] arrays, or per layer: tuples
  of them, see `LayerList`)."""
  return jax.tree.leaves(cache['k'])[0].shape[CACHE_TIME_AXIS]


def _replaced(items: tuple, index: int, item) -> tuple:
  return items[:index] + (item,) + items[index + 1:]


def _middle_cache(cache: KVCache | None) -> KVCache | None:
  """The looped stack's part of a cache: {'k', 'v'} of [R, K, ...]."""
  return None if cache is None else {'k': cache['k'], 'v': cache['v']}


class Decoder(nn.Module):
  """Decoder LM of any family; recursive and relaxed by `rec`.

  __call__(tokens) -> (logits, cache): logits [batch, S, V] of the last exit, or [E, batch, S, V] with
  all_exits=True (E = R for CYCLE and MIDDLE_CYCLE). With a cache, `positions` are required and the new tokens
  are written at them; the returned cache replaces the old one.
  """

  cfg: ModelConfig
  rec: RecursionConfig = VANILLA

  def setup(self):
    cfg, rec = self.cfg, self.rec
    rec.shared_layers(cfg.num_layers)  # Fails early, naming valid loop counts.
    if cfg.layer_layout == LayerLayout.PER_LAYER and rec.looping == Looping.SEQUENCE:
      raise ValueError("layer_layout='per_layer' runs CYCLE and MIDDLE_CYCLE stacks; a SEQUENCE model keeps "
                       "layer_layout='stacked'.")
    kinds = layer_kinds(cfg, rec)  # A shared layer keeps one attention type: fails early, naming what fits.
    self.kinds = kinds
    self.embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.embed_scale, cfg.dtype, cfg.param_dtype)
    if rec.unique_layers:
      self.prelude = UniqueStack(cfg, rec.unique_layers, name=PRELUDE)
      self.coda = _OverExits(cfg, rec.unique_layers, name=CODA)
    self.stack = RecursiveStack(cfg, rec)
    self.final_norm = Norm(cfg.norm, cfg.norm_eps, False, cfg.dtype, cfg.param_dtype)
    if not cfg.tie_embeddings:
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'vocab'))
      self.lm_head = self.param('lm_head', init, (cfg.d_model, cfg.vocab_size), dtype_of(cfg.param_dtype))

  def __call__(self, tokens_BxS: jax.Array, positions_BxS: jax.Array | None = None,
               segment_ids_BxS: jax.Array | None = None, cache: KVCache | None = None,
               all_exits: bool = False) -> tuple[jax.Array, KVCache | None]:
    # Without a cache only the last exit needs the coda; with one, every exit's coda slots are written.
    hidden, new_cache = self._hidden(tokens_BxS, positions_BxS, segment_ids_BxS, cache,
                                     all_exits or cache is not None)
    return self.logits(hidden if all_exits else hidden[-1]), new_cache

  def hidden_states(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None, cache=None):
    """Embeds and runs the model up to the head: ([E, batch, S, D] exit hidden states before the final norm
    (after the coda under MIDDLE_CYCLE), cache)."""
    return self._hidden(tokens_BxS, positions_BxS, segment_ids_BxS, cache, True)

  def _hidden(self, tokens_BxS, positions_BxS, segment_ids_BxS, cache, all_exits: bool):
    batch, seq = tokens_BxS.shape
    if cache is None:
      if positions_BxS is None:
        positions_BxS = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
      mask = self_mask(positions_BxS, segment_ids_BxS)  # Keeps the segment ids for the fused kernels.
    else:
      if positions_BxS is None:
        raise ValueError('Decoding with a cache needs positions_BxS: where each row\'s tokens are written.')
      if segment_ids_BxS is not None:
        raise ValueError('segment_ids are for packed training sequences; decode one sequence per row.')
      mask = cache_mask(positions_BxS, cache_length(cache))
    h = constrain(self.embedder(tokens_BxS), 'embed')
    if not self.rec.unique_layers:
      return self.stack(h, cache, positions_BxS, mask, sliding_K=self._kinds('stack'))
    h, prelude_cache = self._prelude(h, positions_BxS, mask, cache)
    hidden_ExBxSxD, middle_cache = self.stack(h, _middle_cache(cache), positions_BxS, mask,
                                              sliding_K=self._kinds('stack'))
    if not all_exits:
      hidden_ExBxSxD = hidden_ExBxSxD[-1:]
    hidden_ExBxSxD, coda_cache = self.coda(hidden_ExBxSxD, None if cache is None else cache[CODA], positions_BxS,
                                           mask, self._kinds(CODA))
    if cache is None:
      return hidden_ExBxSxD, None
    return hidden_ExBxSxD, {**middle_cache, PRELUDE: prelude_cache, CODA: coda_cache}

  def _prelude(self, h_BxSxD, positions_BxS, mask, cache):
    """The prelude against the cache's [1, U, ...] prelude slots -> (h, new prelude slots or None)."""
    if cache is not None and isinstance(cache[PRELUDE]['k'], tuple):  # `per_layer_cache`: its own buffers.
      return self.prelude(h_BxSxD, cache[PRELUDE], positions_BxS, mask, self._kinds(PRELUDE))
    slots = None if cache is None else jax.tree.map(lambda x: x[0], cache[PRELUDE])
    h, slots = self.prelude(h_BxSxD, slots, positions_BxS, mask, self._kinds(PRELUDE))
    return h, None if slots is None else jax.tree.map(lambda x: x[None], slots)

  def _kinds(self, stack: str) -> jax.Array | None:
    """[layers] bool attention kinds of one stack ('stack', 'prelude', 'coda') of a model mixing local and global
    layers; None when every layer has the same (static) type."""
    return None if self.kinds is None else jnp.asarray(self.kinds[stack], bool)

  def embed(self, tokens_BxS: jax.Array) -> jax.Array:
    return self.embedder(tokens_BxS)

  def decode_prelude(self, h_BxSxD: jax.Array, positions_BxS: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """MIDDLE_CYCLE: runs the prelude on embedded inputs against the cache -> (its output, the cache with the
    prelude's K/V written). Without unique layers: (h, cache) unchanged."""
    if not self.rec.unique_layers:
      return h_BxSxD, cache
    h, slots = self._prelude(h_BxSxD, positions_BxS, cache_mask(positions_BxS, cache_length(cache)), cache)
    return h, {**cache, PRELUDE: slots}

  def decode_coda(self, h_BxSxD: jax.Array, positions_BxS: jax.Array, cache: KVCache,
                  exit_index: int) -> tuple[jax.Array, KVCache]:
    """MIDDLE_CYCLE: runs the coda on the middle's output after loop `exit_index` (0-based) against that exit's
    coda slots -> (the exit hidden state, the cache with those slots written). Without unique layers:
    (h, cache) unchanged. Loop-by-loop early-exit decoding calls it after every loop."""
    if not self.rec.unique_layers:
      return h_BxSxD, cache
    mask = cache_mask(positions_BxS, cache_length(cache))
    per_layer = isinstance(cache[CODA]['k'], tuple)  # `per_layer_cache`: the exit's own buffers, put back.
    if per_layer:
      slot = {name: cache[CODA][name][exit_index] for name in ('k', 'v')}
    else:
      slot = jax.tree.map(lambda x: x[exit_index:exit_index + 1], cache[CODA])
    h, slot = self.coda(h_BxSxD[None], slot, positions_BxS, mask, self._kinds(CODA))
    if per_layer:
      coda = {name: _replaced(cache[CODA][name], exit_index, slot[name]) for name in ('k', 'v')}
    else:
      coda = jax.tree.map(lambda full, new: full.at[exit_index].set(new[0]), cache[CODA], slot)
    return h[0], {**cache, CODA: coda}

  def decode_stack(self, h_BxSxD: jax.Array, positions_BxS: jax.Array, cache: KVCache,
                   loop_onehot_BxR: jax.Array | None = None):
    """Runs the looped stack on already-embedded inputs against a cache (one loop when rec.loops == 1; no
    prelude or coda): the building block of loop-by-loop early-exit decoding and of depth-wise batching (rows
    at different loops: pass their one-hot and LoRA variables holding every loop, see lora.py)."""
    mask = cache_mask(positions_BxS, cache_length(cache))
    return self.stack(h_BxSxD, _middle_cache(cache), positions_BxS, mask, loop_onehot_BxR,
                      self._kinds('stack'))

  def logits(self, hidden_xD: jax.Array) -> jax.Array:
    """The shared exit head: final norm then LM head, fp32 logits. Any exit's hidden state can go in."""
    x = self.final_norm(hidden_xD)
    if self.cfg.tie_embeddings:
      out = self.embedder.attend(x)
    else:
      dtype = dtype_of(self.cfg.dtype)
      out = jnp.einsum('...d,dv->...v', x.astype(dtype), self.lm_head.astype(dtype))
    return constrain(softcap(out.astype(jnp.float32), self.cfg.final_softcap), 'vocab')
