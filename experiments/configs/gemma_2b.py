"""The paper's gemma_2b setting: bring the HF checkpoint with --config.model.path=/path/to/gemma_2b.

  python -m experiments.train --config=experiments/configs/gemma_2b.py:b2_r512_average \
      --config.model.path=/ckpt/gemma_2b --workdir=gs://bucket/gemma_2b
Variants: b2 / b3 (loops), r0 / r64 / r128 / r256 / r512 (LoRA rank), stepwise / ends / average / lower.
With --config.model.source=random the same shapes run with random weights (throughput and MFU checks).
"""

from experiments.configs.base import apply_variant, base_config


def get_config(variant: str = 'b2_r0_stepwise'):
  c = base_config()
  c.model.source = 'hf'
  c.model.preset = 'gemma_2b'
  c.model.dtype = 'bfloat16'
  c.model.remat = 'dots_no_batch'
  c.data.seq_len = 2048
  c.data.global_batch = 256
  c.train.steps = 10_000
  c.train.lr = 1e-4
  c.train.warmup_steps = 200
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.checkpoint.every_steps = 500
  c.log_every = 20
  return apply_variant(c, variant)
