"""The tokenizer choice (data.tokenizer): a spec -> a tokenizer that knows its end-of-sequence id.

Specs: 'auto' (the model's own: see `tokenizer_for_model`), 'smollm2' (the packaged GGUF's BPE), 'bytes'
(ByteTokenizer, tiny from-scratch models), 'hf:<dir>' (an HF checkpoint directory's tokenizer.json) and
'synthetic:<V>' (random ids for throughput runs of random models: rrt_jax.pretrained.synthetic_tokenizer).

Every tokenizer here has the `tokenizers.Tokenizer` methods the project uses (encode(text).ids, decode(ids),
get_vocab_size()) and `eos_id`: the token that ends each document in training data and stops generation. Read
the id from the tokenizer, never as a constant.

A checkpoint records its tokenizer in model_config.json (`tokenizer_record` / `tokenizer_from_record`, used by
rrt_jax.checkpoint), so whoever loads the model gets the tokenizer it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.utils.uri import as_path

log = logging.getLogger(__name__)

SMOLLM2_EOS = '<|im_end|>'  # SmolLM2's end of sequence (its GGUF's tokenizer.ggml.eos_token_id).
TOKENIZER_FILE = 'tokenizer.json'  # An HF checkpoint's tokenizer (the `tokenizers` library's format).
HF_PREFIX, FILE_PREFIX, SYNTHETIC_PREFIX = 'hf:', 'file:', 'synthetic:'
_NAMED = ('smollm2', 'bytes')
_CHOICES = ("choose smollm2 or bytes, 'hf:<dir>' (an HF checkpoint directory with tokenizer.json) or 'auto' "
            "(the model's own)")


@dataclasses.dataclass(frozen=True)
class BPETokenizer:
  """A `tokenizers.Tokenizer` with its end-of-sequence id. A wrapper, not an attribute set on the tokenizer: that
  would be lost when grain pickles the pipeline for its worker processes. `spec` says where it came from
  ('smollm2', 'hf:/abs/dir'; empty when built by hand)."""

  tokenizer: Any  # tokenizers.Tokenizer
  eos_id: int
  spec: str = ''

  @classmethod
  def with_eos_token(cls, tokenizer, eos_token: str, spec: str = '') -> BPETokenizer:
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
      raise ValueError(f'The tokenizer has no {eos_token!r} token to end sequences with.')
    return cls(tokenizer, eos_id, spec)

  def encode(self, text: str):
    return self.tokenizer.encode(text)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def get_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)


Tokenizer = BPETokenizer | ByteTokenizer


def spec_of(tokenizer) -> str:
  """The spec a tokenizer was made from ('bytes', 'smollm2', 'hf:/abs/dir'), or a description for messages."""
  if isinstance(tokenizer, ByteTokenizer):
    return 'bytes'
  return getattr(tokenizer, 'spec', '') or type(tokenizer).__name__


def _read_json(path) -> dict | None:
  if not path.exists():
    return None
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}).') from None
  return data if isinstance(data, dict) else None


def _from_tokenizer_json(text: str):
  from tokenizers import Tokenizer as HFTokenizer
  tokenizer = HFTokenizer.from_str(text)
  # Some checkpoints ship tokenizer.json with truncation or padding switched on: that would silently cut or pad
  # every training document.
  tokenizer.no_truncation()
  tokenizer.no_padding()
  return tokenizer


def _hf_eos_id(directory, tokenizer) -> int:
  """The checkpoint's end-of-sequence id: eos_token_id of generation_config.json or config.json (the first of a
  list: e.g. Llama 3's <|end_of_text|>), else tokenizer_config.json's eos_token."""
  directory = as_path(directory)
  for name in ('generation_config.json', 'config.json'):
    eos = (_read_json(directory / name) or {}).get('eos_token_id')
    if isinstance(eos, list):
      eos = eos[0] if eos else None
    if isinstance(eos, int):
      if not 0 <= eos < tokenizer.get_vocab_size():
        raise ValueError(f'{directory / name}: eos_token_id {eos} is outside the tokenizer\'s '
                         f'{tokenizer.get_vocab_size()} tokens.')
      return eos
  eos_token = (_read_json(directory / 'tokenizer_config.json') or {}).get('eos_token')
  if isinstance(eos_token, dict):  # An AddedToken, serialised.
    eos_token = eos_token.get('content')
  if isinstance(eos_token, str):
    eos = tokenizer.token_to_id(eos_token)
    if eos is None:
      raise ValueError(f'{directory}/tokenizer_config.json: eos_token {eos_token!r} is not in {TOKENIZER_FILE}.')
    return eos
  raise ValueError(f'{directory} names no end-of-sequence token: none of generation_config.json and config.json '
                   '(eos_token_id) nor tokenizer_config.json (eos_token) has one.')


def hf_tokenizer(directory: str | os.PathLike) -> BPETokenizer:
  """An HF checkpoint directory's own tokenizer: its tokenizer.json with its end-of-sequence id."""
  path = as_path(directory) / TOKENIZER_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'{path} is missing: the tokenizer of an HF checkpoint is its {TOKENIZER_FILE}. Copy the model\'s '
        f'{TOKENIZER_FILE} there, or name a tokenizer: --config.data.tokenizer=hf:/dir/with/{TOKENIZER_FILE}, '
        'smollm2 or bytes (only if the model was trained with it).')
  tokenizer = _from_tokenizer_json(path.read_text())
  return BPETokenizer(tokenizer, _hf_eos_id(directory, tokenizer), HF_PREFIX + str(as_path(directory)))


def make_tokenizer(name: str) -> Tokenizer:
  """'smollm2': the packaged SmolLM2 GGUF's byte-level BPE; 'bytes': ByteTokenizer (tiny from-scratch models);
  'hf:<dir>': an HF checkpoint directory's tokenizer.json. ('auto' needs the model: see tokenizer_for_model.)"""
  if name == 'smollm2':
    from rrt_jax.pretrained.gguf import load_tokenizer
    return BPETokenizer.with_eos_token(load_tokenizer(), SMOLLM2_EOS, 'smollm2')
  if name == 'bytes':
    return ByteTokenizer()
  if isinstance(name, str) and name.startswith(HF_PREFIX):
    if not name[len(HF_PREFIX):]:
      raise ValueError(f"data.tokenizer 'hf:' needs a directory: 'hf:/path/to/checkpoint' (with {TOKENIZER_FILE}).")
    return hf_tokenizer(name[len(HF_PREFIX):])
  if isinstance(name, str) and name.startswith(SYNTHETIC_PREFIX):
    from rrt_jax.pretrained.synthetic_tokenizer import parse
    return parse(name)
  if name == 'auto':
    raise ValueError("data.tokenizer='auto' means the model's own tokenizer: resolve it with "
                     'tokenizer_for_model(spec, model.source, model.path).')
  raise ValueError(f'Unknown data.tokenizer {name!r}: {_CHOICES}.')


def tokenizer_for_model(tokenizer_spec: str, model_source: str, model_path: str) -> tuple[Tokenizer, str]:
  """(tokenizer, its spec to record) for data.tokenizer given model.source and model.path. 'auto' is the model's
  own tokenizer: SmolLM2's for model.source=smollm2, the checkpoint directory's tokenizer.json for hf; a random
  model has none (its vocabulary follows the tokenizer), so it must name one. Other specs are taken as named."""
  if tokenizer_spec != 'auto':
    tokenizer = make_tokenizer(tokenizer_spec)
  elif model_source == 'smollm2':
    tokenizer = make_tokenizer('smollm2')
  elif model_source == 'hf':
    if not model_path:
      raise ValueError('model.source=hf needs --config.model.path=/path/to/hf_checkpoint_dir (its tokenizer.json '
                       "is data.tokenizer='auto').")
    tokenizer = hf_tokenizer(model_path)
  elif model_source == 'random':
    raise ValueError("data.tokenizer='auto' takes the model's own tokenizer, and model.source=random has none: "
                     'name one with --config.data.tokenizer=bytes (tiny models) or smollm2 (the random model\'s '
                     'vocabulary follows it).')
  else:
    raise ValueError(f"data.tokenizer='auto' cannot find the tokenizer of model.source={model_source!r}: choose "
                     'model.source smollm2, hf or random, or name the tokenizer.')
  return tokenizer, spec_of(tokenizer)


def check_vocab(tokenizer, vocab_size: int, where: str) -> None:
  """Raises when the tokenizer can produce ids the model has no embedding for (they give NaN or garbage, not an
  error, inside jit); warns when it uses under half the model's vocabulary (a tokenizer of another model?)."""
  n = tokenizer.get_vocab_size()
  if n > vocab_size:
    raise ValueError(
        f'{where}: the tokenizer {spec_of(tokenizer)} has {n} tokens but the model\'s vocabulary has '
        f'{vocab_size}, so ids {vocab_size}..{n - 1} have no embedding. Use the model\'s own tokenizer: '
        "--config.data.tokenizer=auto (or hf:<checkpoint dir>).")
  if n < vocab_size // 2:
    log.warning('%s: the tokenizer %s has %d tokens, under half the model\'s %d: is it the model\'s own?', where,
                spec_of(tokenizer), n, vocab_size)


def check_ids(ids: np.ndarray, vocab_size: int, tokenizer) -> None:
  """Raises when token ids fall outside the model's vocabulary (a host-side check: inside jit, jnp.take of an
  out-of-range id gives NaN, not an error)."""
  if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
    bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
    raise ValueError(f'The tokenizer {spec_of(tokenizer)} produced id {bad}, outside the model\'s vocabulary of '
                     f"{vocab_size}: use the model's own tokenizer (--config.data.tokenizer=auto).")


def tokenizer_record(tokenizer, directory: str | os.PathLike) -> dict:
  """The `tokenizer` entry of model_config.json in `directory`. Named tokenizers are recorded by name; any other
  (an HF checkpoint's) is written to <directory>/tokenizer.json, so the checkpoint carries it."""
  if isinstance(tokenizer, str):
    tokenizer = make_tokenizer(tokenizer)
  record = {'eos_id': int(tokenizer.eos_id), 'vocab_size': int(tokenizer.get_vocab_size())}
  spec = spec_of(tokenizer)
  if spec in _NAMED or spec.startswith(SYNTHETIC_PREFIX):
    return {'spec': spec, **record}
  if not isinstance(tokenizer, BPETokenizer):
    raise TypeError(f'Cannot record a tokenizer of type {type(tokenizer).__name__}: use make_tokenizer\'s.')
  (as_path(directory) / TOKENIZER_FILE).write_text(tokenizer.tokenizer.to_str())
  return {'spec': FILE_PREFIX + TOKENIZER_FILE, **record, 'from': tokenizer.spec or None}


def differs_from_record(tokenizer, record: dict, directory: str | os.PathLike) -> str | None:
  """How `tokenizer` differs from the one a model_config.json `tokenizer` entry in `directory` records, or None
  when it is the same: the same name, or for a recorded tokenizer.json the same file; and the same EOS and
  vocabulary. Two tokenizers of one vocabulary size (bytes and synthetic:259) are different tokenizers."""
  if isinstance(tokenizer, str):
    tokenizer = make_tokenizer(tokenizer)
  spec, recorded = spec_of(tokenizer), record.get('spec')
  if isinstance(recorded, str) and recorded.startswith(FILE_PREFIX):
    path = as_path(directory) / recorded[len(FILE_PREFIX):]
    inner = getattr(tokenizer, 'tokenizer', None)
    if not isinstance(tokenizer, BPETokenizer) or not hasattr(inner, 'to_str'):
      return f'the workdir records a tokenizer.json ({record.get("from") or recorded}); this run uses {spec}'
    if path.exists() and path.read_text() != inner.to_str():
      return f'the workdir records another tokenizer.json ({record.get("from") or recorded}) than {spec}'
  elif recorded != spec:
    return f'the workdir records tokenizer {recorded!r}; this run uses {spec!r}'
  got = {'eos_id': int(tokenizer.eos_id), 'vocab_size': int(tokenizer.get_vocab_size())}
  want = {k: record.get(k) for k in got}
  if any(want[k] is not None and want[k] != got[k] for k in got):
    return f'the workdir records a tokenizer with {want}; this run\'s has {got}'
  return None


def tokenizer_from_record(record: dict, directory: str | os.PathLike) -> Tokenizer:
  """The tokenizer a model_config.json `tokenizer` entry records ('file:' paths are relative to `directory`)."""
  where = as_path(directory)
  if not isinstance(record, dict) or not isinstance(record.get('spec'), str) or not isinstance(
      record.get('eos_id'), int):
    raise ValueError(f'{where}: the tokenizer entry of model_config.json must hold spec (a string) and eos_id (an '
                     f'int), got {record!r}.')
  spec = record['spec']
  if spec.startswith(FILE_PREFIX):
    path = where / spec[len(FILE_PREFIX):]
    if not path.exists():
      raise FileNotFoundError(f'{path} is missing: model_config.json records the tokenizer there ({spec}).')
    tokenizer = BPETokenizer(_from_tokenizer_json(path.read_text()), record['eos_id'], record.get('from') or spec)
  else:
    tokenizer = make_tokenizer(spec)
  got = {'eos_id': tokenizer.eos_id, 'vocab_size': tokenizer.get_vocab_size()}
  for key, value in got.items():
    if key in record and record[key] != value:
      raise ValueError(f'{where}: the recorded tokenizer {spec} had {key}={record[key]}, but it loads with '
                       f'{key}={value} here: it changed since the checkpoint was written.')
  return tokenizer
