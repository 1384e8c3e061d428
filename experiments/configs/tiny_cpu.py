"""A tiny random Llama-shaped model on CPU: the fast config of tests and smoke runs.

  python -m experiments.train --config=experiments/configs/tiny_cpu.py:b2_r8 --workdir=/tmp/tiny

The config itself is rrt_jax/configs/tiny_cpu.py (packaged; `rrt-train --config=tiny_cpu:...`).
"""

from rrt_jax.configs.tiny_cpu import get_config  # noqa: F401  (this file is a config file too)
