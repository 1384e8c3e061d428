"""SmolLM2-135M (the packaged GGUF) -> Relaxed Recursive with the project's recipe: Average shared layers,
whitened-SVD LoRA from sequential calibration, layer-wise healing, then KD + early-exit uptraining on the
Debian docs.

  rrt-train --config=smollm2:b3_r64_average --workdir=workdir/smollm2
  python -m experiments.train --config=experiments/configs/smollm2.py:b3_r64_average --workdir=workdir/smollm2
  # The paper's weight-space SVD init without healing: variant b3_r64_average_svd --config.healing.steps_per_layer=0
"""

from rrt_jax.configs.base import apply_variant, base_config


def get_config(variant: str = 'b3_r64_average'):
  c = base_config()
  c.model.source = 'smollm2'
  c.recursion.lora_init = 'whitened_svd'
  c.healing.steps_per_layer = 16
  c.data.seq_len = 256
  c.data.global_batch = 8
  c.train.steps = 200
  c.train.lr = 3e-4
  c.train.warmup_steps = 20
  return apply_variant(c, variant)
