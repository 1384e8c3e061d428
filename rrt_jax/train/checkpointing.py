"""A training workdir's checkpoints: written by TrainCheckpoints, read back by `load_training_checkpoint`.

Layout: <workdir>/model_config.json (rrt_jax.checkpoint's configs) and <workdir>/checkpoints/<step>/{state, data}
(Orbax CheckpointManager: the TrainState and the grain iterator state). Saves asynchronously every N steps and on
demand (SIGTERM, see Preemption). Restores onto any mesh (the target shardings come from the caller). A checkpoint
that fails to restore (corrupt or partial) is reported and the previous good one is used. The workdir is a local
path or a URI that Orbax and etils.epath handle (gs://bucket/run).
"""

from __future__ import annotations

import logging
import os
import signal

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from rrt_jax import checkpoint
from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import Decoder, check_variables
from rrt_jax.utils.uri import as_path

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = 'checkpoints'
STATE, DATA = 'state', 'data'  # The items of each step.


def checkpoints_dir(workdir: str | os.PathLike) -> epath.Path:
  return as_path(workdir) / CHECKPOINTS_DIR  # Absolute if local; a URI stays a URI.


class TrainCheckpoints:
  """Checkpoints under <workdir>/checkpoints/<step>/{state, data}; model configs in <workdir>/model_config.json."""

  def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int = 3, async_save: bool = True):
    self.directory = checkpoints_dir(workdir)
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

  def write_configs(self, workdir: str | os.PathLike, cfg: ModelConfig, rec: RecursionConfig) -> None:
    if jax.process_index() == 0:
      checkpoint.write_configs(workdir, cfg, rec)

  def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    if step in self.manager.all_steps():  # Already saved (e.g. the periodic save at the final step).
      return False
    # grain's handler writes one state file per process, so every host resumes its own shard.
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 DATA: grain.checkpoint.CheckpointSave(data_iterator)})
    saved = self.manager.save(step, args=args, force=force)
    if saved:
      log.info('checkpoint saved at step %d', step)
    return saved

  def latest_step(self) -> int | None:
    """The newest saved step, or None before the first save."""
    return self.manager.latest_step()

  def restore_latest(self, abstract_state, data_iterator) -> tuple[int, object] | None:
    """(step, state) of the newest checkpoint that restores (data_iterator is set to its state in place);
    None if there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state), DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))
      except Exception as e:  # Orbax raises several types for missing or corrupt files.
        log.error('checkpoint at step %d could not be restored (%s: %s); trying the previous one', step,
                  type(e).__name__, str(e)[:300])
        continue
      return step, restored[STATE]
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_training_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> tuple[Decoder, dict, int]:
  """(Decoder(cfg, rec), variables, step) from a training workdir (the latest checkpoint by default)."""
  cfg, rec = checkpoint.read_configs(workdir, 'holds no training run')
  ckpt_dir = checkpoints_dir(workdir)
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f'{workdir} holds no training run (no {CHECKPOINTS_DIR}/).')
  # Orbax's finalized steps: on GCS an unfinished step directory has its final name, only without its commit file.
  steps = sorted(ocp.utils.checkpoint_steps(ckpt_dir))
  if not steps:
    raise FileNotFoundError(f'No finished checkpoint in {ckpt_dir}.')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {ckpt_dir}; there are {steps}.')
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(ckpt_dir / str(step) / STATE)  # The TrainState's fields, as a dict.
  variables = jax.tree.map(jax.numpy.asarray, state['variables'])
  check_variables(variables, cfg, rec, f'checkpoint {ckpt_dir}/{step}')
  return Decoder(cfg, rec), variables, step


class Preemption:
  """SIGTERM (a preempted or stopped job) sets `requested`; the loop saves a checkpoint and stops at the next step
  boundary. `restore` puts the previous handler back."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    log.warning('SIGTERM received: saving a checkpoint and stopping')
    self.requested = True

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)
