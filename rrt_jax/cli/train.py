r"""Uptraining entry point (absl flags + ml_collections config files): `rrt-train`, or from a checkout
`python -m experiments.train`.

  rrt-train --config=smollm2:b3_r64_average --workdir=workdir/smollm2 --config.train.steps=200
  python -m experiments.train --config=experiments/configs/smollm2.py:b3_r64_average --workdir=workdir/smollm2 \
      --config.recursion.loops=3 --config.recursion.lora_rank=64 --config.train.steps=200

--config is a config file[:variant] (a path from the working directory) or a packaged config by name
(rrt_jax/configs/: gemma_2b, pythia_1b, smollm2, tiny_cpu, tinyllama_1_1b), which works from any directory.
The config is locked and checked before anything is loaded: a mistyped field or a bad value is one line (exit
status 2). Resumes from the latest checkpoint in --workdir. SIGTERM or Ctrl-C saves a checkpoint and exits with
status 128 + the signal number (143, 130), so schedulers see an interrupted run; rerunning the same command resumes.
A known failure (a non-finite loss, a checkpoint that cannot be written, a locked or mismatched workdir) is one
message and exit status 1 (-v 1 adds the traceback).
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

from rrt_jax.cli import common
from rrt_jax.train.checkpointing import CheckpointError, Interrupted
from rrt_jax.train.loop import train
from rrt_jax.train.validate import check_config
from rrt_jax.utils.locking import LockHeld

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:variant], or a packaged config '
                                          'by name[:variant] (smollm2, tiny_cpu, gemma_2b, ...).', lock_config=True)
common.accept_config_names(_CONFIG)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard events.')
flags.mark_flags_as_required(['config', 'workdir'])

KNOWN_FAILURES = (FloatingPointError, CheckpointError, LockHeld, ValueError)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  try:
    history = train(_CONFIG.value, _WORKDIR.value)
  except Interrupted as e:
    print(f'train: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except KNOWN_FAILURES as e:
    if flags.FLAGS.verbosity > 0:  # -v 1: the traceback too.
      raise
    print(f'train: {type(e).__name__}: {e}', file=sys.stderr)
    sys.exit(1)
  if history:
    last = history[-1]
    print(f'step {last["step"]}: loss {last["loss"]:.4f}, {last["tokens_per_s"]:,.0f} tokens/s, '
          f'MFU {last["mfu"]:.2%}')


def run() -> None:
  common.run(main, validate=lambda: check_config(_CONFIG.value, _WORKDIR.value))


if __name__ == '__main__':
  run()
