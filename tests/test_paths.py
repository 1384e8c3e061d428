"""Workdirs as URIs (gs://) and as local relative paths: nothing is resolved against the working directory, Orbax,
configs and metrics all go to the URI, and local runs still work end to end. gs:// is served from a temporary
directory (no network, no gcsfs or google-cloud-storage needed)."""

import importlib
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from tensorboardX import record_writer

import rrt_jax
from experiments.configs import tiny_cpu
from rrt_jax import presets
from rrt_jax.checkpoint import load_training_checkpoint, read_configs
from rrt_jax.config import RecursionConfig
from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.train import flops
from rrt_jax.train.checkpointing import TrainCheckpoints
from rrt_jax.train.loop import train
from rrt_jax.train.metrics import MetricsWriter
from rrt_jax.train.setup import init_distributed
from rrt_jax.utils import uri
from rrt_jax.utils.uri import as_path

TEXT = [{'text': f'Sentence number {i} says something about paths and buckets.'} for i in range(64)]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://<bucket>/<key> is tmp_path/gcs/<bucket>/<key> for etils.epath (its fsspec 'gcs' filesystem) and for Orbax's
  TensorStore kvstore. Like GCS, it refuses to append to an object. The working directory is an empty cwd/."""
  root = tmp_path / 'gcs'
  root.mkdir()

  class FakeGCS(DirFileSystem):
    protocol = ('gs', 'gcs')

    def __init__(self, *args, **kwargs):  # epath passes finalize_on_close=True (a gcsfs option).
      super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    def open(self, path, mode='rb', **kwargs):
      if 'a' in mode:
        raise NotImplementedError(f'GCS objects cannot be appended to: {path}')
      return super().open(path, mode, **kwargs)

  # What fsspec.register_implementation('gcs', ...) does, undone after the test (fsspec.registry is a read-only view).
  monkeypatch.setitem(importlib.import_module('fsspec.registry')._registry, 'gcs', FakeGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem per protocol.
  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs',
                      lambda path: {'driver': 'file', 'path': str(root / str(path).split('://', 1)[1])})
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)  # Asks the GCS API.
  monkeypatch.setattr(uri, 'missing_packages', lambda path: [])  # The fake stands in for them.
  monkeypatch.setattr(record_writer, 'GCS_ENABLED', False)  # As without google-cloud-storage.
  monkeypatch.setattr(flops, 'measured_matmul_peak', lambda *args, **kwargs: 1e12)  # Only for MFU; saves time.
  (tmp_path / 'cwd').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')
  yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def tiny(**overrides) -> ml_collections.ConfigDict:
  c = tiny_cpu.get_config()
  c.train.steps, c.log_every, c.checkpoint.every_steps = 2, 1, 1
  for key, value in overrides.items():
    section, leaf = key.split('.')
    c[section][leaf] = value
  return c


def test_uris_stay_uris_and_local_paths_become_absolute(fake_gcs, tmp_path):
  assert str(as_path('gs://bkt/run')) == 'gs://bkt/run'
  assert str(as_path('gs://bkt/run') / 'checkpoints') == 'gs://bkt/run/checkpoints'
  assert str(as_path('runs/a')) == str(tmp_path / 'cwd' / 'runs' / 'a')
  with pytest.raises(ValueError, match=r'does not handle memory:// paths'):
    as_path('memory://run')


def test_gs_paths_without_their_packages_fail_early(monkeypatch):
  monkeypatch.setattr(uri, '_installed', lambda module: False)
  with pytest.raises(ImportError, match=r'need gcsfs and google-cloud-storage \(pip install gcsfs google-cloud'):
    as_path('gs://bkt/run')
  monkeypatch.setattr(uri, '_installed', lambda module: module == 'tensorflow')  # gfile instead of gcsfs.
  with pytest.raises(ImportError, match=r'need google-cloud-storage \(pip'):
    TrainCheckpoints('gs://bkt/run', every_steps=1)
  assert uri.missing_packages('/local/run') == []


def test_train_checkpoints_in_a_uri_workdir_stay_there(fake_gcs, tmp_path):
  ckpts = TrainCheckpoints('gs://bkt/run', every_steps=1, async_save=False)
  assert str(ckpts.directory) == 'gs://bkt/run/checkpoints'
  cfg, rec = presets.TINY_LLAMA, RecursionConfig(loops=3, lora_rank=4)
  ckpts.write_configs('gs://bkt/run', cfg, rec)
  ckpts.close()
  assert (fake_gcs / 'bkt' / 'run' / 'checkpoints').is_dir()
  assert json.loads((fake_gcs / 'bkt' / 'run' / 'model_config.json').read_text())['recursion']['loops'] == 3
  assert read_configs('gs://bkt/run', 'holds no run') == (cfg, rec)
  assert os.listdir(tmp_path / 'cwd') == []  # Not <cwd>/gs:/bkt/run.


def test_metrics_in_a_uri_workdir_are_rewritten_not_appended(fake_gcs, caplog):
  metrics = fake_gcs / 'bkt' / 'run' / 'metrics.jsonl'
  with caplog.at_level('WARNING'):
    writer = MetricsWriter('gs://bkt/run', sync_every_s=0)
  assert 'no TensorBoard events in gs://bkt/run/tensorboard' in caplog.text and 'google-cloud-storage' in caplog.text
  writer.write(1, {'loss': 3.0})
  assert [json.loads(line)['step'] for line in metrics.read_text().splitlines()] == [1]  # Synced at once.
  writer.close()
  resumed = MetricsWriter('gs://bkt/run', sync_every_s=3600)
  resumed.write(2, {'loss': 2.5})
  assert metrics.read_text().count('\n') == 1  # Not yet: at most every sync_every_s.
  resumed.close()
  assert [json.loads(line) for line in metrics.read_text().splitlines()] == [{'step': 1, 'loss': 3.0},
                                                                           {'step': 2, 'loss': 2.5}]
  assert not (fake_gcs / 'bkt' / 'run' / 'tensorboard').exists()


def test_training_in_a_gcs_workdir_end_to_end(fake_gcs, tmp_path):
  history = train(tiny(), 'gs://bkt/run', source=TEXT, tokenizer=ByteTokenizer())
  assert [h['step'] for h in history] == [1, 2]
  run = fake_gcs / 'bkt' / 'run'
  assert [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
  for step in (1, 2):  # Orbax took it for GCS: a commit file marks each finished step (no rename).
    assert (run / 'checkpoints' / str(step) / 'commit_success.txt').exists()
  assert os.listdir(tmp_path / 'cwd') == []
  model, variables, step = load_training_checkpoint('gs://bkt/run')
  assert step == 2 and model.rec.loops == 2 and model.rec.lora_rank == 8
  local = ocp.StandardCheckpointer().restore(str(run / 'checkpoints' / '2' / 'state'))['variables']
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), local)
  (run / 'checkpoints' / '2' / 'commit_success.txt').unlink()  # As if step 2 were still being written.
  assert load_training_checkpoint('gs://bkt/run')[2] == 1


def test_local_relative_workdir_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setattr(flops, 'measured_matmul_peak', lambda *args, **kwargs: 1e12)
  monkeypatch.chdir(tmp_path)
  history = train(tiny(), 'runs/r1', source=TEXT, tokenizer=ByteTokenizer())
  assert [h['step'] for h in history] == [1, 2]
  run = tmp_path / 'runs' / 'r1'
  assert [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(run / 'tensorboard'))
  assert sorted(os.listdir(run / 'checkpoints')) == ['1', '2']
  model, variables, step = load_training_checkpoint('runs/r1')
  assert step == 2 and model.rec.loops == 2
  saved = rrt_jax.save('exported', model.cfg, model.rec, variables)
  assert saved == str(tmp_path / 'exported')
  _, reloaded = rrt_jax.load('exported')
  jax.tree.map(np.testing.assert_array_equal, reloaded, variables)


@pytest.mark.parametrize('coordinator, expected', [
    ('', []),
    ('auto', [((), {})]),  # jax.distributed.initialize() finds the cluster itself (Cloud TPU metadata, SLURM, ...).
    ('10.0.0.5:8476', [((), {'coordinator_address': '10.0.0.5:8476', 'num_processes': 4, 'process_id': 2})]),
])
def test_distributed_coordinator(coordinator, expected, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args, **kwargs: calls.append((args, kwargs)))
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  c = tiny(**{'distributed.coordinator': coordinator, 'distributed.num_processes': 4, 'distributed.process_id': 2})
  init_distributed(c)
  assert calls == expected
