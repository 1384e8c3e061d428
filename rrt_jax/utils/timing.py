"""Wall-clock timing of jitted functions: compile separately, then the median of repeated runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def compile_seconds(fn: Callable, *args) -> tuple[float, Callable]:
  """Seconds to lower and compile `jax.jit(fn)` for these args, and the compiled function."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - start, compiled


def median_seconds(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of `fn(*args)` over `repeats` runs, after `warmup` runs, blocking on the result."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def machine_description() -> str:
  import os
  import platform
  devices = jax.devices()
  flags = os.environ.get('XLA_FLAGS', '').strip()
  return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'jax {jax.__version__} on {len(devices)} x {devices[0].device_kind}'
          + (f', XLA_FLAGS={flags}' if flags else ''))
