"""The tiny CPU experiment config with dotted overrides, for tests that train ('train.steps': 4, ...)."""

import ml_collections

from experiments.configs import tiny_cpu


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = tiny_cpu.get_config()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
