"""Test-side reference: unroll a recursive model into a plain vanilla model, written independently of the
library's scan order and LoRA code, so the tests compare two different constructions."""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from rrt_jax.config import CODA, PRELUDE
from rrt_jax.model import PART_PATHS, layer_tree, with_layer_tree


def depth_order(looping: str, loops: int, shared: int) -> list[tuple[int, int]]:
  """(loop b, shared layer k) of each depth position, spelled out by hand."""
  if looping == 'cycle':  # 1..K, 1..K, ...
    return [(b, k) for b in range(loops) for k in range(shared)]
  return [(b, k) for k in range(shared) for b in range(loops)]  # 1, 1, 2, 2, ...


def unroll(variables: dict, looping: str, loops: int, lora_alpha: float | None = None,
           depths: int | None = None) -> dict:
  """Vanilla params whose depth position l holds shared[k] + its own LoRA / vector delta merged in."""
  params = jax.tree.map(np.asarray, variables['params'])
  shared = traverse_util.flatten_dict(layer_tree(params))
  lora = traverse_util.flatten_dict(jax.tree.map(np.asarray, layer_tree(variables['lora']))) \
      if 'lora' in variables else {}
  num_shared = next(iter(shared.values())).shape[0]
  order = depth_order(looping, loops, num_shared)[:depths]
  layers = {}
  for path, value in shared.items():
    per_depth = []
    for b, k in order:
      w = value[k].astype(np.float64)
      module, leaf = path[:-1], path[-1]
      if leaf == 'kernel' and module + ('a',) in lora:
        a, bm = lora[module + ('a',)][b, k], lora[module + ('b',)][b, k]
        rank = a.shape[-1]
        w = w + ((lora_alpha or rank) / rank) * (a.astype(np.float64) @ bm.astype(np.float64))
      if module + (leaf + '_delta',) in lora:
        w = w + lora[module + (leaf + '_delta',)][b, k]
      per_depth.append(w.astype(np.float32))
    layers[path] = np.stack(per_depth)
  return {'params': with_layer_tree(params, traverse_util.unflatten_dict(layers))}


def perturb(tree, seed: int, scale: float = 0.3):
  """Adds noise to every leaf (so zero-initialised LoRA B and vector deltas become non-trivial)."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [np.asarray(x) + scale * rng.standard_normal(np.shape(x)).astype(np.float32)
                                      for x in leaves])


def unroll_middle_cycle(variables: dict, loops: int, lora_alpha: float | None = None,
                        exit_loops: int | None = None) -> dict:
  """Vanilla params of a MIDDLE_CYCLE model: [prelude layers, the middle's first `exit_loops` loops (all by
  default) as tied copies with their LoRA merged, coda layers]: the model behind exit `exit_loops`."""
  params = jax.tree.map(np.asarray, variables['params'])
  shared = next(iter(traverse_util.flatten_dict(layer_tree(params)).values())).shape[0]
  middle = unroll(variables, 'cycle', loops, lora_alpha, depths=None if exit_loops is None else exit_loops * shared)
  parts = [traverse_util.flatten_dict(layer_tree(params, PRELUDE)),
           traverse_util.flatten_dict(layer_tree(middle['params'])),
           traverse_util.flatten_dict(layer_tree(params, CODA))]
  layers = {path: np.concatenate([part[path] for part in parts]) for path in parts[1]}
  plain = {key: value for key, value in params.items() if key not in (PART_PATHS[PRELUDE][0], PART_PATHS[CODA][0])}
  return {'params': with_layer_tree(plain, traverse_util.unflatten_dict(layers))}
