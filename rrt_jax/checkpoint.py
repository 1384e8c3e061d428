"""Saving and loading any of our models as an Orbax checkpoint with its configs alongside.

  rrt_jax.save('/tmp/ckpt', cfg, rec, variables)
  model, variables = rrt_jax.load('/tmp/ckpt')      # model is a Decoder carrying cfg and rec

Layout: <path>/model_config.json (ModelConfig + RecursionConfig) and <path>/variables (Orbax PyTree).
Paths are local or URIs that etils.epath and Orbax handle (gs://bucket/dir, s3://...).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

import jax
import orbax.checkpoint as ocp
from etils import epath

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import Decoder, check_variables, variable_shapes

CONFIG_FILE = 'model_config.json'
VARIABLES_DIR = 'variables'
_URI = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')


def is_uri(path: str | os.PathLike) -> bool:
  """Whether `path` is a URI (gs://bucket/dir, s3://...) rather than a local path."""
  return _URI.match(os.fspath(path)) is not None


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # A missing parent package.
    return False


def missing_packages(path: str | os.PathLike) -> list[str]:
  """pip packages that a gs:// path needs and that are not installed: gcsfs (etils.epath's GCS access, unless
  TensorFlow's gfile is there) and google-cloud-storage (Orbax asks it about the bucket)."""
  if not os.fspath(path).startswith('gs://'):
    return []
  needed = {'google.cloud.storage': 'google-cloud-storage'}
  if not _installed('tensorflow'):
    needed['gcsfs'] = 'gcsfs'
  return sorted(package for module, package in needed.items() if not _installed(module))


def as_path(path: str | os.PathLike) -> epath.Path:
  """An epath.Path for a local path (made absolute, as Orbax wants) or a URI (kept as it is: never resolved
  against the working directory). Fails early, naming the packages to install, for a gs:// path without them."""
  if not is_uri(path):
    return epath.Path(os.path.abspath(path))
  if missing := missing_packages(path):
    raise ImportError(f'{path}: gs:// paths need {" and ".join(missing)} (pip install {" ".join(missing)}).')
  try:
    return epath.Path(path)
  except KeyError:  # epath raises KeyError for schemes it has no backend for.
    scheme = _URI.match(os.fspath(path)).group(1)
    raise ValueError(f'{path}: etils.epath does not handle {scheme}:// paths (it does gs://, s3://, az://, hf://; '
                     'local paths need no scheme).') from None


def configs_to_json(cfg: ModelConfig, rec: RecursionConfig) -> dict:
  rec_dict = dataclasses.asdict(rec)
  for key in ('looping', 'init', 'norm_init', 'lora_init'):
    rec_dict[key] = getattr(rec, key).value
  rec_dict['lora_targets'] = list(rec.lora_targets)
  return {'model': dataclasses.asdict(cfg), 'recursion': rec_dict}


def configs_from_json(data: dict) -> tuple[ModelConfig, RecursionConfig]:
  return ModelConfig(**data['model']), RecursionConfig(**data['recursion'])


def write_configs(directory: str | os.PathLike, cfg: ModelConfig, rec: RecursionConfig) -> None:
  """model_config.json in `directory` (local or a URI), written in one piece."""
  (as_path(directory) / CONFIG_FILE).write_text(json.dumps(configs_to_json(cfg, rec), indent=2))


def read_configs(directory: str | os.PathLike, missing: str) -> tuple[ModelConfig, RecursionConfig]:
  """The configs stored beside a checkpoint; `missing` completes the error message when there are none."""
  config_path = as_path(directory) / CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f'{config_path} is missing: {directory} {missing}.')
  return configs_from_json(json.loads(config_path.read_text()))


def save(path: str, cfg: ModelConfig, rec: RecursionConfig, variables: dict) -> str:
  """Writes the variables (Orbax) and configs (JSON) under `path`; returns the absolute path (a URI as given)."""
  directory = as_path(path)
  check_variables(variables, cfg, rec, 'variables to save')
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / VARIABLES_DIR, variables, force=True)
    ckptr.wait_until_finished()
  write_configs(directory, cfg, rec)  # Written last: its presence marks a complete save.
  return str(directory)


def load(path: str, shardings=None) -> tuple[Decoder, dict]:
  """(Decoder(cfg, rec), variables) from a checkpoint written by `save` (or by training).

  shardings: optional pytree of jax.sharding.Sharding matching the variables, to restore onto a mesh.
  """
  path = as_path(path)
  cfg, rec = read_configs(path, 'is not a complete rrt_jax checkpoint (an interrupted save, or a different '
                                'directory)')
  shapes = variable_shapes(cfg, rec)
  if shardings is not None:
    shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(path / VARIABLES_DIR, shapes)
  except Exception as e:  # Orbax raises several types for missing/corrupt/mismatched data.
    raise ValueError(f'Could not restore {path}/{VARIABLES_DIR} for {cfg.family} with loops={rec.loops}, '
                     f'lora_rank={rec.lora_rank}: {e}') from e
  check_variables(variables, cfg, rec, f'checkpoint {path}')
  return Decoder(cfg, rec), variables


def load_training_checkpoint(workdir: str, step: int | None = None) -> tuple[Decoder, dict, int]:
  """(Decoder(cfg, rec), variables, step) from a training workdir (the latest checkpoint by default)."""
  workdir = as_path(workdir)
  ckpt_dir = workdir / 'checkpoints'
  cfg, rec = read_configs(workdir, 'holds no training run')
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f'{workdir} holds no training run (no checkpoints/).')
  # Orbax's finalized steps: on GCS an unfinished step directory has its final name, only without its commit file.
  steps = sorted(ocp.utils.checkpoint_steps(ckpt_dir))
  if not steps:
    raise FileNotFoundError(f'No finished checkpoint in {ckpt_dir}.')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {ckpt_dir}; there are {steps}.')
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(ckpt_dir / str(step) / 'state')
  variables = jax.tree.map(jax.numpy.asarray, state['variables'])
  check_variables(variables, cfg, rec, f'checkpoint {ckpt_dir}/{step}')
  return Decoder(cfg, rec), variables, step
