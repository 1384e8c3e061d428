"""A training workdir's checkpoints: written and resumed by TrainCheckpoints (any model reads them back with
rrt_jax.checkpoint.read / load).

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

from rrt_jax import checkpoint
from rrt_jax.checkpoint import (
    CHECKPOINTS_DIR,
    CHECKSUMS,
    STATE,
    CheckpointError,
    checkpoints_dir,
)
from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.pretrained.tokenizer import differs_from_record
from rrt_jax.utils.uri import as_path

log = logging.getLogger(__name__)

DATA = 'data'  # The grain iterator state, the other item of each step beside checkpoint.STATE.
# Config fields a resumed run may change: how it computes, not what it trains.
RESUMABLE_CHANGES = ('dtype', 'remat', 'seed')


class TrainCheckpoints:
  """Checkpoints under <workdir>/checkpoints/<step>/{state, data}; model configs in <workdir>/model_config.json.

  A step that fails to restore is moved to <workdir>/checkpoints.unreadable/<step> (kept for inspection, no longer
  "latest"), so the steps retrained after it are saved again. A failed asynchronous save is raised at the next
  step (`check_for_errors`), naming the step and the directory."""

  def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f'checkpoint.keep={keep}: keep at least 1 checkpoint (a run without one cannot resume).')
    self.workdir = as_path(workdir)
    self.directory = checkpoints_dir(workdir)
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, CHECKSUMS))
    self._saving: int | None = None  # The step of the save in flight, for error messages.

  def check_configs(self, cfg: ModelConfig, rec: RecursionConfig, tokenizer=None) -> None:
    """Refuses a workdir whose checkpoints were trained with another model or recursion config (restoring them
    would fail, or silently mix two runs when the shapes agree, e.g. cycle vs sequence), or with another
    tokenizer (one of the same vocabulary size would mix two runs' token ids silently)."""
    if not (self.workdir / checkpoint.CONFIG_FILE).exists() or self.latest_step() is None:
      return
    old = checkpoint.configs_to_json(*checkpoint.read_configs(self.workdir, 'holds no training run'))
    new = checkpoint.configs_to_json(cfg, rec)
    changed = [f'{section}.{k}: {v!r} in the workdir, {new[section].get(k)!r} now'
               for section in ('model', 'recursion') for k, v in old[section].items()
               if k not in RESUMABLE_CHANGES and new[section].get(k) != v]
    record = checkpoint.read_tokenizer_record(self.workdir)
    if tokenizer is not None and record is not None:
      if (why := differs_from_record(tokenizer, record, self.workdir)) is not None:
        changed.append(f'data.tokenizer: {why}')
    if changed:
      raise ValueError(f'{self.workdir} holds checkpoints (up to step {self.latest_step()}) of another model: '
                       + '; '.join(changed) + '. Train into a new --workdir, or rerun with the workdir\'s config.')

  def write_configs(self, workdir: str | os.PathLike, cfg: ModelConfig, rec: RecursionConfig,
                    tokenizer=None) -> None:
    """model_config.json with the tokenizer the run trains with (rrt_jax.checkpoint.write_configs)."""
    if jax.process_index() == 0:
      checkpoint.write_configs(workdir, cfg, rec, tokenizer)

  def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    if step in self.manager.all_steps():  # Already saved (e.g. the periodic save at the final step).
      return False
    self.wait()  # Orbax waits for the previous save anyway; a failure of it is reported as its own step's.
    # grain's handler writes one state file per process, so every host resumes its own shard.
    # Per-array checksums go with the state: a restore that reads other bits (a flipped bit on disk) is refused.
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 DATA: grain.checkpoint.CheckpointSave(data_iterator),
                                 CHECKSUMS: ocp.args.JsonSave(checkpoint.array_checksums(state))})
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many types)
      raise self._save_error(step, e) from e
    if saved:
      self._saving = step
      log.info('checkpoint saved at step %d', step)
    return saved

  def check_for_errors(self) -> None:
    """Raises CheckpointError if an asynchronous save failed (disk full, permissions, a lost bucket)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(self._saving, e) from e

  def _save_error(self, step: int | None, error: Exception) -> CheckpointError:
    reason = ' '.join(str(error).split())[-400:]
    good = [s for s in self.manager.all_steps() if s != step]
    resume = f'the run resumes from step {max(good)}' if good else 'no earlier checkpoint exists'
    return CheckpointError(f'saving the checkpoint of step {step} in {self.directory} failed ({type(error).__name__}: '
                           f'{reason}). Free space or fix access there and rerun the same command: {resume}.')

  def latest_step(self) -> int | None:
    """The newest saved step, or None before the first save."""
    return self.manager.latest_step()

  def restore_latest(self, abstract_state, data_iterator) -> tuple[int, object] | None:
    """(step, state) of the newest checkpoint that restores (data_iterator is set to its state in place); None if
    there is none. Unreadable newer steps are moved aside; if no step restores, CheckpointError."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state), DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))
        checkpoint.check_intact(restored[STATE], self.directory / str(step))
      except Exception as e:  # noqa: BLE001  (Orbax raises several types for missing or corrupt files)
        reason = ' '.join(str(e).split())[:300]
        log.error('checkpoint at step %d could not be restored (%s: %s); trying the previous one', step,
                  type(e).__name__, reason)
        failures.append((step, f'{type(e).__name__}: {reason}'))
        continue
      if failures:
        self._move_aside([s for s, _ in failures])
        log.warning('resuming from step %d: the newer steps %s could not be restored and were moved to %s.unreadable/',
                    step, [s for s, _ in failures], self.directory)
      return step, restored[STATE]
    if failures:
      raise CheckpointError(
          f'no checkpoint in {self.directory} restores (steps {[s for s, _ in failures]}; step {failures[0][0]}: '
          f'{failures[0][1]}). If the model or mesh config changed, train into a new --workdir; if the files are '
          'damaged, move the checkpoints/ directory away to start over.')
    return None

  def _move_aside(self, steps: list[int]) -> None:
    """Unreadable steps -> checkpoints.unreadable/<step> (process 0; every process then rereads the steps)."""
    aside = self.workdir / f'{CHECKPOINTS_DIR}.unreadable'
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / str(step)
        if target.exists():
          target.rmtree()
        (self.directory / str(step)).rename(target)
        log.warning('moved the unreadable checkpoint of step %d to %s', step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('rrt_jax: unreadable checkpoints moved aside')
    self.manager.reload()

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(self._saving, e) from e
    self.check_for_errors()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


class Preemption:
  """A stop request at a step boundary that every process agrees on: SIGTERM (a preempted VM, `kill`, a scheduler)
  or SIGINT (Ctrl-C) saves a checkpoint and stops; a second Ctrl-C interrupts at once.

  One process: our own signal handlers. Several processes (jax.distributed): a signal reaches one host only, so
  the stop goes through JAX's preemption sync point (the coordination service hears SIGTERM and names one step at
  which `reached(step)` is True on every process), the way MaxText and Orbax do; Ctrl-C is turned into SIGTERM."""

  def __init__(self):
    self.signal: int | None = None
    self._multi = jax.process_count() > 1
    self._previous = {}
    signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # The second Ctrl-C.
    name = signal.Signals(signum).name
    log.warning('%s received: saving a checkpoint and stopping (Ctrl-C again to abort without one)', name)
    self.signal = signum
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier, which tells the other processes.

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (call it at every step on every process: it is collective)."""
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal = self.signal or signal.SIGTERM
        return True
      return False
    return self.signal is not None

  @property
  def requested(self) -> bool:
    return self.signal is not None

  def restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


class Interrupted(Exception):  # noqa: N818  (a stop, not an error)
  """Training stopped by a signal after saving a checkpoint; rerunning the same command resumes."""

  def __init__(self, signum: int, step: int, directory):
    self.signum, self.step = signum, step
    super().__init__(f'stopped by {signal.Signals(signum).name} at step {step} with a checkpoint in {directory}: '
                     'rerun the same command to resume.')
