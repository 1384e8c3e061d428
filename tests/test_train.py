"""Uptraining: loss decreases on real text, resume is exact, SIGTERM saves, NaN stops, freezing, accumulation,
config typos."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_config import tiny_config as tiny

from rrt_jax.data.tfds_builder import text_source
from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.sharding import make_mesh
from rrt_jax.train.loop import train
from rrt_jax.train.setup import initial_variables, load_original, recursion_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def real_text():
  return text_source('validation')


def test_loss_decreases_on_real_text(real_text, tmp_path):
  history = train(tiny(**{'train.steps': 30, 'log_every': 5}), str(tmp_path), source=real_text,
                  tokenizer=ByteTokenizer())
  ce = [h['ce_per_loop/loop2'] for h in history]
  assert ce[-1] < ce[0] - 1.0, ce
  assert all(np.isfinite(h['loss']) and h['grad_norm'] > 0 for h in history)
  assert os.path.exists(tmp_path / 'tensorboard') and os.path.exists(tmp_path / 'model_config.json')
  with open(tmp_path / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [5, 10, 15, 20, 25, 30]


# True: the optimizer state holds only LoRA's moments (slow: the default run keeps the plain resume test).
@pytest.mark.parametrize('freeze_shared', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_kill_and_resume_reproduces_the_losses(real_text, tmp_path, freeze_shared):
  config = tiny(**{'train.steps': 8, 'log_every': 1, 'checkpoint.every_steps': 4, 'loss.kd_weight': 1.0,
                   'loss.early_exit': 'weighted', 'train.freeze_shared': freeze_shared})
  full = train(config, str(tmp_path / 'a'), source=real_text, tokenizer=ByteTokenizer())
  first = train(config, str(tmp_path / 'b'), source=real_text, tokenizer=ByteTokenizer(), stop_after=4)
  assert [h['step'] for h in first] == [1, 2, 3, 4]
  resumed = train(config, str(tmp_path / 'b'), source=real_text, tokenizer=ByteTokenizer())
  assert [h['step'] for h in resumed] == [5, 6, 7, 8]
  for a, b in zip(full, first + resumed, strict=True):
    assert a['loss'] == b['loss'], (a['step'], a['loss'], b['loss'])


@pytest.mark.slow  # test_reliability's unreadable-checkpoint test covers this path in the default run.
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(real_text, tmp_path, caplog):
  config = tiny(**{'train.steps': 8, 'log_every': 4, 'checkpoint.every_steps': 4, 'checkpoint.keep': 5})
  train(config, str(tmp_path), source=real_text, tokenizer=ByteTokenizer())
  ckpt = tmp_path / 'checkpoints' / '8' / 'state'
  for root, _, files in os.walk(ckpt):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  config.train.steps = 10
  with caplog.at_level('ERROR'):
    resumed = train(config, str(tmp_path), source=real_text, tokenizer=ByteTokenizer())
  assert 'checkpoint at step 8 could not be restored' in caplog.text
  assert [h['step'] for h in resumed] == [8, 10]  # Resumed from step 4, re-ran 5..10.


def test_nan_loss_stops_with_a_clear_message(real_text, tmp_path):
  config = tiny(**{'train.lr': 1e30, 'train.warmup_steps': 0, 'train.clip_norm': 0.0, 'log_every': 1,
                   'train.steps': 10, 'checkpoint.every_steps': 1})
  with pytest.raises(FloatingPointError, match='last good checkpoint is step'):
    train(config, str(tmp_path), source=real_text, tokenizer=ByteTokenizer())


def test_freezing_the_shared_weights_trains_only_lora(real_text, tmp_path):
  config = tiny(**{'train.steps': 3, 'train.freeze_shared': True, 'log_every': 3})
  train(config, str(tmp_path), source=real_text, tokenizer=ByteTokenizer())
  cfg, _ = load_original(config, ByteTokenizer().get_vocab_size())
  initial, _ = initial_variables(config, cfg, recursion_config(config), None, make_mesh(), False)
  restored = ocp.StandardCheckpointer().restore(str(tmp_path / 'checkpoints' / '3' / 'state'))
  jax.tree.map(np.testing.assert_array_equal, restored['variables']['params'], jax.device_get(initial['params']))
  changed = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         restored['variables']['lora'], jax.device_get(initial['lora']))
  assert max(jax.tree.leaves(changed)) > 0


def test_gradient_accumulation_matches_the_full_batch(real_text, tmp_path):
  one = train(tiny(**{'train.steps': 2, 'log_every': 1}), str(tmp_path / 'a'), source=real_text,
              tokenizer=ByteTokenizer())
  two = train(tiny(**{'train.steps': 2, 'log_every': 1, 'train.grad_accum': 2}), str(tmp_path / 'b'),
              source=real_text, tokenizer=ByteTokenizer())
  for a, b in zip(one, two, strict=True):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=2e-3)


def _cli(workdir, *flags):
  return [sys.executable, '-m', 'experiments.train', '--config=experiments/configs/tiny_cpu.py',
          f'--workdir={workdir}', *flags]


def test_config_typo_is_one_line_naming_the_nearest_field(tmp_path):
  out = subprocess.run(_cli(tmp_path, '--config.recursion.lopps=3'), cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == ["train.py: --config.recursion.lopps: no field 'lopps' in "
                                             'config.recursion; did you mean --config.recursion.loops?']


@pytest.mark.parametrize('flags, expected', [
    (['--config.recursion.init=averge', '--config.loss.early_exit=agressive'],
     ["recursion: Unknown init method 'averge'", "Unknown loss.early_exit 'agressive'"]),
    (['--config.log_every=0', '--config.checkpoint.keep=0'], ['log_every=0, checkpoint.keep=0: must be']),
    (['stray'], ["unexpected positional arguments ['stray']"]),
    (['--config=experiments/configs/nope.py', '--only_check_args'], ['nope.py']),
])
def test_bad_config_values_fail_before_anything_is_written(tmp_path, flags, expected):
  workdir = tmp_path / 'run'
  out = subprocess.run(_cli(workdir, *flags), cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  for text in expected:
    assert text in out.stderr, out.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('signum', [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_saves_a_checkpoint_and_exits_as_interrupted(tmp_path, signum):
  proc = subprocess.Popen(_cli(tmp_path, '--config.train.steps=100000', '--config.log_every=1',
                               '--config.checkpoint.every_steps=100000', '--config.data.split=validation'),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 3):
    time.sleep(0.5)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err[-2000:]  # Interrupted, not finished: a scheduler can tell.
  assert 'rerun the same command to resume' in err
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert len(steps) == 1 and 3 <= steps[0] < 100000
