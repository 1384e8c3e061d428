"""Saving and loading any of our models as an Orbax checkpoint with its configs alongside.

  rrt_jax.save('/tmp/ckpt', cfg, rec, variables)
  model, variables = rrt_jax.load('/tmp/ckpt')      # model is a Decoder carrying cfg and rec

Layout: <path>/model_config.json (ModelConfig + RecursionConfig, and the tokenizer when one was given: read it with
`read_tokenizer`), <path>/variables (Orbax PyTree) and, for a tokenizer that is not packaged, <path>/tokenizer.json.
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
from rrt_jax.data.tokenizer import Tokenizer, tokenizer_from_record, tokenizer_record
from rrt_jax.model import Decoder, check_variables, variable_shapes
from rrt_jax.utils.uri import as_path

CONFIG_FILE = 'model_config.json'
VARIABLES_DIR = 'variables'
_SECTIONS = ('model', 'recursion', 'tokenizer')  # model_config.json's entries; tokenizer is optional.


def _json_fields(config) -> dict:
  """A config dataclass's fields as JSON values: enums as their strings, tuples as lists."""
  return {k: v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, tuple) else v
          for k, v in dataclasses.asdict(config).items()}


def configs_to_json(cfg: ModelConfig, rec: RecursionConfig, tokenizer: dict | None = None) -> dict:
  """model_config.json's content; `tokenizer` is a `tokenizer_record` entry (absent in older checkpoints)."""
  data = {'model': _json_fields(cfg), 'recursion': _json_fields(rec)}
  if tokenizer is not None:
    data['tokenizer'] = tokenizer
  return data


def _section(data: dict, name: str, cls: type, where: str):
  section = data.get(name)
  if not isinstance(section, dict):
    raise ValueError(f'{where}: the {name!r} section is {"missing" if section is None else "not a JSON object"}.')
  fields = dataclasses.fields(cls)
  if unknown := sorted(set(section) - {f.name for f in fields}):
    raise ValueError(f'{where}: unknown field(s) {", ".join(unknown)} in {name}: written by a newer rrt_jax?')
  required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing := [k for k in required if k not in section]:
    raise ValueError(f'{where}: field(s) {", ".join(missing)} missing in {name}.')
  try:
    return cls(**section)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{where}: bad {name} section: {e}') from None


def configs_from_json(data: dict, where: str = CONFIG_FILE) -> tuple[ModelConfig, RecursionConfig]:
  """(ModelConfig, RecursionConfig) from model_config.json's content; one ValueError naming `where` and what is
  wrong otherwise (a missing section, an unknown field, a bad value)."""
  if not isinstance(data, dict):
    raise ValueError(f'{where}: expected a JSON object with model and recursion sections, got {type(data).__name__}.')
  if unknown := sorted(set(data) - set(_SECTIONS)):
    raise ValueError(f'{where}: unknown section(s) {", ".join(unknown)}: written by a newer rrt_jax?')
  return _section(data, 'model', ModelConfig, where), _section(data, 'recursion', RecursionConfig, where)


def write_configs(directory: str | os.PathLike, cfg: ModelConfig, rec: RecursionConfig,
                  tokenizer: Tokenizer | str | None = None) -> None:
  """model_config.json in `directory` (local or a URI), written in one piece. `tokenizer` (a tokenizer or a
  data.tokenizer spec) is recorded there; one that is not packaged (an HF checkpoint's) is copied to
  <directory>/tokenizer.json first, so the directory is self-contained."""
  record = None if tokenizer is None else tokenizer_record(tokenizer, directory)
  (as_path(directory) / CONFIG_FILE).write_text(json.dumps(configs_to_json(cfg, rec, record), indent=2))


def _read_json(directory: str | os.PathLike, missing: str) -> tuple[dict, str]:
  config_path = as_path(directory) / CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f'{config_path} is missing: {directory} {missing}.')
  try:
    return json.loads(config_path.read_text()), str(config_path)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{config_path} is not valid JSON ({e}): a garbled or partly written file.') from None


def read_configs(directory: str | os.PathLike, missing: str) -> tuple[ModelConfig, RecursionConfig]:
  """The configs stored beside a checkpoint; `missing` completes the error message when there are none."""
  data, where = _read_json(directory, missing)
  return configs_from_json(data, where)


def read_tokenizer(directory: str | os.PathLike, required: bool = False) -> Tokenizer | None:
  """The tokenizer recorded in `directory`'s model_config.json (a checkpoint or a training workdir). Checkpoints
  written before tokenizers were recorded have none: None, or with `required` an error naming the fix."""
  data, where = _read_json(directory, 'holds no rrt_jax checkpoint')
  if not isinstance(data, dict) or data.get('tokenizer') is None:
    if required:
      raise ValueError(f'{where} records no tokenizer (written by an older rrt_jax): name it yourself, e.g. '
                       "make_tokenizer('smollm2'), 'bytes' or 'hf:/dir/with/tokenizer.json'.")
    return None
  return tokenizer_from_record(data['tokenizer'], directory)


def save(path: str, cfg: ModelConfig, rec: RecursionConfig, variables: dict,
         tokenizer: Tokenizer | str | None = None) -> str:
  """Writes the variables (Orbax) and configs (JSON; with `tokenizer` recorded, see write_configs) under `path`;
  returns the absolute path (a URI as given)."""
  directory = as_path(path)
  check_variables(variables, cfg, rec, 'variables to save')
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / VARIABLES_DIR, variables, force=True)
    ckptr.wait_until_finished()
  write_configs(directory, cfg, rec, tokenizer)  # Written last: its presence marks a complete save.
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

