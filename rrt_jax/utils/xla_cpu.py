"""XLA:CPU settings that must be in place before JAX starts its backend (XLA reads XLA_FLAGS once)."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from jax._src import xla_bridge

# XLA:CPU's dots through YNNPACK. Measured on a 2-core x86_64 host (BUILD_NOTES, "YNNPACK dots"): SmolLM2-135M's
# decode step of 4 tokens at batch 1 (a speculation verify) -25 %, of batch 4 -17 %, batch 1 unchanged; a
# training-shaped matmul's forward + backward -7 to -13 %. The default dot emitter runs a [2-8, 576] x [576, 1536]
# product at half the speed of the [1, 576] one.
YNN_DOTS = '--xla_cpu_experimental_ynn_fusion_type=dot'


def prefer_ynn_dots(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Adds YNN_DOTS to XLA_FLAGS unless XLA_FLAGS already sets the ynn fusion type (so a user's choice, e.g.
  `--xla_cpu_experimental_ynn_fusion_type=`, wins). Call it first in a program's main. Returns whether the flag is
  in effect for this process: False when the user chose otherwise, or when a backend is already running (the
  flags were read; set XLA_FLAGS in the environment instead)."""
  flags = environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' in flags:
    return YNN_DOTS in flags.split()
  if xla_bridge.backends_are_initialized():
    return False
  environ['XLA_FLAGS'] = f'{flags} {YNN_DOTS}'.strip()
  return True


__all__ = ['YNN_DOTS', 'prefer_ynn_dots']
