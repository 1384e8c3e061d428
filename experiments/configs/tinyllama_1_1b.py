"""The paper's tinyllama_1_1b setting: bring the HF checkpoint with --config.model.path=/path/to/tinyllama_1_1b.

  python -m experiments.train --config=experiments/configs/tinyllama_1_1b.py:b2_r512_average \
      --config.model.path=/ckpt/tinyllama_1_1b --workdir=/ckpt/runs/tinyllama_1_1b
Variants: b2 / b3 (loops), r0 / r64 / r128 / r256 / r512 (LoRA rank), stepwise / ends / average / lower.
With --config.model.source=random --config.data.tokenizer=smollm2 the same shapes run with random weights
(throughput and MFU checks; a random model has no tokenizer of its own).

The config itself is rrt_jax/configs/tinyllama_1_1b.py (packaged; `rrt-train --config=tinyllama_1_1b:...`).
"""

from rrt_jax.configs.tinyllama_1_1b import get_config  # noqa: F401  (this file is a config file too)
