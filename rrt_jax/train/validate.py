"""The whole experiment config checked before anything is loaded or written: enums, ranges, divisibility, paths.

`check_config(c)` needs no accelerator (the CLI runs it while parsing flags, so --only_check_args fails on a bad
config); `check_mesh(c, num_devices)` adds what depends on the device count, once jax.distributed is up. Both
raise one ConfigError listing every problem, each naming the field and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import ml_collections

from rrt_jax import presets
from rrt_jax.config import AttentionImpl, ModelConfig, RecursionConfig, RematPolicy
from rrt_jax.train.optimizer import SCHEDULES

SOURCES = ('smollm2', 'hf', 'random')
DTYPES = ('float32', 'bfloat16', 'float16')
TOKENIZERS = ('auto', 'smollm2', 'bytes')  # 'auto': the model's own (rrt_jax.pretrained.tokenizer).
SMOLLM2_PRESET = 'smollm2_135m'  # The packaged GGUF's architecture (its weights are read only when training).


class ConfigError(ValueError):
  """Every problem of a config, one per line."""

  def __init__(self, problems: list[str]):
    self.problems = problems
    super().__init__('bad config:\n' + '\n'.join(f'  - {p}' for p in problems))


def _model_config(c: ml_collections.ConfigDict) -> ModelConfig | None:
  """The architecture without loading weights: the preset, or an HF checkpoint's config.json."""
  m = c.model
  if m.source == 'random':
    return presets.get(m.preset)
  if m.source == 'smollm2':
    return presets.get(SMOLLM2_PRESET)
  from rrt_jax.pretrained.hf import config_from_hf
  from rrt_jax.utils.uri import as_path
  path = as_path(m.path or '.') / 'config.json'
  if not m.path or not path.exists():
    return None  # model.source's own check names what is missing; the checks that need the shapes skip.
  return config_from_hf(json.loads(path.read_text()))


def _model_checks(c: ml_collections.ConfigDict) -> list[Callable[[], None]]:
  m = c.model

  def source():
    if m.source not in SOURCES:
      raise ValueError(f'model.source={m.source!r}: choose one of {SOURCES}.')
    if m.source == 'hf':
      from rrt_jax.utils.uri import as_path
      if not m.path:
        raise ValueError('model.source=hf needs --config.model.path=/path/to/hf_checkpoint_dir.')
      if not (as_path(m.path) / 'config.json').exists():
        raise ValueError(f'model.path={m.path!r} has no config.json: point it at an HF checkpoint directory.')

  def dtype():
    if m.dtype not in DTYPES:
      raise ValueError(f'model.dtype={m.dtype!r}: choose one of {DTYPES}.')
    if m.remat not in set(RematPolicy):
      raise ValueError(f'model.remat={m.remat!r}: choose one of {[p.value for p in RematPolicy]}.')
    if m.get('attention', 'auto') not in set(AttentionImpl):
      raise ValueError(f'model.attention={m.attention!r}: choose one of {[a.value for a in AttentionImpl]}.')

  def recursion():
    try:
      rec = RecursionConfig(**c.recursion, seed=c.train.seed)
    except (ValueError, TypeError) as e:
      raise ValueError(f'recursion: {e}') from None
    if m.source not in SOURCES or (m.source == 'hf' and not m.path):
      return  # (Reported by `source`.)
    cfg = _model_config(c)
    if cfg is None:
      return  # (No checkpoint config to check against: reported by `source`.)
    try:
      rec.shared_layers(cfg.num_layers)
    except ValueError as e:
      raise ValueError(f'recursion: {e}') from None
    if c.train.freeze_shared and not rec.has_lora:
      raise ValueError('train.freeze_shared=True trains only LoRA: set recursion.lora_rank (or variant rN, N > 0).')

  return [source, dtype, recursion]


def _positive(c: ml_collections.ConfigDict, *names: str, minimum: float = 1) -> Callable[[], None]:
  def check():
    bad = [f'{n}={_get(c, n)!r}' for n in names if not (isinstance(_get(c, n), int | float) and
                                                          _get(c, n) >= minimum)]
    if bad:
      raise ValueError(f'{", ".join(bad)}: must be a number >= {minimum}.')
  return check


def _get(c: ml_collections.ConfigDict, dotted: str):
  node = c
  for part in dotted.split('.'):
    node = node[part]
  return node


def _section_checks(c: ml_collections.ConfigDict) -> list[Callable[[], None]]:
  t = c.train

  def loss():
    from rrt_jax.train.step import LossConfig
    LossConfig(**c.loss)

  def conversion():
    from rrt_jax.convert.calibration import CalibrationConfig
    from rrt_jax.train.healing import HealingConfig
    CalibrationConfig(**c.calibration)
    HealingConfig(**c.healing)

  def schedule():
    if t.decay not in SCHEDULES:
      raise ValueError(f'train.decay={t.decay!r}: choose one of {SCHEDULES}.')
    if not t.lr > 0 or t.warmup_steps < 0 or t.end_lr_ratio < 0:
      raise ValueError(f'train.lr={t.lr} must be > 0, train.warmup_steps={t.warmup_steps} and train.end_lr_ratio='
                       f'{t.end_lr_ratio} >= 0.')
    if not (0 <= t.b1 < 1 and 0 <= t.b2 < 1) or t.clip_norm < 0 or t.weight_decay < 0:
      raise ValueError(f'train.b1={t.b1} and train.b2={t.b2} must be in [0, 1), train.clip_norm={t.clip_norm} and '
                       f'train.weight_decay={t.weight_decay} >= 0.')

  def batch():
    d = c.data
    if d.global_batch % t.grad_accum:
      raise ValueError(f'data.global_batch={d.global_batch} is not a multiple of train.grad_accum={t.grad_accum}.')
    if d.shards is not None and (d.shards < 1 or d.global_batch % d.shards):
      raise ValueError(f'data.shards={d.shards} must be >= 1 and divide data.global_batch={d.global_batch}.')

  def distributed():
    dist = c.distributed
    if dist.coordinator and dist.coordinator != 'auto' and not 0 <= dist.process_id < dist.num_processes:
      raise ValueError(f'distributed.process_id={dist.process_id} must be in [0, distributed.num_processes='
                       f'{dist.num_processes}).')

  return [_positive(c, 'train.steps', 'train.grad_accum', 'data.global_batch', 'log_every', 'checkpoint.keep'),
          _positive(c, 'data.seq_len', minimum=2), _positive(c, 'checkpoint.every_steps', minimum=0),
          loss, conversion, schedule, batch, lambda: _check_tokenizer(c.data.tokenizer, c.model.source), distributed,
          lambda: _check_data_source(c), *_while_training_checks(c)]


def _count(value, minimum: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _while_training_checks(c: ml_collections.ConfigDict) -> list[Callable[[], None]]:
  """eval_every + eval, profile, wandb (each section optional: configs written before they existed)."""

  def eval_every():
    every = c.get('eval_every', 0)
    if not _count(every, 0):
      raise ValueError(f'eval_every={every!r}: a number of steps >= 0 (0 = no held-out evaluation).')

  def evaluation():
    every, ev = c.get('eval_every', 0), c.get('eval')
    if ev is None:
      if every:
        raise ValueError(f'eval_every={every} needs the eval section (eval.split, eval.tokens, eval.batch) of '
                         'rrt_jax/configs/base.py.')
      return
    from rrt_jax.data.prepare import SPLITS
    if ev.split not in SPLITS:
      raise ValueError(f'eval.split={ev.split!r}: choose one of the packaged corpora\'s splits {SPLITS}.')
    bad = [] if _count(ev.tokens, 1) else [f'eval.tokens={ev.tokens!r} must be a number of tokens >= 1']
    bad += [] if _count(ev.batch, 0) else [f'eval.batch={ev.batch!r} must be a number of windows >= 0 (0 = the '
                                           'training micro-batch)']
    if bad:
      raise ValueError('; '.join(bad) + '.')

  def profile():
    p = c.get('profile')
    if p is None:
      return
    bad = [] if p.start_step == -1 or _count(p.start_step, 1) else [
        f'profile.start_step={p.start_step!r} must be -1 (off) or the first step to trace (>= 1)']
    bad += [] if _count(p.steps, 1) else [f'profile.steps={p.steps!r} must be a number of steps >= 1']
    if bad:
      raise ValueError('; '.join(bad) + '.')

  def wandb():
    w = c.get('wandb')
    if w is None or not w.project:
      return
    import importlib.util
    import sys
    if 'wandb' not in sys.modules and importlib.util.find_spec('wandb') is None:
      raise ValueError(f'wandb.project={w.project!r} logs to Weights & Biases, but wandb is not installed: pip '
                       "install wandb (or --config.wandb.project='' to turn it off).")

  return [eval_every, evaluation, profile, wandb]


def _check_data_source(c: ml_collections.ConfigDict) -> None:
  """data.source's syntax, its files or TFDS dataset, and a first document's text field (rrt_jax.data.sources)."""
  from rrt_jax.data.sources import check_spec
  check_spec(c.data.get('source', ''), c.data.split, c.data.get('text_field', 'text'))


def _check_tokenizer(spec: str, source: str) -> None:
  if spec in TOKENIZERS or spec.startswith(('hf:', 'synthetic:')):
    if spec == 'auto' and source == 'random':
      raise ValueError("data.tokenizer='auto' follows the model, but a random model has none: name one "
                       "(data.tokenizer='bytes' or 'smollm2').")
    return
  raise ValueError(f'data.tokenizer={spec!r}: choose one of {TOKENIZERS}, hf:<checkpoint dir> or synthetic:<vocab>.')


def check_config(c: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> None:
  """Raises ConfigError with every problem of `c` (and of `workdir` if given); touches no accelerator."""
  checks = [*_model_checks(c), *_section_checks(c)]
  if workdir is not None:
    checks.append(lambda: _check_workdir(workdir))
  problems = []
  for check in checks:
    try:
      check()
    except (ValueError, TypeError, KeyError) as e:
      problems.append(str(e).strip().strip("'\""))
  if problems:
    raise ConfigError(problems)


def _check_workdir(workdir: str | os.PathLike) -> None:
  if not os.fspath(workdir).strip():
    raise ValueError('--workdir is empty: name a directory (local or gs://...) for checkpoints and metrics.')
  from rrt_jax.utils.uri import as_path
  if as_path(workdir).exists() and not as_path(workdir).is_dir():
    raise ValueError(f'--workdir={os.fspath(workdir)} is a file, not a directory.')


def check_mesh(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """The mesh fits the devices and the batch splits over its batch axes (dcn x data x fsdp)."""
  from rrt_jax.sharding import mesh_shape
  dcn = c.mesh.get('dcn', 1)
  if not isinstance(dcn, int) or dcn < 1 or num_devices % dcn:
    raise ConfigError([f'mesh.dcn={dcn} must be a positive number of slices that divides the {num_devices} '
                       'devices.'])
  try:
    data, fsdp, _ = mesh_shape((c.mesh.data, c.mesh.fsdp, c.mesh.tensor), num_devices // dcn)
  except ValueError as e:
    raise ConfigError([f'mesh: {e}']) from None
  ways = dcn * data * fsdp
  if c.data.global_batch % ways:
    raise ConfigError([f'data.global_batch={c.data.global_batch} does not split over the {ways} batch '
                       f'devices (mesh dcn={dcn} x data={data} x fsdp={fsdp}): make it a multiple of {ways}, or '
                       'move devices to mesh.tensor.'])
