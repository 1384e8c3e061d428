r"""Uptraining entry point (absl flags + ml_collections config files).

  python -m experiments.train --config=experiments/configs/smollm2.py:b3_r64_average --workdir=workdir/smollm2 \
      --config.recursion.loops=3 --config.recursion.lora_rank=64 --config.train.steps=200

The config is locked: a mistyped override fails with a suggestion. Resumes from the latest checkpoint in
--workdir; SIGTERM saves a checkpoint and exits.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from rrt_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:variant].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard events.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  history = train(_CONFIG.value, _WORKDIR.value)
  if history:
    last = history[-1]
    print(f'step {last["step"]}: loss {last["loss"]:.4f}, {last["tokens_per_s"]:,.0f} tokens/s, '
          f'MFU {last["mfu"]:.2%}')


if __name__ == '__main__':
  app.run(main)
