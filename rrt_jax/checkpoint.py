"""Saving any of our models as an Orbax checkpoint with its configs alongside, and reading back any model: a saved
one or a training workdir's. The one reader that eval, export, the CLIs and the notebook use.

  rrt_jax.save('/tmp/ckpt', cfg, rec, variables)
  model, variables = rrt_jax.load('/tmp/ckpt')      # model is a Decoder carrying cfg and rec
  model, variables = rrt_jax.load('workdir/run')    # a training workdir: its latest readable step (or step=N)
  loaded = load_pretrained('workdir/run')           # + the recorded tokenizer; or source='smollm2'

Layout of a save: <path>/model_config.json (ModelConfig + RecursionConfig, and the tokenizer when one was given:
read it with `read_tokenizer`), <path>/variables (Orbax PyTree) and, for a tokenizer that is not packaged,
<path>/tokenizer.json. A training workdir: <workdir>/model_config.json and <workdir>/checkpoints/<step>/state (the
TrainState, written by rrt_jax.train.checkpointing; only its variables are read here). Paths are local or URIs
that etils.epath and Orbax handle (gs://bucket/dir, s3://...).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import Decoder, check_variables, variable_shapes
from rrt_jax.pretrained.tokenizer import (
  Tokenizer,
  check_vocab,
  make_tokenizer,
  tokenizer_from_record,
  tokenizer_record,
)
from rrt_jax.utils.uri import as_path

log = logging.getLogger(__name__)

CONFIG_FILE = 'model_config.json'
VARIABLES_DIR = 'variables'
CHECKPOINTS_DIR = 'checkpoints'  # Of a training workdir: <workdir>/checkpoints/<step>/{state, data, checksums}.
STATE = 'state'
CHECKSUMS = 'checksums'  # Per-array checksums of the state, written with it (absent in older checkpoints).
CHECKSUMS_FILE = 'metadata'  # The JSON file Orbax's JsonSave writes in the item's directory.
SOURCES = ('smollm2',)  # Packaged models load_pretrained reads by name.
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


def read_tokenizer_record(directory: str | os.PathLike) -> dict | None:
  """The `tokenizer` entry of `directory`'s model_config.json, or None (none recorded, or no file)."""
  if not (as_path(directory) / CONFIG_FILE).exists():
    return None
  data, _ = _read_json(directory, 'holds no rrt_jax checkpoint')
  record = data.get('tokenizer') if isinstance(data, dict) else None
  return record if isinstance(record, dict) else None


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


def _restore_saved(path: epath.Path, shardings=None) -> tuple[Decoder, dict]:
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


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written or read, with the directory and the fix in the message."""


def checkpoints_dir(workdir: str | os.PathLike) -> epath.Path:
  return as_path(workdir) / CHECKPOINTS_DIR  # Absolute if local; a URI stays a URI.


def is_training_workdir(path: str | os.PathLike) -> bool:
  return checkpoints_dir(path).is_dir()


def restorable_steps(ckpt_dir: epath.Path) -> list[int]:
  """Orbax's finalized steps: on GCS an unfinished step directory has its final name, only without its commit
  file."""
  return sorted(ocp.utils.checkpoint_steps(ckpt_dir))


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """A uint32 checksum of an array's bits: each element's bits (as uint32) times an odd multiplier of its index,
  summed mod 2**32, so a flipped bit or two swapped elements change it."""
  bits = x.reshape(-1)
  if jnp.issubdtype(bits.dtype, jnp.floating) or jnp.issubdtype(bits.dtype, jnp.integer):
    width = bits.dtype.itemsize * 8
    if jnp.issubdtype(bits.dtype, jnp.floating):
      bits = jax.lax.bitcast_convert_type(bits, jnp.dtype(f'uint{width}'))
    if width == 64:
      bits = (bits ^ (bits >> 32)).astype(jnp.uint32)
    bits = bits.astype(jnp.uint32)
  else:  # bool and the like.
    bits = bits.astype(jnp.uint32)
  weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


def _flat(tree) -> dict[str, jax.Array]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): leaf for path, leaf in leaves if hasattr(leaf, 'dtype')
          and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)}


@jax.jit
def _checksums_and_finite(arrays: dict) -> tuple[dict, dict]:
  sums = {k: _leaf_checksum(v) for k, v in arrays.items()}
  finite = {k: jnp.all(jnp.isfinite(v)) for k, v in arrays.items() if jnp.issubdtype(v.dtype, jnp.inexact)}
  return sums, finite


def array_checksums(tree) -> dict[str, str]:
  """{leaf path: 8-hex-digit checksum} of every array leaf of `tree` (keys as jax.tree_util.keystr)."""
  sums, _ = _checksums_and_finite(_flat(tree))
  return {k: f'{int(v):08x}' for k, v in sums.items()}


def damage(tree, stored: dict[str, str] | None, prefix: str = '') -> str | None:
  """Why the restored `tree` is not what was saved, or None: a non-finite value (saves never hold one: the NaN
  guard stops first) or a checksum other than the one stored at save time (`stored`, keyed by leaf path; with
  `prefix`, `tree` is the state's entry of that name; None for checkpoints written before checksums, which are
  checked for finiteness only)."""
  sums, finite = _checksums_and_finite(_flat(tree))
  bad = sorted(k for k, ok in finite.items() if not bool(ok))
  if bad:
    more = ', ...' if len(bad) > 3 else ''
    return f'{len(bad)} of {len(sums)} arrays hold non-finite values ({", ".join(bad[:3])}{more})'
  if stored is None:
    return None
  if prefix:  # The saved state's entries under `prefix` (an attribute of a dataclass state, or a dict key).
    stored = {k[len(p):]: v for k, v in stored.items() for p in (f'.{prefix}', f"['{prefix}']") if k.startswith(p)}
  changed = sorted(k for k, v in sums.items() if k in stored and stored[k] != f'{int(v):08x}')
  missing = [k for k in sums if k not in stored]
  if changed:
    return f'{len(changed)} arrays differ from their saved checksums ({", ".join(changed[:3])})'
  if missing:
    return f'{len(missing)} arrays have no saved checksum ({", ".join(missing[:3])})'
  return None


def check_intact(tree, step_dir: epath.Path, prefix: str = '') -> None:
  """Raises CheckpointError when `tree`, restored from the training step in `step_dir`, is damaged (see damage)."""
  why = damage(tree, read_checksums(step_dir), prefix)
  if why is not None:
    raise CheckpointError(f'the restored arrays are damaged: {why}')


def read_checksums(step_dir: epath.Path) -> dict[str, str] | None:
  """The checksums saved with a training step, or None for a checkpoint written before them."""
  path = step_dir / CHECKSUMS / CHECKSUMS_FILE
  if not path.exists():
    return None
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError, UnicodeDecodeError):
    return {}  # Unreadable checksums: every array then counts as missing one (damage).
  return data if isinstance(data, dict) else {}


def restore_state_variables(state_dir: epath.Path, target: dict) -> dict:
  """The 'variables' of a saved TrainState, restored onto `target`'s shardings (a partial restore: the optimizer
  state and step stay on disk)."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={'variables': target}, restore_args={'variables': restore_args}, partial_restore=True))
  return restored['variables']


def load_training_checkpoint(workdir: str | os.PathLike, step: int | None = None,
                             shardings: dict | None = None) -> tuple[Decoder, dict, int]:
  """(Decoder(cfg, rec), variables, step) from a training workdir (the latest readable checkpoint by default).

  Only the variables are read (not the optimizer state), onto this process's first device or onto `shardings`
  (a pytree of jax.sharding.Sharding matching the variables, e.g. rrt_jax.sharding.variable_shardings): a
  checkpoint written on any topology (a pod slice, 8 GPUs) loads in a 1-device notebook."""
  cfg, rec = read_configs(workdir, 'holds no training run')
  ckpt_dir = checkpoints_dir(workdir)
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f'{workdir} holds no training run (no {CHECKPOINTS_DIR}/).')
  steps = restorable_steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(f'No finished checkpoint in {ckpt_dir}.')
  if step is not None and step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {ckpt_dir}; there are {steps}.')
  shapes = variable_shapes(cfg, rec)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  candidates = [step] if step is not None else steps[::-1]
  errors = []
  for candidate in candidates:
    step_dir = ckpt_dir / str(candidate)
    try:
      variables = restore_state_variables(step_dir / STATE, target)
      check_intact(variables, step_dir, prefix='variables')
    except Exception as e:  # noqa: BLE001  (Orbax/TensorStore raise many types for damaged files)
      errors.append(f'step {candidate}: {type(e).__name__}: {" ".join(str(e).split())[:300]}')
      log.error('checkpoint %s/%d could not be read (%s); trying the previous one', ckpt_dir, candidate, errors[-1])
      continue
    check_variables(variables, cfg, rec, f'checkpoint {ckpt_dir}/{candidate}')
    if candidate != candidates[0]:
      log.warning('loaded step %d of %s: the newer steps could not be read (%s)', candidate, ckpt_dir,
                  '; '.join(errors))
    return Decoder(cfg, rec), variables, candidate
  which = f'the checkpoint of step {step}' if step is not None else f'no checkpoint in {ckpt_dir}'
  raise CheckpointError(f'{which} can be read ({"; ".join(errors)}): the files are damaged or were written for '
                        f'another config than {CONFIG_FILE} describes.' + (
                            f' Other steps there: {[s for s in steps if s != step]}.' if step is not None else ''))


@dataclasses.dataclass(frozen=True)
class Restored:
  """A model read back: a training workdir's step (`step` set) or an rrt_jax.save directory (`step` None)."""

  model: Decoder
  variables: dict
  step: int | None
  origin: str  # Where it came from, for messages and reports.


def read(path: str | os.PathLike, step: int | None = None, shardings=None) -> Restored:
  """Any of our models from a directory: a training workdir (it has checkpoints/: its latest readable step, or
  `step`) or an rrt_jax.save directory (no step). shardings: a pytree of jax.sharding.Sharding matching the
  variables, to restore onto a mesh."""
  if is_training_workdir(path):
    model, variables, got = load_training_checkpoint(path, step, shardings)
    return Restored(model, variables, got, f'training workdir {path} at step {got}')
  if step is not None:
    raise ValueError(f'{path} is not a training workdir (it has no {CHECKPOINTS_DIR}/), so it has no step {step}: '
                     'drop the step to read it as an rrt_jax.save directory, which holds one model.')
  model, variables = _restore_saved(as_path(path), shardings)
  return Restored(model, variables, None, f'checkpoint {path}')


def load(path: str | os.PathLike, step: int | None = None, shardings=None) -> tuple[Decoder, dict]:
  """(Decoder(cfg, rec), variables) from a checkpoint written by `save` or from a training workdir (see `read`)."""
  restored = read(path, step, shardings)
  return restored.model, restored.variables


@dataclasses.dataclass(frozen=True)
class Loaded:
  model: Decoder
  variables: dict
  tokenizer: object
  description: dict  # What was loaded (path or source, step), for reports.


def load_pretrained(pretrained: str | None = None, source: str | None = None, step: int | None = None,
                    tokenizer: str | None = None) -> Loaded:
  """A model with its tokenizer: a training workdir (its latest readable checkpoint, or `step`) or an rrt_jax.save
  directory with the tokenizer recorded beside it (or the `tokenizer` spec), or with source='smollm2' the
  packaged SmolLM2-135M. The vocabularies of model and tokenizer must agree."""
  if (pretrained is None) == (source is None):
    raise ValueError(f'Give pretrained=<training workdir or checkpoint directory> or source= one of {SOURCES}, '
                     f'not {"both" if pretrained is not None else "neither"}.')
  if source is not None:
    if source not in SOURCES:
      raise ValueError(f'Unknown source {source!r}: choose one of {SOURCES}, or give pretrained=<directory>.')
    if step is not None:
      raise ValueError('step= picks a checkpoint of a training workdir: give pretrained=<workdir>.')
    from rrt_jax.pretrained.gguf import load_gguf
    cfg, variables = load_gguf()
    model, tok = Decoder(cfg), make_tokenizer(tokenizer or 'smollm2')
    description = {'source': source}
  else:
    pretrained = str(pretrained)
    restored = read(pretrained, step)
    model, variables = restored.model, restored.variables
    tok = make_tokenizer(tokenizer) if tokenizer else read_tokenizer(pretrained, required=True)
    description = {'pretrained': pretrained, **({'step': restored.step} if restored.step is not None else {})}
  check_vocab(tok, model.cfg.vocab_size, f'{description}')
  return Loaded(model, variables, tok, description)
