"""Multi-device and multi-process training on emulated CPU devices (subprocesses: the device count is fixed
when jax starts)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch.local import commands, launch, start

# ~2.5 min of subprocesses with emulated devices: outside the default run; .ci/run runs the slow set after it.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=experiments/configs/tiny_cpu.py', '--config.log_every=1', '--config.data.split=validation',
        '--config.data.shards=2', '--config.loss.kd_weight=1.0']


def _single_process(workdir, *flags, devices=8):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  out = subprocess.run([sys.executable, '-m', 'experiments.train', *TINY, f'--workdir={workdir}', *flags],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


def test_two_processes_equal_one_process(tmp_path):
  steps = ['--config.train.steps=3', '--config.mesh.data=2', '--config.mesh.fsdp=4']
  _single_process(tmp_path / 'one', *steps)
  results = launch(2, 4, [*TINY, f'--workdir={tmp_path / "two"}', *steps], timeout=600)
  for r in results:
    assert r.returncode == 0, r.stderr[-3000:]
  one, two = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert sorted(one) == sorted(two) == [1, 2, 3]
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)


def test_restore_onto_a_different_mesh(tmp_path):
  base = ['--config.checkpoint.every_steps=3']
  _single_process(tmp_path / 'full', *base, '--config.train.steps=5', '--config.mesh.data=2',
                  '--config.mesh.fsdp=4')
  _single_process(tmp_path / 'moved', *base, '--config.train.steps=3', '--config.mesh.data=2',
                  '--config.mesh.fsdp=4')
  # Same run continued on a mesh of another shape (8-way data parallel, unsharded params).
  _single_process(tmp_path / 'moved', *base, '--config.train.steps=5', '--config.mesh.data=8',
                  '--config.mesh.fsdp=1')
  full, moved = _losses(tmp_path / 'full'), _losses(tmp_path / 'moved')
  assert sorted(moved) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([moved[s] for s in (4, 5)], [full[s] for s in (4, 5)], rtol=1e-5)


@pytest.mark.longest
def test_sigterm_to_one_process_of_two_stops_both_with_a_checkpoint(tmp_path):
  """A preempted host: only process 1 gets SIGTERM. Both agree on one step through JAX's preemption sync point, save
  it together and exit as interrupted within seconds; the rerun resumes with the uninterrupted run's losses."""
  steps = ['--config.mesh.data=2', '--config.mesh.fsdp=4', '--config.checkpoint.every_steps=1000']
  full = launch(2, 4, [*TINY, f'--workdir={tmp_path / "full"}', '--config.train.steps=12', *steps], timeout=600)
  assert all(r.returncode == 0 for r in full), full[0].stderr[-3000:]
  workdir = tmp_path / 'cut'
  procs = start(2, 4, [*TINY, f'--workdir={workdir}', '--config.train.steps=12', *steps])
  metrics, deadline = workdir / 'metrics.jsonl', time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 3):
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  signalled = time.time()
  errs = [p.communicate(timeout=120)[1] for p in procs]
  assert time.time() - signalled < 60, 'the processes took too long to stop'
  for p, err in zip(procs, errs, strict=True):
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
  saved = [int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 12, saved
  rerun = launch(2, 4, [*TINY, f'--workdir={workdir}', '--config.train.steps=12', *steps], timeout=600)
  assert all(r.returncode == 0 for r in rerun), rerun[0].stderr[-3000:]
  one, cut = _losses(tmp_path / 'full'), _losses(workdir)
  assert sorted(cut) == list(range(1, 13))
  np.testing.assert_allclose([cut[s] for s in range(1, 13)], [one[s] for s in range(1, 13)], rtol=1e-6)


def test_a_checkpoint_of_8_devices_loads_in_a_1_device_process(tmp_path):
  """The notebook case: variables only, onto this process's one device, whatever mesh wrote them."""
  from rrt_jax.checkpoint import load_training_checkpoint
  _single_process(tmp_path, '--config.train.steps=2', '--config.mesh.data=2', '--config.mesh.fsdp=4')
  assert jax.device_count() == 1
  model, variables, step = load_training_checkpoint(tmp_path)
  assert step == 2 and model.rec.loops == 2
  assert {x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(variables)} == {True}


def test_launcher_dry_run_prints_every_process():
  out = subprocess.run([sys.executable, '-m', 'launch.local', '--dry_run', '--processes=3', '--port=2222', '--',
                        '--config=x.py', '--workdir=/w'], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  for pid, line in enumerate(lines):
    assert 'XLA_FLAGS=--xla_force_host_platform_device_count=4' in line
    assert f'--config.distributed.process_id={pid}' in line and '127.0.0.1:2222' in line
  assert commands(2, 4, 1, 'm', [])[1][1][-1] == '--config.distributed.process_id=1'
