"""Creating, describing and checking a model's variables without touching its forward pass."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model.attention import KVCache
from rrt_jax.model.decoder import Decoder
from rrt_jax.model.layers import LORA, dtype_of

EMBEDDING_PARAMS = (('embedder', 'embedding'), ('lm_head',))


def layer_tree(collection: dict) -> dict:
  """The per-layer subtree of a 'params' or 'lora' collection (same path for CYCLE and SEQUENCE)."""
  return collection['stack']['block']['layer']


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
  """Zero KV cache with one slot per depth position: [B, K, batch, max_len, kv_heads, head_dim]."""
  shape = (rec.loops, rec.shared_layers(cfg.num_layers), batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dt = dtype_of(dtype or cfg.dtype)
  return {'k': jnp.zeros(shape, dt), 'v': jnp.zeros(shape, dt)}


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
                     f'loops={rec.loops}, lora_rank={rec.lora_rank}): ' + '; '.join(problems[:6]) +
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
  shapes = variable_shapes(cfg, rec)
  size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  flat = traverse_util.flatten_dict(shapes['params'])
  embedding = sum(int(x.size) for p, x in flat.items() if p in EMBEDDING_PARAMS)
  lora = size(shapes.get(LORA, {}))
  return ParamCount(size(shapes['params']) - embedding + lora, embedding, lora)
