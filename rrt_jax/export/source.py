"""What an export reads: a training workdir, an `rrt_jax.save` checkpoint, or (cfg, rec, variables) directly,
with the tokenizer recorded beside the model; and what it reports back."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from rrt_jax import checkpoint
from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.pretrained.tokenizer import BPETokenizer, spec_of

# A training workdir or checkpoint directory (local or a URI), or (cfg, rec, variables).
Source = str | os.PathLike | tuple


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  cfg: ModelConfig
  rec: RecursionConfig
  variables: dict
  tokenizer: Any | None  # An rrt_jax.pretrained.tokenizer tokenizer, or None when none is known.
  origin: str  # Where it came from, for messages.
  notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """The written path, the files under it, and what could not be exported (the tokenizer of a bytes model...)."""

  path: str
  files: tuple[str, ...]
  notes: tuple[str, ...]


def load_source(source: Source, step: int | None = None, tokenizer: Any | None = None) -> LoadedModel:
  """The model to export. A directory with checkpoints/ is a training workdir (its latest checkpoint, or `step`);
  any other directory is read with rrt_jax.load. `tokenizer` overrides the recorded one (and is the only one for
  a (cfg, rec, variables) tuple)."""
  if isinstance(source, tuple):
    if len(source) != 3:
      raise ValueError(f'A model given directly is (cfg, rec, variables), got a tuple of {len(source)}.')
    if step is not None:
      raise ValueError('step picks a checkpoint of a training workdir; the model was given directly.')
    cfg, rec, variables = source
    return LoadedModel(cfg, rec, variables, tokenizer, 'the given variables')
  path = os.fspath(source)
  restored = checkpoint.read(path, step)
  model, variables, origin = restored.model, restored.variables, restored.origin
  notes = ()
  if tokenizer is None:
    try:
      tokenizer = checkpoint.read_tokenizer(path)
    except (OSError, ValueError, ImportError) as e:  # The weights still export; say why the tokenizer did not.
      notes = (f'the tokenizer recorded in {path} could not be loaded ({e}): no tokenizer written',)
  return LoadedModel(model.cfg, model.rec, variables, tokenizer, origin, notes)


def tokenizers_object(tokenizer: Any | None) -> tuple[Any | None, str | None]:
  """(the `tokenizers.Tokenizer` behind `tokenizer`, None) when it has a tokenizer.json form, else (None, a note
  saying why no tokenizer is written)."""
  if tokenizer is None:
    return None, 'no tokenizer is recorded with the model: no tokenizer written'
  if isinstance(tokenizer, ByteTokenizer):
    return None, ('the bytes tokenizer (id = UTF-8 byte + 3; 0 pad, 2 end of sequence) has no tokenizer.json form: '
                  'no tokenizer written; encode text as its bytes + 3')
  inner = tokenizer.tokenizer if isinstance(tokenizer, BPETokenizer) else None
  if inner is None or not hasattr(inner, 'to_str'):
    return None, f'the {spec_of(tokenizer)} tokenizer has no tokenizer.json form: no tokenizer written'
  return inner, None


def eos_id(tokenizer: Any | None) -> int | None:
  """The end-of-sequence id of a known tokenizer (generation stops there), else None."""
  eos = getattr(tokenizer, 'eos_id', None)
  return None if eos is None else int(eos)


def unrolled_note(model: LoadedModel) -> list[str]:
  """What an export of a recursive model leaves behind, for its report (nothing for a vanilla model)."""
  if not model.rec.has_lora and model.rec.loops == 1:
    return []
  return [f'unrolled the {model.rec.loops} loops of {model.origin} into {model.cfg.num_layers} plain layers: the '
          'final exit only (no early exit), each depth with its own merged weights (no sharing)']
