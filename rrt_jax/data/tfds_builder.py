"""TFDS builder: the prepared corpora as ArrayRecord files (no TensorFlow), read with `tfds.data_source`.

  source = text_source('train')       # random-access: len(source), source[i] -> {'id': bytes, 'text': bytes}
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import tensorflow_datasets as tfds

from rrt_jax.data.packages import cache_dir, cache_lock
from rrt_jax.data.prepare import SPLITS, prepare, prepared_dir

log = logging.getLogger(__name__)

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
  """Prepares the corpora (once) and writes the ArrayRecord dataset (once); returns the TFDS data_dir.

  TFDS writes into an `incomplete.*` directory renamed to <data_dir>/rrt_text/<version> at the end, so that
  directory marks a complete build; but two concurrent builds both write, and the second rename fails. So the
  build runs under <cache>/locks/tfds-rrt_text.lock, and a process that waited finds the first one's build.
  """
  data_dir = tfds_dir(root)
  version_dir = os.path.join(data_dir, NAME, str(RrtText.VERSION))
  if not os.path.isdir(version_dir):
    prepare(root)
    with cache_lock(f'tfds-{NAME}', root, what=f'TFDS build of {NAME}'):
      if not os.path.isdir(version_dir):
        for stale in glob.glob(os.path.join(glob.escape(os.path.dirname(version_dir)), 'incomplete.*')):
          log.info('removing %s, left by an interrupted TFDS build', stale)
          shutil.rmtree(stale, ignore_errors=True)  # Under the lock no build owns it; TFDS never removes them.
        builder = RrtText(data_dir=data_dir, file_format='array_record')
        builder._cache_root = root
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir


def text_source(split: str, root: str | None = None):
  """Random-access source of {'id', 'text'} (bytes) for one split."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}: choose one of {SPLITS}.')
  return tfds.data_source(NAME, split=split, data_dir=build(root), download=False)
