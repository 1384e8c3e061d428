"""TFDS builder: the prepared corpora as ArrayRecord files (no TensorFlow), read with `tfds.data_source`.

  source = text_source('train')       # random-access: len(source), source[i] -> {'id': bytes, 'text': bytes}
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from rrt_jax.data.packages import cache_dir
from rrt_jax.data.prepare import SPLITS, prepare, prepared_dir

NAME = 'rrt_text'


class RrtText(tfds.core.GeneratorBasedBuilder):
  """Debian docs (train, validation) and held-out Austen, Brown and Wikipedia, one document per example."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'debdocs + Austen + Brown + Wikipedia leads, decontaminated (rrt_jax.data.prepare).'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({'id': tfds.features.Text(), 'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from installed-package archives via rrt_jax.data.prepare.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    path = os.path.join(prepared_dir(self._cache_root), f'{split}.jsonl')
    with open(path, encoding='utf-8') as f:
      for line in f:
        doc = json.loads(line)
        yield doc['id'], doc

  _cache_root: str | None = None


def tfds_dir(root: str | None = None) -> str:
  return os.path.join(cache_dir(root), 'tfds')


def build(root: str | None = None) -> str:
  """Prepares the corpora (once) and writes the ArrayRecord dataset (once); returns the TFDS data_dir."""
  prepare(root)
  builder = RrtText(data_dir=tfds_dir(root), file_format='array_record')
  builder._cache_root = root
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return tfds_dir(root)


def text_source(split: str, root: str | None = None):
  """Random-access source of {'id', 'text'} (bytes) for one split."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}: choose one of {SPLITS}.')
  return tfds.data_source(NAME, split=split, data_dir=build(root), download=False)
