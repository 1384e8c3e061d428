"""Saving and loading any of our models as an Orbax checkpoint with its configs alongside.

  rrt_jax.save('/tmp/ckpt', cfg, rec, variables)
  model, variables = rrt_jax.load('/tmp/ckpt')      # model is a Decoder carrying cfg and rec

Layout: <path>/model_config.json (ModelConfig + RecursionConfig) and <path>/variables (Orbax PyTree).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import Decoder, check_variables, variable_shapes

CONFIG_FILE = 'model_config.json'
VARIABLES_DIR = 'variables'


def configs_to_json(cfg: ModelConfig, rec: RecursionConfig) -> dict:
  rec_dict = dataclasses.asdict(rec)
  for key in ('looping', 'init', 'norm_init', 'lora_init'):
    rec_dict[key] = getattr(rec, key).value
  rec_dict['lora_targets'] = list(rec.lora_targets)
  return {'model': dataclasses.asdict(cfg), 'recursion': rec_dict}


def configs_from_json(data: dict) -> tuple[ModelConfig, RecursionConfig]:
  return ModelConfig(**data['model']), RecursionConfig(**data['recursion'])


def read_configs(directory: str, missing: str) -> tuple[ModelConfig, RecursionConfig]:
  """The configs stored beside a checkpoint; `missing` completes the error message when there are none."""
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} is missing: {directory} {missing}.')
  with open(config_path) as f:
    return configs_from_json(json.load(f))


def save(path: str, cfg: ModelConfig, rec: RecursionConfig, variables: dict) -> str:
  """Writes the variables (Orbax) and configs (JSON) under `path`; returns the absolute path."""
  path = os.path.abspath(path)
  check_variables(variables, cfg, rec, 'variables to save')
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, VARIABLES_DIR), variables, force=True)
    ckptr.wait_until_finished()
  with open(os.path.join(path, CONFIG_FILE), 'w') as f:  # Written last: its presence marks a complete save.
    json.dump(configs_to_json(cfg, rec), f, indent=2)
  return path


def load(path: str, shardings=None) -> tuple[Decoder, dict]:
  """(Decoder(cfg, rec), variables) from a checkpoint written by `save` (or by training).

  shardings: optional pytree of jax.sharding.Sharding matching the variables, to restore onto a mesh.
  """
  path = os.path.abspath(path)
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
      variables = ckptr.restore(os.path.join(path, VARIABLES_DIR), shapes)
  except Exception as e:  # Orbax raises several types for missing/corrupt/mismatched data.
    raise ValueError(f'Could not restore {path}/{VARIABLES_DIR} for {cfg.family} with loops={rec.loops}, '
                     f'lora_rank={rec.lora_rank}: {e}') from e
  check_variables(variables, cfg, rec, f'checkpoint {path}')
  return Decoder(cfg, rec), variables


def load_training_checkpoint(workdir: str, step: int | None = None) -> tuple[Decoder, dict, int]:
  """(Decoder(cfg, rec), variables, step) from a training workdir (the latest checkpoint by default)."""
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  cfg, rec = read_configs(workdir, 'holds no training run')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'{workdir} holds no training run (no checkpoints/).')
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  if not steps:
    raise FileNotFoundError(f'No finished checkpoint in {ckpt_dir}.')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {ckpt_dir}; there are {steps}.')
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(ckpt_dir, str(step), 'state'))
  variables = jax.tree.map(jax.numpy.asarray, state['variables'])
  check_variables(variables, cfg, rec, f'checkpoint {ckpt_dir}/{step}')
  return Decoder(cfg, rec), variables, step
