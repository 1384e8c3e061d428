"""Model FLOPs per token (for MFU) and the measured matmul peak of this machine."""

from __future__ import annotations

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
