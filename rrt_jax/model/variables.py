"""Creating, describing and checking a model's variables without touching its forward pass."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rrt_jax.config import CODA, PRELUDE, LayerLayout, Looping, ModelConfig, RecursionConfig
from rrt_jax.model.attention import KVCache
from rrt_jax.model.decoder import FUSED_PROJECTIONS, Decoder, target_dims
from rrt_jax.model.layers import LORA, dtype_of

EMBEDDING_PARAMS = (('embedder', 'embedding'), ('lm_head',))
# Where the looped layers' variables live in 'params' (leading axis K) and 'lora' (leading axes [R, K]), for
# every looping. The only place outside decoder.py's module names that knows the path.
LAYER_PATH = ('stack', 'block', 'layer')
MIDDLE = 'middle'  # The looped (shared) layers, as a `layer_tree` part.
# Every part's path: the looped layers and MIDDLE_CYCLE's unique prelude and coda ('params' only, leading axis U).
PART_PATHS = {MIDDLE: LAYER_PATH, PRELUDE: (PRELUDE, 'layer'), CODA: (CODA, 'layer')}


def _path(part: str) -> tuple[str, ...]:
  if part not in PART_PATHS:
    raise ValueError(f'Unknown layer part {part!r}: choose one of {sorted(PART_PATHS)}.')
  return PART_PATHS[part]


def layer_tree(collection: dict, part: str = MIDDLE) -> dict:
  """The per-layer subtree of a 'params' or 'lora' collection: the looped layers, or with part='prelude' /
  'coda' MIDDLE_CYCLE's unique layers."""
  for key in _path(part):
    collection = collection[key]
  return collection


def with_layer_tree(collection: dict, layers: dict, part: str = MIDDLE) -> dict:
  """A copy of a 'params' or 'lora' collection (or of {} for a new one) whose layer subtree of `part` is
  `layers`."""
  path = _path(part)
  out = dict(collection)
  node = out
  for key in path[:-1]:
    node[key] = dict(node.get(key, {}))
    node = node[key]
  node[path[-1]] = layers
  return out


def layer_layout(variables: dict) -> LayerLayout:
  """The layout of `variables`' layers (see LayerLayout): per-layer buffers are keyed '0', '1', ...."""
  return LayerLayout.PER_LAYER if '0' in layer_tree(variables['params']) else LayerLayout.STACKED


def with_layer_layout(model: Decoder, variables: dict, layout: LayerLayout | str) -> tuple[Decoder, dict]:
  """(model, variables) with every stack's layers in `layout`: STACKED -> PER_LAYER splits each [K, ...] 'params'
  leaf into K buffers and each [R, K, ...] 'lora' leaf into K [R, ...] (and, with model.cfg.fuse_projections,
  joins each layer's FUSED_PROJECTIONS kernels); PER_LAYER -> STACKED splits and stacks them back. The values are
  equal; only the layout of the arrays (and model.cfg.layer_layout) changes. A SEQUENCE model has
  no per-layer form and is returned as is."""
  layout = LayerLayout(layout)
  if model.rec.looping == Looping.SEQUENCE:
    return model, variables
  model = model.clone(cfg=model.cfg.replace(layer_layout=layout))
  if layer_layout(variables) == layout:
    if layout == LayerLayout.PER_LAYER:  # The variables say whether they are fused.
      model = model.clone(cfg=model.cfg.replace(fuse_projections=_is_fused(variables)))
    return model, variables
  split = layout == LayerLayout.PER_LAYER
  out = dict(variables)
  for collection, axis in (('params', 0), (LORA, 1)):  # The layer axis: 'params' [K, ...], 'lora' [R, K, ...].
    if collection not in variables:
      continue
    tree = variables[collection]
    # The per-layer layout's fused projections (decoder.FUSED_PROJECTIONS) are kernels, in 'params' only.
    fuse = _fuse_layer if collection == 'params' and model.cfg.fuse_projections else (lambda layer: layer)
    unfuse = functools.partial(_unfuse_layer, model.cfg) if collection == 'params' else (lambda layer: layer)
    for part in _parts(model, tree):
      layers = layer_tree(tree, part)
      if split:
        count = jax.tree.leaves(layers)[0].shape[axis]
        layers = {str(k): fuse(jax.tree.map(lambda x, k=k, axis=axis: jnp.take(x, k, axis), layers))
                  for k in range(count)}
      else:
        layers = jax.tree.map(lambda *xs, axis=axis: jnp.stack(xs, axis),
                              *(unfuse(layers[str(k)]) for k in range(len(layers))))
      tree = with_layer_tree(tree, layers, part)
    out[collection] = tree
  return model, out


def _is_fused(variables: dict) -> bool:
  """Whether per-layer `variables` hold fused projections (`_fuse_layer`)."""
  first = layer_tree(variables['params'])['0']
  return any(fused in first.get(module, {}) for module, groups in FUSED_PROJECTIONS.items() for fused in groups)


def _fuse_layer(layer: dict) -> dict:
  """One layer's 'params' with each group of FUSED_PROJECTIONS (all parts present) as one kernel (and bias) of
  the parts' side by side."""
  layer = dict(layer)
  for module, groups in FUSED_PROJECTIONS.items():
    sub = dict(layer.get(module, {}))
    for fused, names in groups.items():
      if all(n in sub for n in names):
        parts = [sub.pop(n) for n in names]
        sub[fused] = {leaf: jnp.concatenate([p[leaf] for p in parts], axis=-1) for leaf in parts[0]}
    if sub:
      layer[module] = sub
  return layer


def _unfuse_layer(cfg: ModelConfig, layer: dict) -> dict:
  """`_fuse_layer` undone: each fused kernel (and bias) split into its parts' widths (`target_dims`)."""
  layer = dict(layer)
  widths = {name: dims[1] for name, dims in target_dims(cfg).items()}
  for module, groups in FUSED_PROJECTIONS.items():
    sub = dict(layer.get(module, {}))
    for fused, names in groups.items():
      if fused in sub:
        leaves = sub.pop(fused)
        cuts = np.cumsum([widths[n] for n in names])[:-1].tolist()
        pieces = {leaf: jnp.split(x, cuts, axis=-1) for leaf, x in leaves.items()}
        sub.update({n: {leaf: pieces[leaf][i] for leaf in leaves} for i, n in enumerate(names)})
    if sub:
      layer[module] = sub
  return layer


def _parts(model: Decoder, collection: dict) -> list[str]:
  """The layer parts of `model` that `collection` holds: the looped layers, and MIDDLE_CYCLE's prelude and coda
  ('params' only: they have no LoRA)."""
  parts = (MIDDLE, PRELUDE, CODA) if model.rec.unique_layers else (MIDDLE,)
  return [part for part in parts if _path(part)[0] in collection]


def layer_variables(variables: dict, k: int) -> dict:
  """Layer k's variables of the looped layers in either layout: {'params': [...], 'lora'?: [R, ...]}."""
  per_layer = layer_layout(variables) == LayerLayout.PER_LAYER
  out = {}
  for collection, axis in (('params', 0), (LORA, 1)):
    if collection in variables:
      layers = layer_tree(variables[collection])
      out[collection] = layers[str(k)] if per_layer else jax.tree.map(lambda x, axis=axis: jnp.take(x, k, axis), layers)
  return out


def one_loop(model: Decoder) -> Decoder:
  """The decoder that runs ONE loop of `model`'s recursive block (its K shared layers, R = 1): the building
  block of loop-by-loop early-exit decoding, depth-wise batching and K/V propagation. Its variables are the
  model's 'params' with one loop's LoRA (`loop_variables`) or every loop's (`multi_lora_variables`). Under
  MIDDLE_CYCLE it is the middle's loop alone (no prelude or coda: `Decoder.decode_prelude` / `decode_coda`)."""
  cfg, rec = model.cfg, model.rec
  looping = Looping.CYCLE if rec.looping == Looping.MIDDLE_CYCLE else rec.looping
  return Decoder(cfg.replace(num_layers=rec.shared_layers(cfg.num_layers)),
                 rec.replace(loops=1, looping=looping, unique_layers=0))


def loop_variables(variables: dict, loop: int) -> dict:
  """`variables` of a recursive model as variables of `one_loop(model)` at loop `loop` (0-based)."""
  out = {'params': variables['params']}
  if LORA in variables:
    out[LORA] = jax.tree.map(lambda x: x[loop:loop + 1], variables[LORA])
  return out


def dynamic_loop_variables(variables: dict, loop: jax.Array | int) -> dict:
  """`loop_variables` at a traced loop index (inside lax.while_loop or vmap, where `loop` is not a Python int):
  the LoRA 'loops' axis is sliced with lax.dynamic_slice_in_dim, keeping the [1, K, ...] shape."""
  out = {'params': variables['params']}
  if LORA in variables:
    out[LORA] = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, loop, 1), variables[LORA])
  return out


def first_loops(model: Decoder, variables: dict, loops: int) -> tuple[Decoder, dict]:
  """The model that runs only the first `loops` loops of `model` (CYCLE or MIDDLE_CYCLE): the same shared weights
  (and unique layers) with those loops' LoRA; its last exit computes `model`'s exit `loops`."""
  cfg, rec = model.cfg, model.rec
  if loops == rec.loops:
    return model, variables
  if not rec.loops_are_exits or not 1 <= loops < rec.loops:
    raise ValueError(f'Cannot cut a {rec.looping.value} model of {rec.loops} loops to {loops}.')
  per_loop = rec.shared_layers(cfg.num_layers)
  cut_cfg = cfg.replace(num_layers=2 * rec.unique_layers + loops * per_loop)
  cut_rec = rec.replace(loops=loops)
  cut = dict(variables)
  if LORA in variables:  # Every LoRA / relaxation leaf leads with the loop axis [R, K, ...].
    cut[LORA] = jax.tree.map(lambda x: x[:loops], variables[LORA])
  check_variables(cut, cut_cfg, cut_rec, f'the first {loops} loops')
  return Decoder(cut_cfg, cut_rec), cut


def multi_lora_variables(variables: dict) -> dict:
  """`variables` of a recursive model as variables of `one_loop(model)` that hold EVERY loop's LoRA, for rows
  at different loops in one batch (multi-LoRA, see lora.py): each 'lora' leaf [R, K, ...] becomes
  [1, K, R, ...], so the one-loop block's layer k sees all R loops' adapters and selects per row."""
  out = {'params': variables['params']}
  if LORA in variables:  # Per-layer buffers [R, ...] become [1, R, ...].
    to_multi = (lambda x: x[None]) if layer_layout(variables) == LayerLayout.PER_LAYER else (
        lambda x: jnp.swapaxes(x, 0, 1)[None])
    out[LORA] = jax.tree.map(to_multi, variables[LORA])
  return out


def _init_fn(cfg: ModelConfig, rec: RecursionConfig, seq_len: int = 2):
  model = Decoder(cfg, rec)
  return lambda rng: model.init({'params': rng, LORA: jax.random.fold_in(rng, 1)},
                                jnp.zeros((1, seq_len), jnp.int32))


def variable_shapes(cfg: ModelConfig, rec: RecursionConfig) -> dict:
  """{'params', 'lora'?} of ShapeDtypeStructs, computed with jax.eval_shape (no memory, no weights)."""
  return nn.meta.unbox(jax.eval_shape(_init_fn(cfg, rec), jax.random.key(0)))


def init_variables(cfg: ModelConfig, rec: RecursionConfig, rng: jax.Array, shardings=None) -> dict:
  """Random variables {'params', 'lora'?} as plain arrays; with `shardings` (a matching pytree of
  jax.sharding.Sharding) each leaf is created directly in its sharding, never whole on one device."""
  init = lambda key: nn.meta.unbox(_init_fn(cfg, rec)(key))  # noqa: E731
  return jax.jit(init, out_shardings=shardings)(rng)


def logical_axes(cfg: ModelConfig, rec: RecursionConfig) -> dict:
  """Logical axis names of every variable as PartitionSpecs (sharding rules map them to mesh axes)."""
  return nn.get_partition_spec(jax.eval_shape(_init_fn(cfg, rec), jax.random.key(0)))


def init_cache(cfg: ModelConfig, rec: RecursionConfig, batch: int, max_len: int,
               dtype: str | None = None) -> KVCache:
  """Zero KV cache with one slot per depth position: {'k', 'v'} of [R, K, batch, kv_heads, max_len, head_dim];
  MIDDLE_CYCLE adds 'prelude' {'k', 'v'} of [1, U, ...] and 'coda' {'k', 'v'} of [E, U, ...] (one coda per
  exit; see model/decoder.py)."""
  tail = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # attention.KVCache's layout.
  dt = dtype_of(dtype or cfg.dtype)
  zeros = lambda *lead: {'k': jnp.zeros(lead + tail, dt), 'v': jnp.zeros(lead + tail, dt)}  # noqa: E731
  cache = zeros(rec.loops, rec.shared_layers(cfg.num_layers))
  if rec.unique_layers:
    cache[PRELUDE] = zeros(1, rec.unique_layers)
    cache[CODA] = zeros(rec.num_exits, rec.unique_layers)
  return cache


def per_layer_cache(cache: KVCache) -> KVCache:
  """The cache as one buffer per (depth, layer), what `LayerList` reads and writes in place (a per-layer model
  only): the looped layers' {'k', 'v'} of [R, K, ...] become tuples over the R loops of tuples over the K layers
  of [1, ...] buffers; MIDDLE_CYCLE's prelude [1, U, ...] becomes tuples over U of [...] and its coda [E, U, ...]
  tuples over the E exits of tuples over U of [1, ...]. A decode step picks a loop's (or an exit's) tuple and puts
  the written buffers back: no slice of a stacked buffer to concatenate or scatter back, which XLA:CPU copies whole
  every step. A copy of the cache, once: a decode loop carries it in this form."""
  def split(kv):  # [A, C, ...] -> A tuples of C [1, ...] buffers.
    return tuple(tuple(kv[a:a + 1, c] for c in range(kv.shape[1])) for a in range(kv.shape[0]))

  out = {**cache, **{name: split(cache[name]) for name in ('k', 'v')}}
  if PRELUDE in cache:
    out[PRELUDE] = {name: tuple(kv[0, u] for u in range(kv.shape[1])) for name, kv in cache[PRELUDE].items()}
    out[CODA] = {name: split(kv) for name, kv in cache[CODA].items()}
  return out


def check_variables(variables: dict, cfg: ModelConfig, rec: RecursionConfig, source: str = 'variables'):
  """Raises a ValueError naming every path whose presence or shape differs from what (cfg, rec) expect."""
  want = traverse_util.flatten_dict(variable_shapes(cfg, rec))
  got = traverse_util.flatten_dict(jax.tree.map(jnp.shape, dict(variables),
                                                is_leaf=lambda x: hasattr(x, 'shape')))
  problems = [f'{"/".join(p)} has shape {tuple(got[p])}, expected {tuple(want[p].shape)}'
              for p in want if p in got and tuple(got[p]) != tuple(want[p].shape)]
  problems += [f'missing {"/".join(p)}' for p in want if p not in got]
  problems += [f'unexpected {"/".join(p)}' for p in got if p not in want]
  if problems:
    raise ValueError(f'{source} do not match the config ({cfg.family}, {cfg.num_layers} layers, '
                     f'loops={rec.loops}, looping={rec.looping.value}, unique_layers={rec.unique_layers}, '
                     f'lora_rank={rec.lora_rank}): ' + '; '.join(problems[:6]) +
                     (f'; and {len(problems) - 6} more' if len(problems) > 6 else '') +
                     '. Load them with the config they were saved with, or convert them with to_recursive.')


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Parameter counts as in the paper: embedding = embedding matrix + untied head; the rest is non-embedding."""

  non_embedding: int
  embedding: int
  lora: int  # Part of non_embedding: the per-(loop, layer) relaxation.

  @property
  def total(self) -> int:
    return self.non_embedding + self.embedding


def count_params(cfg: ModelConfig, rec: RecursionConfig) -> ParamCount:
  """Counts from shapes alone; MIDDLE_CYCLE's unique layers are non-embedding, like the shared ones."""
  shapes = variable_shapes(cfg, rec)
  size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  flat = traverse_util.flatten_dict(shapes['params'])
  embedding = sum(int(x.size) for p, x in flat.items() if p in EMBEDDING_PARAMS)
  lora = size(shapes.get(LORA, {}))
  return ParamCount(size(shapes['params']) - embedding + lora, embedding, lora)
