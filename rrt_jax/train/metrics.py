"""Training metrics out of the jitted step and into the workdir: metrics.jsonl and TensorBoard event files, and
optionally Weights & Biases (wandb is not a dependency: imported only when a project is given)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import jax
import numpy as np

from rrt_jax.utils.uri import as_path, is_uri

log = logging.getLogger(__name__)

WANDB_ID_FILE = 'wandb_run_id'  # In the workdir: a resumed run logs to the same W&B run.


def to_scalars(metrics: dict) -> dict[str, float]:
  """Step metrics on the host as floats; a per-loop vector [loops] becomes one scalar per loop, '<name>/loop<i>'."""
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
    else:
      out.update({f'{k}/loop{i + 1}': float(x) for i, x in enumerate(v)})
  return out


def tensorboard_unsupported(logdir: str) -> str | None:
  """Why tensorboardX cannot write event files under `logdir`, or None if it can (local paths; gs:// and s3://
  when their client libraries are installed)."""
  if not is_uri(logdir):
    return None
  from tensorboardX import record_writer
  scheme = logdir.split('://', 1)[0]
  needs = {'gs': ('GCS_ENABLED', 'google-cloud-storage'), 's3': ('S3_ENABLED', 'boto3')}
  if scheme not in needs:
    return f'tensorboardX writes no {scheme}:// paths'
  flag, package = needs[scheme]
  if not getattr(record_writer, flag, False):
    return f'tensorboardX needs {package} for {scheme}:// paths (pip install {package})'
  return None


def _row_step(line: str) -> float:
  """The step of a metrics.jsonl row; a torn last line (a killed writer) counts as discarded."""
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return float('inf')


def open_wandb_run(workdir: str, init: dict):
  """wandb.init(**init) for this workdir's W&B run: its id is kept in <workdir>/wandb_run_id, so a resumed run goes
  on logging to the same W&B run (resume='allow'); local workdirs also hold W&B's files (<workdir>/wandb/)."""
  try:
    import wandb
  except ImportError as e:
    raise ImportError(f'wandb.project={init.get("project")!r} logs to Weights & Biases, but wandb is not installed: '
                      "pip install wandb (or set wandb.project='' to turn it off).") from e
  id_path = as_path(workdir) / WANDB_ID_FILE
  if id_path.exists():
    run_id = id_path.read_text().strip()
  else:
    run_id = uuid.uuid4().hex[:16]
    if is_uri(workdir):
      id_path.write_text(run_id)  # (An object appears whole when written.)
    else:
      from rrt_jax.utils.locking import atomic_write_text
      atomic_write_text(id_path, run_id)
  kwargs = {'id': run_id, 'resume': 'allow', **init}
  if not is_uri(workdir):
    kwargs.setdefault('dir', os.fspath(as_path(workdir)))
  return wandb.init(**kwargs)


class MetricsWriter:
  """metrics.jsonl and TensorBoard event files in the workdir (process 0 only); with `wandb_init` (the keyword
  arguments of wandb.init: project, entity, name, config) the same rows are also logged to W&B at their step.

  Object stores (gs://) neither append nor show a file before it is closed, so in a remote workdir metrics.jsonl is
  rewritten whole (earlier runs' lines kept) and the events are uploaded at most every `sync_every_s` seconds and on
  close; locally both are flushed at every write.

  resume_step: the step the run starts from. Rows of later steps (trained by an earlier run after its last
  checkpoint, then discarded) are dropped from metrics.jsonl, and TensorBoard is told to purge them."""

  def __init__(self, workdir: str, sync_every_s: float = 60.0, resume_step: int | None = None,
               wandb_init: dict | None = None):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    # First: a W&B failure (no package, no login) leaves no file open.
    self._wandb = open_wandb_run(workdir, wandb_init) if wandb_init else None
    self._path = as_path(workdir) / 'metrics.jsonl'
    self._remote = is_uri(workdir)
    self._sync_every_s, self._synced_at, self._unsynced = sync_every_s, time.monotonic(), False
    text = self._path.read_text() if self._path.exists() else ''
    if resume_step is not None:
      kept = [line for line in text.splitlines(keepends=True) if _row_step(line) <= resume_step]
      if len(kept) < text.count('\n'):
        log.info('metrics.jsonl: dropped %d rows after step %d (discarded steps of an earlier run)',
                 text.count('\n') - len(kept), resume_step)
        text = ''.join(kept)
        if not self._remote:
          self._path.write_text(text)
    if self._remote:
      self._text = text
    else:
      self._jsonl = self._path.open('a')
    logdir = str(as_path(workdir) / 'tensorboard')
    reason = tensorboard_unsupported(logdir)
    if reason is None:
      from tensorboardX import SummaryWriter
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(logdir, purge_step=purge)
    else:
      self._tb = None
      log.warning('no TensorBoard events in %s: %s; metrics.jsonl has the same scalars', logdir, reason)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({'step': step, **scalars}) + '\n'
    if self._remote:
      self._text, self._unsynced = self._text + line, True
      if time.monotonic() - self._synced_at >= self._sync_every_s:
        self._sync()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      if not self._remote:  # (tensorboardX re-uploads a remote events file whole at each flush.)
        self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(dict(scalars), step=step)

  def _sync(self) -> None:
    if self._unsynced:
      self._path.write_text(self._text)
      if self._tb is not None:
        self._tb.flush()
    self._synced_at, self._unsynced = time.monotonic(), False

  def close(self) -> None:
    if not self.enabled:
      return
    if self._remote:
      self._sync()
    else:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
