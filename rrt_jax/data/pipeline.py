"""grain input pipeline: tokenize -> pack (concat then split, with segment ids and positions) -> batch.

Each element is a dict of [batch, seq_len] arrays:
  inputs, targets    token ids; targets are the next tokens.
  positions          position of each token within its own document (restarts at 0 in every packed row).
  segment_ids        1, 2, ... per document in the row, 0 for padding; attention stays within a segment.
  loss_mask          1 where the target belongs to the same document as the input (no cross-document or
                     padding predictions), 0 elsewhere.
The iterator's state (`get_state` / `set_state`) is checkpointable. Documents are sharded per host.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import grain
import jax
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from rrt_jax.data.sources import Mixture
from rrt_jax.pretrained.tokenizer import check_ids

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  seq_len: int
  batch_size: int  # Per host.
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None  # None repeats forever (training); finite pads the last batch.
  worker_count: int = 0  # 0 = in-process (the right choice on 2 cores); > 0 = grain worker processes.


class Tokenize(grain.transforms.Map):
  """{'text': bytes} -> {'tokens': int32 ids + the tokenizer's eos_id}. Non-UTF-8 text is an error, not a silent
  skip; with `vocab_size`, so is an id the model has no embedding for."""

  def __init__(self, tokenizer, vocab_size: int | None = None):
    self._tokenizer, self._eos_id, self._vocab_size = tokenizer, tokenizer.eos_id, vocab_size

  def map(self, element):
    text = element['text']
    if isinstance(text, bytes):
      text = text.decode('utf-8')  # Raises on non-UTF-8: the corpora were validated when prepared.
    tokens = np.asarray(self._tokenizer.encode(text).ids + [self._eos_id], np.int32)
    if self._vocab_size is not None:
      check_ids(tokens, self._vocab_size, self._tokenizer)
    return {'tokens': tokens}


def to_model_inputs(packed: dict) -> dict:
  """A packed row of seq_len + 1 tokens -> inputs/targets/positions/segment_ids/loss_mask of seq_len."""
  tokens, seg = packed['tokens'], packed['tokens_segment_ids']
  seg_in = seg[:-1]
  starts = np.r_[True, seg_in[1:] != seg_in[:-1]]
  start_index = np.maximum.accumulate(np.where(starts, np.arange(seg_in.size), 0))
  return {
      'inputs': tokens[:-1], 'targets': tokens[1:],
      'positions': (np.arange(seg_in.size) - start_index).astype(np.int32),
      'segment_ids': seg_in.astype(np.int32),
      'loss_mask': ((seg[1:] == seg_in) & (seg_in > 0)).astype(np.float32),
  }


class PadBatch(grain.transforms.Map):
  """Pads a short final batch with empty rows (loss_mask 0) so every batch has the same shape."""

  def __init__(self, batch_size: int):
    self._batch_size = batch_size

  def map(self, batch):
    missing = self._batch_size - len(batch['inputs'])
    if missing <= 0:
      return batch
    return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def lm_dataset(source, tokenizer, config: PipelineConfig, max_seq_len: int | None = None,
               shard_index: int | None = None, shard_count: int | None = None,
               vocab_size: int | None = None) -> grain.IterDataset:
  """The training/eval pipeline over a random-access source of {'text'} documents, or a weighted
  rrt_jax.data.sources.Mixture of them; `tokenizer` (see rrt_jax.pretrained.tokenizer) ends every document with its
  eos_id. `vocab_size`: the model's, to refuse ids beyond it on the host (an out-of-range id gives NaN inside jit,
  not an error)."""
  if max_seq_len is not None and config.seq_len > max_seq_len:
    raise ValueError(f'seq_len={config.seq_len} is longer than the model context ({max_seq_len}): '
                     f'use seq_len <= {max_seq_len}.')
  if config.seq_len < 2 or config.batch_size < 1:
    raise ValueError(f'seq_len must be >= 2 and batch_size >= 1, got {config.seq_len}, {config.batch_size}.')
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if isinstance(source, Mixture):  # Weighted sources (rrt_jax.data.sources): shuffled, repeated, then mixed.
    ds = source.dataset(config.seed, config.shuffle, config.num_epochs)
    if len(ds) < shard_count:
      raise ValueError(f'The mixture gives {len(ds)} documents, too few to shard over {shard_count} hosts.')
  else:
    if len(source) < shard_count:
      raise ValueError(f'{len(source)} documents cannot be sharded over {shard_count} hosts.')
    ds = grain.MapDataset.source(source)
    if config.shuffle:
      ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
  ds = ds[shard_index::shard_count]
  ds = ds.map(Tokenize(tokenizer, vocab_size))
  packed = ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={'tokens': config.seq_len + 1})
  out = packed.map(to_model_inputs).batch(config.batch_size, drop_remainder=False)
  out = out.map(PadBatch(config.batch_size))
  if config.worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use their defaults.
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
  return out


def _fix_tuples(state):
  """grain's ConcatThenSplit state holds (start, end) tuples under 'remainder_slices' that JSON turns into
  lists, and its set_state then misreads them; restore them as tuples."""
  if isinstance(state, dict):
    return {k: ({f: tuple(v) for f, v in val.items()} if k == 'remainder_slices' else _fix_tuples(val))
            for k, val in state.items()}
  return state


class CheckpointableIterator:
  """Iterators over one or more data shards, concatenated row-wise into one batch per step, with a JSON
  (bytes) state that round-trips exactly (for Orbax, through grain's per-process checkpoint handler)."""

  def __init__(self, iterators):
    self._its = list(iterators) if isinstance(iterators, list | tuple) else [iterators]

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(it) for it in self._its]
    if len(batches) == 1:
      return batches[0]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self._its]).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state)
    if len(states) != len(self._its):
      raise ValueError(f'The checkpoint holds {len(states)} data shard states for this process, the pipeline '
                       f'has {len(self._its)}: keep data.shards and the process count the run started with.')
    for it, st in zip(self._its, states, strict=True):
      it.set_state(_fix_tuples(st))

  def start_prefetch(self) -> None:
    for it in self._its:
      if hasattr(it, 'start_prefetch'):
        it.start_prefetch()
