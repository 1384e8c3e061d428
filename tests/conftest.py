import os

import jax
import pytest

jax.config.update('jax_default_matmul_precision', 'highest')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # Nothing is downloaded: every checkpoint is built locally.

FAMILIES = ('gemma', 'llama', 'gpt_neox')


@pytest.fixture(scope='session')
def tiny_hf(tmp_path_factory):
  """{family: (directory, torch model)} of tiny random HF checkpoints saved locally."""
  from hf_fixtures import save_tiny
  root = tmp_path_factory.mktemp('hf')
  return {f: (str(root / f), save_tiny(f, str(root / f), seed=i)) for i, f in enumerate(FAMILIES)}
