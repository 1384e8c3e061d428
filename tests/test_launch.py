"""Launchers: the TPU pod and GPU node dry runs print the right commands, bad flags fail with clear errors, and
--execute runs the commands (against a stand-in gcloud, curl and train module: no cloud, no GPU needed)."""

import json
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

from launch import gpu_node, tpu_pod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = ['--project=my-proj', '--zone=us-central2-b', '--workdir=gs://my-bucket/runs/r1']


def _script(path, body: str) -> None:
  path.write_text('#!/usr/bin/env bash\n' + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_bin(tmp_path):
  """A bin/ first on PATH with a gcloud that logs its arguments (and fails if FAKE_GCLOUD_RC is set)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _script(bin_dir / 'gcloud', f'echo "$*" >> {tmp_path}/gcloud.log\nexit "${{FAKE_GCLOUD_RC:-0}}"\n')
  return bin_dir


def _cli(module, *args, bin_dir=None, extra_env=None):
  env = {**os.environ, **(extra_env or {})}
  if bin_dir is not None:
    env['PATH'] = f'{bin_dir}{os.pathsep}{env["PATH"]}'
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=60)


def _commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith('#')]


def _flag(argv, name):
  return next(a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}='))


def test_tpu_dry_run_prints_every_step_and_runs_nothing(fake_bin, tmp_path):
  out = _cli('launch.tpu_pod', *POD, '--accelerator_type=v5litepod-16', '--version=v2-alpha-tpuv5-lite',
             '--data_dir=gs://my-bucket/data', '--steps=delete,train,create,setup,stage_data', '--',
             '--config.train.steps=7', bin_dir=fake_bin)
  assert out.returncode == 0, out.stderr
  assert not (tmp_path / 'gcloud.log').exists()  # Dry run is the default.
  create, archive, scp, setup, stage, train, delete = _commands(out.stdout)
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'rrt-jax']
  assert '--accelerator-type=v5litepod-16' in create and '--version=v2-alpha-tpuv5-lite' in create
  for cmd in (create, scp, setup, stage, train, delete):
    assert '--zone=us-central2-b' in cmd and '--project=my-proj' in cmd
  assert archive[:4] == ['git', '-C', ROOT, 'archive'] and archive[-1] == 'HEAD'
  assert scp[4] == 'scp' and '--worker=all' in scp
  assert '--worker=all' in setup and 'pip install -q -c constraints.txt -e ".[tpu]"' in _flag(setup, 'command')
  assert '--worker=0' in stage and 'gcloud storage rsync -r $HOME/.cache/rrt_jax/tfds gs://my-bucket/data/tfds' in (
      _flag(stage, 'command'))
  assert '--worker=all' in train
  script = _flag(train, 'command')
  assert ('.venv/bin/python -m experiments.train --config=experiments/configs/smollm2.py:b3_r64_average '
          '--workdir=gs://my-bucket/runs/r1 --config.distributed.coordinator=$coord:8476 '
          '--config.distributed.num_processes=$n --config.distributed.process_id=$id --config.train.steps=7') in script
  assert 'gcloud storage rsync -r gs://my-bucket/data/tfds $HOME/.cache/rrt_jax/tfds' in script
  assert delete[4:7] == ['delete', 'rrt-jax', '--quiet']


def test_tpu_train_script_takes_jax_distributed_settings_from_the_metadata(fake_bin, tmp_path):
  """Runs the train step's host script with bash: a stand-in metadata server (curl) and train entry point."""
  (cmd,) = _commands(_cli('launch.tpu_pod', *POD, '--steps=train', '--config=experiments/configs/tiny_cpu.py',
                          '--', '--config.train.steps=3').stdout)
  _script(fake_bin / 'curl', 'case "$*" in\n  *agent-worker-number*) echo 2;;\n'
          '  *worker-network-endpoints*) echo w0:a:10.0.0.5,w1:b:10.0.0.6,w2:c:10.0.0.7,w3:d:10.0.0.8;;\n'
          '  *) exit 22;;\nesac\n')
  home = tmp_path / 'home'
  (home / 'rrt_jax' / '.venv' / 'bin').mkdir(parents=True)
  _script(home / 'rrt_jax' / '.venv' / 'bin' / 'python', 'printf "%s\\n" "$@"\n')
  out = subprocess.run(['bash', '-c', _flag(cmd, 'command')], capture_output=True, text=True, timeout=30,
                       env={**os.environ, 'HOME': str(home), 'PATH': f'{fake_bin}{os.pathsep}{os.environ["PATH"]}'})
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      '-m', 'experiments.train', '--config=experiments/configs/tiny_cpu.py', '--workdir=gs://my-bucket/runs/r1',
      '--config.distributed.coordinator=10.0.0.5:8476', '--config.distributed.num_processes=4',
      '--config.distributed.process_id=2', '--config.train.steps=3']


def test_tpu_git_source_spot_and_detach():
  cmds = tpu_pod.plan(tpu_pod.PodOptions('p', 'europe-west4-a', 'gs://bkt/run', source='git', spot=True, detach=True,
                                         git_url='https://example.com/rrt_jax.git', git_ref='v1'), [])
  assert [c.step for c in cmds] == ['create', 'setup', 'train']  # No archive + scp with git.
  assert cmds[0].argv[-1] == '--spot'
  assert 'git clone --depth=1 --branch=v1 https://example.com/rrt_jax.git $HOME/rrt_jax' in cmds[1].argv[-3]
  assert _flag(cmds[2].argv, 'command').endswith('> train.log 2>&1 &')


@pytest.mark.parametrize('changes, train_args, message', [
    ({'project': ''}, [], '--project is required'),
    ({'zone': 'uscentral2'}, [], 'is not a zone'),
    ({'workdir': '/tmp/run'}, [], 'must be a folder in a GCS bucket'),
    ({'workdir': 'gs://my-bucket'}, [], 'must be a folder in a GCS bucket'),
    ({'accelerator_type': 'tpu-32'}, [], 'is not a TPU type'),
    ({'steps': ('create', 'launch')}, [], 'choose from create, setup, stage_data, train, delete'),
    ({'config': 'experiments/configs/nope.py:b2'}, [], 'is not a file under the repo root'),
    ({'source': 'git'}, [], 'needs --git_url'),
    ({'steps': ('stage_data',)}, [], 'needs --data_dir'),
    ({'data_dir': '/data'}, [], 'must be a gs:// path'),
    ({'detach': True, 'steps': ('train', 'delete')}, [], 'would delete the TPU while it trains'),
    ({'remote_dir': '/opt/rrt'}, [], 'relative to $HOME'),
    ({'coordinator_port': 80}, [], 'must be in 1024..65535'),
    ({}, ['--workdir=/elsewhere'], 'clash with what the launcher sets'),
    ({}, ['--config.distributed.process_id=0'], 'clash with what the launcher sets'),
])
def test_tpu_bad_options_are_reported(changes, train_args, message):
  options = tpu_pod.PodOptions(**{'project': 'p', 'zone': 'us-central2-b', 'workdir': 'gs://bkt/run', **changes})
  with pytest.raises(ValueError, match=message.replace('$', r'\$').replace('.', r'\.')):
    tpu_pod.plan(options, train_args)


def test_tpu_cli_errors_and_execute(fake_bin, tmp_path):
  missing = _cli('launch.tpu_pod', '--zone=us-central2-b', '--workdir=gs://bkt/run', bin_dir=fake_bin)
  assert missing.returncode != 0 and 'launch.tpu_pod: --project is required' in missing.stderr
  deleted = _cli('launch.tpu_pod', *POD, '--steps=delete', '--nodry_run', bin_dir=fake_bin)
  assert deleted.returncode == 0, deleted.stderr
  assert (tmp_path / 'gcloud.log').read_text() == (
      'compute tpus tpu-vm delete rrt-jax --quiet --zone=us-central2-b --project=my-proj\n')
  failed = _cli('launch.tpu_pod', *POD, '--steps=delete', '--execute', bin_dir=fake_bin,
                extra_env={'FAKE_GCLOUD_RC': '3'})
  assert failed.returncode != 0 and 'Step delete failed' in failed.stderr


def test_gpu_dry_runs():
  args = ['--', '--config=experiments/configs/tiny_cpu.py', '--workdir=/w']
  per_gpu = _cli('launch.gpu_node', '--mode=per_gpu', '--gpus=0,1,3', '--port=2345', *args)
  assert per_gpu.returncode == 0, per_gpu.stderr
  prepare, *lines = per_gpu.stdout.strip().splitlines()
  assert prepare.startswith('JAX_PLATFORMS=cpu ') and 'build()' in prepare  # Once, before the processes.
  assert len(lines) == 3
  for pid, (line, gpu) in enumerate(zip(lines, '013', strict=True)):
    assert line.startswith(f'JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES={gpu} {sys.executable} -m experiments.train '
                           '--config=experiments/configs/tiny_cpu.py --workdir=/w ')
    assert line.endswith('--config.distributed.coordinator=127.0.0.1:2345 --config.distributed.num_processes=3 '
                         f'--config.distributed.process_id={pid}')
  single = _cli('launch.gpu_node', '--gpus=0,1', *args)
  assert single.stdout.strip() == (f'JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=0,1 {sys.executable} -m experiments.train '
                                   '--config=experiments/configs/tiny_cpu.py --workdir=/w')


@pytest.mark.parametrize('mode, gpus, port, args, message', [
    ('single', [], 0, [], 'No GPUs'),
    ('single', ['0', 'gpu1'], 0, [], 'not CUDA device indices'),
    ('per_gpu', ['0', '1', '0'], 0, [], 'names a GPU twice'),
    ('per_gpu', ['0'], 70000, [], 'must be in 0..65535'),
    ('per_gpu', ['0', '1'], 0, ['--config.distributed.num_processes=4'], 'sets --config.distributed'),
    ('ring', ['0'], 0, [], 'choose one of single, per_gpu'),
])
def test_gpu_bad_options_are_reported(mode, gpus, port, args, message):
  with pytest.raises(ValueError, match=message):
    gpu_node.validate(mode, gpus, port, args)


def test_gpu_cli_errors_and_gpu_detection(fake_bin, monkeypatch):
  _script(fake_bin / 'nvidia-smi', 'echo "GPU 0: NVIDIA H100 (UUID: GPU-a)"; echo "GPU 1: NVIDIA H100 (UUID: GPU-b)"\n')
  monkeypatch.setenv('PATH', f'{fake_bin}{os.pathsep}{os.environ["PATH"]}')
  assert gpu_node.detect_gpus() == ['0', '1']
  bad = _cli('launch.gpu_node', '--mode=ring')
  assert bad.returncode != 0 and 'mode' in bad.stderr
  dup = _cli('launch.gpu_node', '--gpus=2,2')
  assert dup.returncode != 0 and 'launch.gpu_node: --gpus=2,2 names a GPU twice' in dup.stderr


def test_gpu_execute_starts_one_process_per_gpu_and_stops_the_rest_on_failure(tmp_path):
  (tmp_path / 'fake_train.py').write_text(
      'import json, os, sys, time\n'
      "pid = next((a.split('=')[1] for a in sys.argv if 'process_id=' in a), 'single')\n"
      "with open(os.path.join(os.environ['FAKE_OUT'], pid + '.json'), 'w') as f:\n"
      "  json.dump({'cuda': os.environ['CUDA_VISIBLE_DEVICES'], 'argv': sys.argv[1:]}, f)\n"
      "if '--fail' in sys.argv:\n"
      "  sys.exit(3) if pid == '1' else time.sleep(60)\n")
  env = {'PYTHONPATH': str(tmp_path), 'FAKE_OUT': str(tmp_path)}
  ok = _cli('launch.gpu_node', '--execute', '--mode=per_gpu', '--gpus=4,5', '--module=fake_train',
            '--noprepare_data', '--', '--x=1', extra_env=env)
  assert ok.returncode == 0, ok.stderr
  for pid, gpu in enumerate('45'):
    got = json.loads((tmp_path / f'{pid}.json').read_text())
    assert got['cuda'] == gpu and got['argv'][0] == '--x=1'
    assert got['argv'][-1] == f'--config.distributed.process_id={pid}'
  start = time.perf_counter()
  failed = _cli('launch.gpu_node', '--execute', '--mode=per_gpu', '--gpus=0,1', '--module=fake_train',
                '--noprepare_data', '--', '--fail', extra_env=env)
  assert failed.returncode == 3 and time.perf_counter() - start < 30  # Process 0 was stopped, not waited for.
  assert 'process 0: exit stopped' in failed.stderr or 'process 0: exit -15' in failed.stderr


def test_the_tpu_extra_brings_the_gcs_clients():
  """The hosts install `.[tpu]`; gs:// workdirs need gcsfs (epath) and google-cloud-storage (Orbax)."""
  import tomllib
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    tpu = tomllib.load(f)['project']['optional-dependencies']['tpu']
  from packaging.requirements import Requirement
  names = {Requirement(dep).name for dep in tpu}
  assert {'jax', 'gcsfs', 'google-cloud-storage'} <= names
  plan = tpu_pod.plan(tpu_pod.PodOptions(project='p', zone='us-central2-b', workdir='gs://bkt/run'), [])
  assert '.[tpu]' in ' '.join(arg for c in plan for arg in c.argv)
