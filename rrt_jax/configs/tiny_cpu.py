"""A tiny random Llama-shaped model on CPU: the fast config of tests and smoke runs.

  rrt-train --config=tiny_cpu:b2_r8 --workdir=/tmp/tiny
  python -m experiments.train --config=experiments/configs/tiny_cpu.py:b2_r8 --workdir=/tmp/tiny
"""

from rrt_jax.configs.base import apply_variant, base_config


def get_config(variant: str = ''):
  c = base_config()
  c.model.source = 'random'
  c.model.preset = 'tiny_llama'
  c.data.tokenizer = 'bytes'
  c.loss.kd_weight = 0.0  # A random teacher teaches nothing; the tests switch KD on explicitly.
  c.recursion.loops = 2
  c.recursion.lora_rank = 8
  c.data.seq_len = 64
  c.data.global_batch = 8
  c.train.steps = 20
  c.train.lr = 3e-3
  c.train.warmup_steps = 2
  c.checkpoint.every_steps = 10
  c.log_every = 5
  return apply_variant(c, variant)
