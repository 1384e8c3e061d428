"""Your own data (data.source, rrt_jax/data/sources.py): JSONL and ArrayRecord files train a tiny model on exactly
their text, weighted mixtures give their weights' share of documents and resume exactly, bad specs are one clear
config error, and the default stays the packaged corpora."""

import json
import os
import pickle

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from tiny_config import tiny_config as tiny

from rrt_jax.data import pipeline
from rrt_jax.data.pipeline import CheckpointableIterator, PipelineConfig, lm_dataset
from rrt_jax.data.sources import JsonlSource, Mixture, open_source, parse_spec
from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.train import flops
from rrt_jax.train.loop import train
from rrt_jax.train.validate import ConfigError, check_config


def _texts(marker: str, n: int) -> list[str]:
  rng = np.random.default_rng(len(marker) + n)
  return [f'{marker}{i} ' + ' '.join(['lorem', 'ipsum', 'dolor'][int(j)] for j in rng.integers(0, 3, size=3)) +
          f' {marker}' for i in range(n)]


def write_jsonl(path, texts, field='text') -> str:
  with open(path, 'w', encoding='utf-8') as f:
    for t in texts:
      f.write(json.dumps({field: t, 'id': 'x'}) + '\n')
  return str(path)


def write_array_record(path, texts, as_json=False) -> str:
  writer = ArrayRecordWriter(str(path), 'group_size:1')
  for t in texts:
    writer.write(json.dumps({'text': t}).encode() if as_json else t.encode())
  writer.close()
  return str(path)


def _stream(texts, order, seed) -> np.ndarray:
  """The token stream the pipeline packs: documents in grain's shuffled order, each + eos."""
  perm = grain.MapDataset.range(len(texts)).shuffle(seed=seed)
  tok = ByteTokenizer()
  return np.concatenate([np.r_[tok.encode(texts[perm[i]]).ids, tok.eos_id] for i in range(order)])


def _train_and_record(c, tmp_path, monkeypatch) -> tuple[list[dict], list[dict]]:
  fed = []

  class Recording(CheckpointableIterator):
    def __next__(self):
      batch = super().__next__()
      fed.append(batch)
      return batch

  monkeypatch.setattr(pipeline, 'CheckpointableIterator', Recording)
  monkeypatch.setattr(flops, 'measured_matmul_peak', lambda *a, **k: 1e11)  # (MFU's CPU benchmark: seconds.)
  history = train(c, str(tmp_path / 'run'))  # No source= argument: the loop opens data.source.
  return history, fed


@pytest.mark.parametrize('kind', ['jsonl', 'arrayrecord'])
def test_own_files_train_on_exactly_their_text(kind, tmp_path, monkeypatch):
  texts = _texts('doc', 40)
  if kind == 'jsonl':
    spec, field = 'jsonl:' + write_jsonl(tmp_path / 'docs.jsonl', texts, field='body'), 'body'
  else:
    spec, field = 'arrayrecord:' + write_array_record(tmp_path / 'docs.array_record', texts), 'text'
  c = tiny(**{'train.steps': 2, 'log_every': 1, 'data.source': spec, 'data.text_field': field,
              'checkpoint.every_steps': 0})
  check_config(c)
  history, fed = _train_and_record(c, tmp_path, monkeypatch)
  assert [h['step'] for h in history] == [1, 2] and all(np.isfinite(h['loss']) for h in history)
  assert len(fed) == 2
  # Row 0 of the first batch is the first seq_len tokens of the documents in the pipeline's shuffled order,
  # the first of them whole (they are shorter than a row), each ending in eos.
  row = fed[0]['inputs'][0]
  stream = _stream(texts, 6, c.data.seed)
  np.testing.assert_array_equal(row, stream[:row.size])
  first = grain.MapDataset.range(len(texts)).shuffle(seed=c.data.seed)[0]
  seg1 = row[fed[0]['segment_ids'][0] == 1]
  np.testing.assert_array_equal(seg1, ByteTokenizer().encode(texts[first]).ids + [ByteTokenizer.eos_id])


def _eos_share(batches, marker_a: str, marker_b: str) -> float:
  """The share of documents from source A: each document ends `marker` + eos, counted once as a target."""
  tok = ByteTokenizer()
  a = tok.encode(marker_a).ids[0]
  b = tok.encode(marker_b).ids[0]
  n_a = n_b = 0
  for batch in batches:
    ends = (batch['targets'] == tok.eos_id) & (batch['loss_mask'] > 0)
    n_a += int((ends & (batch['inputs'] == a)).sum())
    n_b += int((ends & (batch['inputs'] == b)).sum())
  return n_a / (n_a + n_b)


def test_a_mixture_gives_its_weights_share_of_documents(tmp_path):
  a = write_jsonl(tmp_path / 'a.jsonl', _texts('A', 10))  # Sizes unlike the weights: A repeats far more.
  b = write_array_record(tmp_path / 'b.array_record', _texts('B', 40))
  source = open_source(f'jsonl:{a}@0.8,arrayrecord:{b}@0.2')
  assert isinstance(source, Mixture) and [w for _, w in source.components] == [0.8, 0.2]
  it = iter(lm_dataset(source, ByteTokenizer(), PipelineConfig(seq_len=64, batch_size=8, seed=3),
                       shard_index=0, shard_count=1))
  share = _eos_share([next(it) for _ in range(25)], 'A', 'B')  # ~500 documents, as training sees them.
  assert abs(share - 0.8) < 0.03, share  # (0.5 / 0.5 would give 0.5.)
  # Document level, straight from the mixed dataset: the weights' proportions, deterministic.
  for weight_a in (0.8, 0.3):
    mixture = open_source(f'jsonl:{a}@{weight_a},arrayrecord:{b}@{1 - weight_a:.1f}')
    first = [mixture.dataset(seed=3)[i]['text'] for i in range(400)]
    marks = [(t.decode() if isinstance(t, bytes) else t)[0] for t in first]
    assert abs(marks.count('A') / len(marks) - weight_a) < 0.01, marks.count('A')
    assert first == [mixture.dataset(seed=3)[i]['text'] for i in range(400)]


def test_a_mixture_resumes_mid_stream_exactly(tmp_path):
  a = write_jsonl(tmp_path / 'a.jsonl', _texts('A', 13))
  b = write_array_record(tmp_path / 'b.array_record', _texts('B', 29), as_json=True)
  source = open_source(f'jsonl:{a}@0.7,arrayrecord+json:{b}@0.3')
  config = PipelineConfig(seq_len=32, batch_size=2, seed=5)

  def shards():  # Two virtual shards in one process, as setup.data_iterators builds them.
    return CheckpointableIterator([iter(lm_dataset(source, ByteTokenizer(), config, shard_index=i, shard_count=2))
                                   for i in range(2)])

  uninterrupted = shards()
  full = [next(uninterrupted) for _ in range(7)]
  for stop in (1, 4):
    it = shards()
    for _ in range(stop):
      next(it)
    state = it.get_state()
    resumed = shards()
    resumed.set_state(state)
    for want in full[stop:]:
      got = next(resumed)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_bad_specs_are_one_clear_config_error(tmp_path):
  body = write_jsonl(tmp_path / 'body.jsonl', _texts('x', 3), field='body')
  cases = {
      'ftp://host/data.jsonl': "unknown scheme 'ftp'",
      f'jsonl:{tmp_path}/missing.jsonl': 'no such file',
      f'jsonl:{tmp_path}/*.json': 'matches no files',
      f'jsonl:{body}': "no text field 'text' (the record has ['body', 'id']): set data.text_field",
      f'jsonl:{body}@0': 'the weight must be a number > 0',
      f'jsonl:{body}@1,,jsonl:{body}': 'has an empty entry',
      'packaged:nope': "no split 'nope'",
      f'arrayrecord+json:{write_array_record(tmp_path / "raw.array_record", ["plain text"])}': 'not JSON',
  }
  for spec, message in cases.items():
    with pytest.raises(ConfigError) as e:
      check_config(tiny(**{'data.source': spec}))
    assert len(e.value.problems) == 1 and message in e.value.problems[0], (spec, e.value.problems)
    assert 'data.source' in e.value.problems[0]
  check_config(tiny(**{'data.source': f'jsonl:{body}', 'data.text_field': 'body'}))  # The fix named.


def test_spec_syntax():
  assert parse_spec('', 'validation')[0].scheme == 'packaged'
  assert parse_spec('', 'validation')[0].split == 'validation'
  [t] = parse_spec('tfds:c4/en:3.0.1:validation@2', 'train')
  assert (t.scheme, t.location, t.split, t.weight) == ('tfds', 'c4/en:3.0.1', 'validation', 2.0)
  assert parse_spec('tfds:wiki', 'train')[0].split == 'train'
  [j, r] = parse_spec('jsonl:/d/a@b.jsonl, arrayrecord:/d/*.array_record@0.25')
  assert (j.location, j.weight, r.location, r.weight) == ('/d/a@b.jsonl', 1.0, '/d/*.array_record', 0.25)


def test_jsonl_index_skips_blank_lines_and_spans_files(tmp_path):
  (tmp_path / 'b.jsonl').write_bytes(b'{"text": "three"}\r\n\n   \r\n{"text": "four \\u00e9"}')  # No final newline.
  write_jsonl(tmp_path / 'a.jsonl', ['one', 'two'])
  source = open_source(f'jsonl:{tmp_path}/*.jsonl')
  assert isinstance(source, JsonlSource) and len(source) == 4
  assert [source[i]['text'] for i in range(4)] == ['one', 'two', 'three', 'four é'] == \
      [pickle.loads(pickle.dumps(source))[i]['text'] for i in range(4)]  # Pickles (grain workers) without its fds.
  assert source[-1]['text'] == 'four é'
  with pytest.raises(IndexError):
    source[4]


def test_a_bad_jsonl_line_is_found_when_the_source_opens_naming_its_line(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"\n{"body": "four"}\n')
  with pytest.raises(ValueError, match=rf'{path}, line 4 is not JSON'):  # Before training reads a document.
    open_source(f'jsonl:{path}')
  path.write_text('{"text": "one"}\n{"body": "four"}\n')
  with pytest.raises(ValueError, match=rf"{path}, line 2: no text field 'text'"):
    open_source(f'jsonl:{path}')


def test_the_default_is_the_packaged_corpora_unchanged():
  from rrt_jax.data.tfds_builder import text_source, tfds_dir
  packaged = text_source('validation')
  for spec in ('', 'packaged', 'packaged:validation'):
    source = open_source(spec, 'validation')
    assert type(source) is type(packaged) and len(source) == len(packaged)
    assert source[0] == packaged[0]
  # The same TFDS dataset named by its prepared directory, through tfds:<dir>:<split>.
  version_dir = os.path.join(tfds_dir(), 'rrt_text', '1.0.0')
  check_config(tiny(**{'data.source': f'tfds:{version_dir}:validation'}))
  via_tfds = open_source(f'tfds:{version_dir}:validation')
  assert len(via_tfds) == len(packaged) and via_tfds[3]['text'] == packaged[3]['text']
