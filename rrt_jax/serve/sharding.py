"""Serving over a device mesh: the variables by the training rule table, the KV cache to match.

Variables go where training puts them (rrt_jax.sharding.RULES): heads, kv, MLP and vocab split over
'tensor', embed over 'fsdp'. The KV cache [R, K, B, kv_heads, T, head_dim] (model.init_cache; MIDDLE_CYCLE's
prelude and coda alike) takes the same table through logical names: its rows (generate) or slots (Engine) are
'batch' (over data x fsdp) and its kv_heads 'kv' (over tensor, like the K/V projections that fill it), so each
device holds the K/V of its own rows and heads. A cache dimension that does not divide its mesh axes stays whole
on every device of them (logged: correct, but those devices repeat the work); a variable that does not divide
is an error (check_divisible).
"""

from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrt_jax.model import Decoder, check_variables, init_cache
from rrt_jax.model.attention import KVCache
from rrt_jax.sharding import RULES, check_divisible, variable_shardings

log = logging.getLogger(__name__)

CACHE_AXES = ('loops', 'layers', 'batch', 'kv', None, None)  # [R, K, B, kv_heads, T, head_dim]


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:  # Once per process: generate() and Engine.run ask again every call.
  log.warning(message)


def _fit(logical: tuple, shape: tuple[int, ...], mesh: Mesh, what: str | None) -> NamedSharding:
  """The sharding RULES give `logical`, with every dimension that does not divide its mesh axes left whole
  (logged, unless `what` is None)."""
  spec = list(nn.logical_to_mesh_axes(logical, RULES))
  for dim, axes in enumerate(spec):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = math.prod(mesh.shape.get(a, 1) for a in names)
    if ways > 1 and shape[dim] % ways:
      if what:
        split = ' x '.join(a for a in names if mesh.shape.get(a, 1) > 1)  # The axes that actually split it.
        _warn_once(f'{what}: {logical[dim]}={shape[dim]} does not split over mesh {split}={ways}; it is '
                   f'replicated there (each of those devices repeats its work): choose a multiple of {ways}.')
      spec[dim] = None
  return NamedSharding(mesh, PartitionSpec(*spec))


def cache_shardings(model: Decoder, mesh: Mesh, batch: int) -> KVCache:
  """NamedSharding of every leaf of `init_cache(model.cfg, model.rec, batch, ...)`: rows over data x fsdp,
  kv_heads over tensor, where they divide (see module doc)."""
  cfg = model.cfg
  shapes = jax.eval_shape(lambda: init_cache(cfg, model.rec, batch, 1))
  sharding = _fit(CACHE_AXES, (1, 1, batch, cfg.num_kv_heads, 1, cfg.head_dim), mesh, 'KV cache')
  return jax.tree.map(lambda _: sharding, shapes)


def sharded_cache(model: Decoder, mesh: Mesh, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
  """`init_cache` created directly in `cache_shardings` (never whole on one device)."""
  return jax.jit(lambda: init_cache(model.cfg, model.rec, batch, max_len, dtype),
                 out_shardings=cache_shardings(model, mesh, batch))()


def rows_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """[B, ...] per-row arrays: rows over data x fsdp like the cache's, replicated where B does not divide (not
  logged again: cache_shardings of the same B says so)."""
  return _fit(('batch',) + (None,) * (len(shape) - 1), shape, mesh, None)


def shard_variables(model: Decoder, variables: dict, mesh: Mesh) -> dict:
  """`variables` ({'params', 'lora'?}) placed by the training rule table; one error naming the variables that do
  not divide. Leaves already in their sharding are not copied."""
  cfg, rec = model.cfg, model.rec
  check_variables(variables, cfg, rec)
  check_divisible(cfg, rec, mesh)
  return jax.device_put(dict(variables), variable_shardings(cfg, rec, mesh))


__all__ = ['cache_shardings', 'rows_sharding', 'shard_variables', 'sharded_cache']
