r"""Uptraining from a checkout: `python -m experiments.train` is the `rrt-train` console script, rrt_jax/cli/train.py
(--help shows its flags).

  python -m experiments.train --config=experiments/configs/smollm2.py:b3_r64_average --workdir=workdir/smollm2 \
      --config.recursion.loops=3 --config.recursion.lora_rank=64 --config.train.steps=200
"""

from rrt_jax.cli.train import main, run  # noqa: F401  (main: for code that drives the entry point itself)

if __name__ == '__main__':
  run()
