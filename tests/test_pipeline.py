"""grain pipeline: packing with segment ids and positions, loss masks, per-host shards, checkpointable state;
and the model's attention honouring packed segments."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.data.pipeline import PipelineConfig, lm_dataset
from rrt_jax.model import init_variables

EOS = 1


@dataclasses.dataclass
class _Encoding:
  ids: list


class CharTokenizer:
  """Token id = byte value + 2 (0 = pad, 1 = EOS), so tests can read documents back from ids."""

  eos_id = EOS

  def encode(self, text):
    return _Encoding([b + 2 for b in text.encode()])


def _docs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{'text': ''.join(chr(97 + int(x)) for x in rng.integers(0, 26, size=int(rng.integers(1, 40))))}
          for _ in range(n)]


def _all_batches(ds):
  return list(iter(ds))


def test_packing_keeps_every_token_once_in_order():
  docs = _docs(30)
  cfg = PipelineConfig(seq_len=16, batch_size=3, shuffle=False, num_epochs=1)
  batches = _all_batches(lm_dataset(docs, CharTokenizer(), cfg, shard_index=0, shard_count=1))
  rows = [{k: b[k][i] for k in b} for b in batches for i in range(cfg.batch_size)]
  expected = np.concatenate([np.r_[CharTokenizer().encode(d['text']).ids, EOS] for d in docs])
  # A packed row holds seq_len + 1 tokens: the inputs, plus a last token that is only a target (real in a full
  # row, padding id 0 otherwise). Rebuild the token stream from the rows.
  pieces = []
  for r in rows:
    pieces.append(r['inputs'][r['segment_ids'] > 0])
    if r['segment_ids'].all() and r['targets'][-1] != 0:
      pieces.append(r['targets'][-1:])
  np.testing.assert_array_equal(np.concatenate(pieces), expected)
  for r in rows:
    seg, pos, mask = r['segment_ids'], r['positions'], r['loss_mask']
    for s in set(seg[seg > 0]):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))  # Restart per document.
    # No prediction across documents or into padding.
    assert not np.any(mask[:-1][seg[1:] != seg[:-1]])
    assert np.all(mask[seg == 0] == 0)
  # Padding rows fill the final batch (finite epoch): shapes never change.
  assert all(b['inputs'].shape == (3, 16) for b in batches)


def test_iterator_state_resumes_exactly():
  ds = lm_dataset(_docs(50), CharTokenizer(), PipelineConfig(seq_len=8, batch_size=2, seed=3),
                  shard_index=0, shard_count=1)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_hosts_get_disjoint_shards_that_cover_the_data():
  docs = [{'text': f'doc{i:03d}'} for i in range(10)]
  cfg = PipelineConfig(seq_len=64, batch_size=1, shuffle=True, num_epochs=1)
  seen = []
  for host in range(2):
    for b in _all_batches(lm_dataset(docs, CharTokenizer(), cfg, shard_index=host, shard_count=2)):
      text = bytes(int(t) - 2 for t in b['inputs'][0][b['segment_ids'][0] > 0] if t > 1).decode()
      seen += [text[i:i + 6] for i in range(0, len(text), 6)]
  assert sorted(seen) == sorted(d['text'] for d in docs)


def test_bad_lengths_are_rejected():
  with pytest.raises(ValueError, match='longer than the model context'):
    lm_dataset(_docs(3), CharTokenizer(), PipelineConfig(seq_len=4096, batch_size=1), max_seq_len=2048)
  with pytest.raises(ValueError, match='cannot be sharded'):
    lm_dataset(_docs(1), CharTokenizer(), PipelineConfig(seq_len=8, batch_size=1), shard_index=0, shard_count=2)


def test_attention_stays_within_packed_segments():
  cfg = presets.TINY_LLAMA
  rec = RecursionConfig(loops=2)
  model = Decoder(cfg, rec)
  variables = init_variables(cfg, rec, jax.random.key(0))
  rng = np.random.default_rng(0)
  a, b = rng.integers(2, cfg.vocab_size, size=5), rng.integers(2, cfg.vocab_size, size=7)
  packed = jnp.asarray(np.r_[a, b][None])
  positions = jnp.asarray(np.r_[np.arange(5), np.arange(7)][None])
  segments = jnp.asarray(np.r_[np.ones(5), np.full(7, 2)][None].astype(np.int32))
  logits, _ = model.apply(variables, packed, positions, segments, all_exits=True)
  alone_a, _ = model.apply(variables, jnp.asarray(a[None]), all_exits=True)
  alone_b, _ = model.apply(variables, jnp.asarray(b[None]), all_exits=True)
  np.testing.assert_allclose(logits[:, :, :5], alone_a, atol=1e-5)
  np.testing.assert_allclose(logits[:, :, 5:], alone_b, atol=1e-5)


def test_worker_processes_give_the_same_batches():
  cfg = PipelineConfig(seq_len=8, batch_size=2, seed=1, num_epochs=1)
  docs = _docs(12)
  in_process = _all_batches(lm_dataset(docs, CharTokenizer(), cfg, shard_index=0, shard_count=1))
  workers = _all_batches(lm_dataset(docs, CharTokenizer(), dataclasses.replace(cfg, worker_count=1),
                                    shard_index=0, shard_count=1))
  assert len(workers) == len(in_process)
  for a, b in zip(workers, in_process, strict=True):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])


def test_checkpointable_iterator_state_survives_json():
  """grain's packing state holds tuples that a JSON round trip turns into lists; the wrapper restores them."""
  from rrt_jax.data.pipeline import CheckpointableIterator
  ds = lm_dataset(_docs(40), CharTokenizer(), PipelineConfig(seq_len=8, batch_size=2, seed=5),
                  shard_index=0, shard_count=1)
  for consumed in range(1, 6):
    it = CheckpointableIterator(iter(ds))
    for _ in range(consumed):
      next(it)
    state = it.get_state()
    assert isinstance(state, bytes)
    want = next(it)
    resumed = CheckpointableIterator(iter(ds))
    resumed.set_state(state)
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
