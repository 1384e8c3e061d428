"""Orbax CheckpointManager for training: state (params, optimizer state, step) + grain iterator state.

Saves asynchronously every N steps and on demand (SIGTERM). Restores onto any mesh (the target shardings come
from the caller). A checkpoint that fails to restore (corrupt or partial) is reported and the previous good one
is used. The workdir is a local path or a URI that Orbax and etils.epath handle (gs://bucket/run).
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

from rrt_jax import checkpoint
from rrt_jax.config import ModelConfig, RecursionConfig

log = logging.getLogger(__name__)


class TrainCheckpoints:
  """Checkpoints under <workdir>/checkpoints/<step>/{state, data}; model configs in <workdir>/model_config.json."""

  def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int = 3, async_save: bool = True):
    self.directory = checkpoint.as_path(workdir) / 'checkpoints'  # Absolute if local; a URI stays a URI.
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))

  def write_configs(self, workdir: str | os.PathLike, cfg: ModelConfig, rec: RecursionConfig) -> None:
    if jax.process_index() == 0:
      checkpoint.write_configs(workdir, cfg, rec)

  def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    if step in self.manager.all_steps():  # Already saved (e.g. the periodic save at the final step).
      return False
    # grain's handler writes one state file per process, so every host resumes its own shard.
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator))
    saved = self.manager.save(step, args=args, force=force)
    if saved:
      log.info('checkpoint saved at step %d', step)
    return saved

  def restore_latest(self, abstract_state, data_iterator) -> tuple[int, object] | None:
    """(step, state) of the newest checkpoint that restores (data_iterator is set to its state in place);
    None if there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # Orbax raises several types for missing or corrupt files.
        log.error('checkpoint at step %d could not be restored (%s: %s); trying the previous one', step,
                  type(e).__name__, str(e)[:300])
        continue
      return step, restored.state
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
