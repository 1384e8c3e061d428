"""The paper's gemma_2b setting: bring the HF checkpoint with --config.model.path=/path/to/gemma_2b.

  python -m experiments.train --config=experiments/configs/gemma_2b.py:b2_r512_average \
      --config.model.path=/ckpt/gemma_2b --workdir=/ckpt/runs/gemma_2b
Variants: b2 / b3 (loops), r0 / r64 / r128 / r256 / r512 (LoRA rank), stepwise / ends / average / lower.
With --config.model.source=random --config.data.tokenizer=smollm2 the same shapes run with random weights
(throughput and MFU checks; a random model has no tokenizer of its own).

The config itself is rrt_jax/configs/gemma_2b.py (packaged; `rrt-train --config=gemma_2b:...`).
"""

from rrt_jax.configs.gemma_2b import get_config  # noqa: F401  (this file is a config file too)
