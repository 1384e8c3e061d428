"""Model FLOPs per token (for MFU), per-chip peak FLOP/s and memory of TPUs and GPUs, and the measured matmul peak
of this machine (CPUs, which have no table entry)."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import lora_specs, target_dims


def _layer_flops(cfg: ModelConfig, rec: RecursionConfig, seq_len: int) -> tuple[float, float]:
  """(matmul FLOPs per token of one layer with attention, of its LoRA)."""
  dims = target_dims(cfg)
  layer = sum(2 * d_in * d_out for d_in, d_out in dims.values())
  specs = lora_specs(cfg, rec)
  lora = sum(2 * spec.rank * (dims[t][0] + dims[t][1]) for t, spec in specs.items() if spec.rank)
  attention = 4 * seq_len * cfg.num_heads * cfg.head_dim  # QK^T and PV, non-causal upper bound as in PaLM.
  return layer + attention, lora


def forward_flops_per_token(cfg: ModelConfig, rec: RecursionConfig, seq_len: int) -> float:
  """Matmul FLOPs of one forward pass per token: every depth position applies its (shared) layer and its
  LoRA (MIDDLE_CYCLE's unique layers have none); attention scores and values; the LM head (at every exit only
  if `rec` trains all exits: counted once)."""
  layer, lora = _layer_flops(cfg, rec, seq_len)
  looped = cfg.num_layers - 2 * rec.unique_layers
  return cfg.num_layers * layer + looped * lora + 2 * cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, rec: RecursionConfig, seq_len: int, exits: int = 1,
                          teacher: ModelConfig | None = None) -> float:
  """3x the student's forward (forward + backward) with the head (and MIDDLE_CYCLE's coda) applied at `exits`
  exits, plus the teacher's forward when distilling."""
  head = 2 * cfg.d_model * cfg.vocab_size + rec.unique_layers * _layer_flops(cfg, rec, seq_len)[0]
  student = 3 * (forward_flops_per_token(cfg, rec, seq_len) + (exits - 1) * head)
  return student + (forward_flops_per_token(teacher, RecursionConfig(), seq_len) if teacher else 0.0)


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip as data: dense bf16 peak FLOP/s and HBM bytes, from the vendors' spec sheets (per chip:
  a TPU v4 chip, not its two TensorCores; an SXM GPU). `kinds` are lowercase substrings of jax's device_kind."""
  name: str
  peak_bf16_flops: float
  hbm_bytes: float
  kinds: tuple[str, ...]


_GiB = 1024 ** 3
CHIPS: tuple[Chip, ...] = (
    Chip('v4', 275e12, 32 * _GiB, ('tpu v4',)),
    Chip('v5e', 197e12, 16 * _GiB, ('tpu v5 lite', 'tpu v5e')),
    Chip('v5p', 459e12, 95 * _GiB, ('tpu v5p', 'tpu v5')),  # After 'tpu v5 lite': 'tpu v5' alone is v5p.
    Chip('v6e', 918e12, 32 * _GiB, ('tpu v6 lite', 'tpu v6e', 'tpu7x')),
    Chip('A100', 312e12, 80e9, ('a100',)),
    Chip('H100', 989e12, 80e9, ('h100',)),
    Chip('H200', 989e12, 141e9, ('h200',)),
)


def chip(name: str) -> Chip:
  """The table entry by name (v4, v5e, v5p, v6e, A100, H100, H200; any case)."""
  for c in CHIPS:
    if c.name.lower() == name.lower():
      return c
  raise ValueError(f'Unknown chip {name!r}: choose one of {[c.name for c in CHIPS]}.')


def chip_of(device: jax.Device) -> Chip | None:
  """The table entry of a jax device by its device_kind, or None (CPUs, unknown chips)."""
  kind = device.device_kind.lower()
  for c in CHIPS:
    if any(k in kind for k in c.kinds):
      return c
  return None


def peak_flops(dtype: str = 'float32', device: jax.Device | None = None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from) for MFU. TPUs and GPUs: the table's dense bf16 peak
  (also for fp32 runs, which the MXU/tensor cores run at most at that rate: MFU stays a fraction of the chip's
  best); unknown chips and CPUs: the measured matmul in `dtype`."""
  device = device or jax.devices()[0]
  entry = chip_of(device) if device.platform != 'cpu' else None
  if entry is not None:
    return entry.peak_bf16_flops, f'{entry.name} spec bf16'
  return measured_matmul_peak(dtype), f'measured {dtype} matmul on {device.device_kind}'


def measured_matmul_peak(dtype: str = 'float32', size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a jitted square matmul on the default device (median of `repeats`)."""
  a = jnp.ones((size, size), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / sorted(times)[len(times) // 2]
