"""Saving and loading any of our models as an Orbax checkpoint with its configs alongside.

  rrt_jax.save('/tmp/ckpt', cfg, rec, variables)
  model, variables = rrt_jax.load('/tmp/ckpt')      # model is a Decoder carrying cfg and rec

Layout: <path>/model_config.json (ModelConfig + RecursionConfig) and <path>/variables (Orbax PyTree).
Paths are local or URIs that etils.epath and Orbax handle (gs://bucket/dir, s3://...). Training workdirs are read by
rrt_jax.train.checkpointing.load_training_checkpoint.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os

import jax
import orbax.checkpoint as ocp

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import Decoder, check_variables, variable_shapes
from rrt_jax.utils.uri import as_path

CONFIG_FILE = 'model_config.json'
VARIABLES_DIR = 'variables'


def _json_fields(config) -> dict:
  """A config dataclass's fields as JSON values: enums as their strings, tuples as lists."""
  return {k: v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, tuple) else v
          for k, v in dataclasses.asdict(config).items()}


def configs_to_json(cfg: ModelConfig, rec: RecursionConfig) -> dict:
  return {'model': _json_fields(cfg), 'recursion': _json_fields(rec)}


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

