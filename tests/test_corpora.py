"""Real text from packages: the prepared TFDS splits, decontamination and the manifest check."""

import json

import pytest

from rrt_jax.data import prepare
from rrt_jax.data.corpora import Corpus, _read_text
from rrt_jax.data.tfds_builder import text_source


def test_decontamination_removes_eval_paragraphs_and_duplicates():
  shared = 'This paragraph appears in an evaluation corpus and must never be trained on.'
  train = Corpus('t', [('a', f'Intro paragraph that is long enough to count here.\n\n{shared}'),
                       ('b', shared), ('c', 'Unique text that stays in training, long enough.'),
                       ('d', 'Unique text that stays in training, long enough.')], {})
  stats = prepare.decontaminate(train, [Corpus('e', [('x', f'Before.\n\n{shared}')], {})])
  assert stats == {'paragraphs_removed_as_eval_overlap': 2, 'duplicate_documents_removed': 1}
  assert [d for d, _ in train.documents] == ['a', 'c']
  assert shared not in train.documents[0][1]


def test_bad_documents_are_counted_not_silently_dropped():
  corpus = Corpus('t', [], {})
  _read_text(corpus, 'latin1', 'caf\xe9'.encode('latin-1'))
  _read_text(corpus, 'empty', b'  \n ')
  _read_text(corpus, 'ok', b'fine')
  assert corpus.skipped == {'not UTF-8': 1, 'empty': 1}
  assert corpus.documents == [('ok', 'fine')]


def test_manifest_mismatch_is_reported():
  ref = {'versions': {'linux-doc-6.1': '6.1.176-1'}, 'splits': {'train': {'sha256': 'a', 'documents': 2}}}
  got = {'versions': {'linux-doc-6.1': '6.1.180-1'}, 'splits': {'train': {'sha256': 'b', 'documents': 3}}}
  problems = prepare.compare_manifests(got, ref)
  assert any('train: text differs' in p for p in problems)
  assert any('6.1.180-1 vs 6.1.176-1' in p for p in problems)
  assert prepare.compare_manifests(ref, ref) == []


@pytest.fixture(scope='module')
def manifest():
  return prepare.prepare()


def test_tfds_splits_match_the_manifest(manifest):
  for split in prepare.SPLITS:
    assert len(text_source(split)) == manifest['splits'][split]['documents'] > 0
  assert manifest['splits']['train']['chars'] > 40_000_000  # The Debian docs: ~49 MB of text.
  with open(prepare.REFERENCE_MANIFEST) as f:
    reference = json.load(f)
  assert set(reference['splits']) == set(prepare.SPLITS)


def test_no_evaluation_text_in_training(manifest):
  del manifest
  austen_opening = 'It is a truth universally acknowledged'
  train = text_source('validation')
  assert all(austen_opening.encode() not in train[i]['text'] for i in range(len(train)))
  brown = text_source('brown')
  assert any(b'Fulton County Grand Jury' in brown[i]['text'] for i in range(len(brown)))
