"""Experiment configs (ml_collections), shipped with the package so that `rrt-train` finds them from any directory.

Each module but `base` is a config file with `get_config(variant)`: pass it to `--config` by name, with or
without a variant, or by path as before:

  rrt-train --config=smollm2:b3_r64_average ...                      # a packaged config by name
  rrt-train --config=/abs/or/relative/my_config.py:variant ...        # any config file
  python -m experiments.train --config=experiments/configs/smollm2.py:b3_r64_average ...  # from a checkout

experiments/configs/*.py in a checkout are the same configs (they re-export these modules), so the paths in the
README, the launchers and the tests keep working; `resolve` maps such a repo-relative path to the packaged file
when the working directory is not the checkout.
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))
_NOT_CONFIGS = ('__init__', 'base')
# Repo-relative folders whose config files are (or re-export) the packaged ones.
_REPO_DIRS = ('experiments/configs/', 'rrt_jax/configs/')


def names() -> list[str]:
  """The packaged configs, by the name `--config` takes."""
  return sorted(f[:-3] for f in os.listdir(DIR) if f.endswith('.py') and f[:-3] not in _NOT_CONFIGS)


def resolve(spec: str) -> str:
  """A `--config` value (file[:variant]) as a path config_flags loads from this working directory.

  An existing file is used as given (a file in the working directory wins over a packaged config of its name);
  otherwise a bare name (`smollm2`, `smollm2.py`) or a repo-relative path (`experiments/configs/smollm2.py`) of
  a packaged config is that packaged file. Anything else is returned unchanged, for config_flags to report."""
  path, sep, variant = spec.partition(':')
  if not path or os.path.isfile(path):
    return spec
  posix = path.replace(os.sep, '/')
  name = posix.rsplit('/', 1)[-1].removesuffix('.py')
  bare = '/' not in posix
  repo_relative = any(posix == f'{d}{name}.py' or posix == f'./{d}{name}.py' for d in _REPO_DIRS)
  if (bare or repo_relative) and name in names():
    return os.path.join(DIR, f'{name}.py') + sep + variant
  return spec
