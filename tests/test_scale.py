"""Scale plumbing: the topology-aware mesh with a dcn axis, optimizer moments sharded as their variables, activation
sharding constraints, the memory plan against the compiled executable, per-chip MFU peaks, the plan CLI.
The 8-device checks run in one subprocess (tests/scale_checks.py): the device count is fixed when jax starts."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from rrt_jax.train import flops

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env() -> dict:
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          'PYTHONPATH': os.pathsep.join([HERE, ROOT, os.environ.get('PYTHONPATH', '')])}


@pytest.fixture(scope='module')
def checks() -> dict:
  out = subprocess.run([sys.executable, os.path.join(HERE, 'scale_checks.py')], env=_env(), capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_mesh_has_dcn_and_auto_axes(checks):
  mesh = checks['mesh']
  assert mesh['names'] == ['dcn', 'data', 'fsdp', 'tensor']
  assert mesh['shape'] == {'dcn': 1, 'data': 2, 'fsdp': 2, 'tensor': 2}
  assert mesh['dcn_shape'] == {'dcn': 2, 'data': 1, 'fsdp': 4, 'tensor': 1}
  assert mesh['axis_types'] == ['AxisType.Auto']
  assert mesh['batch_spec'] == "P(('dcn', 'data', 'fsdp'),)"
  assert mesh['dcn_slice0'] == [0, 1, 2, 3]


def test_optimizer_moments_are_sharded_like_their_variables(checks):
  # Left to sharding propagation, zeros_like(variables) came out replicated (every device held whole moments).
  assert checks['moments'] and all(same for _, same in checks['moments']), checks['moments']
  assert checks['device0']['optimizer'] < checks['full_params'], 'moments must not be whole on a device'


def test_plan_equals_the_compiled_run(checks):
  real, plan, device0 = checks['real'], checks['plan'], checks['device0']
  assert plan['temp'] == real['temp'] > 0
  for key in ('arguments', 'outputs', 'alias'):
    assert plan[key] == real[key], key
  for key in ('params', 'optimizer', 'teacher', 'batch'):
    assert plan[key] == device0[key], key
  # The arguments the executable takes are exactly the state, the teacher and the batch (and nothing whole).
  assert real['arguments'] == pytest.approx(plan['params'] + plan['optimizer'] + plan['teacher'] + plan['batch'],
                                            abs=64)
  assert plan['peak'] == real['arguments'] + real['outputs'] - real['alias'] + real['temp']


def test_activations_are_constrained(checks):
  assert checks['constraints']['residual'] > 0 and checks['constraints']['vocab'] > 0, checks['constraints']


def test_chip_table():
  device = lambda kind, platform='tpu': SimpleNamespace(device_kind=kind, platform=platform)  # noqa: E731
  assert flops.chip_of(device('TPU v4')).name == 'v4'
  assert flops.chip_of(device('TPU v5 lite')).name == 'v5e'
  assert flops.chip_of(device('TPU v5p')).name == 'v5p'
  assert flops.chip_of(device('TPU v6 lite')).name == 'v6e'
  assert flops.chip_of(device('NVIDIA H200', 'gpu')).name == 'H200'
  assert flops.chip_of(device('NVIDIA H100 80GB HBM3', 'gpu')).name == 'H100'
  assert flops.chip_of(device('cpu', 'cpu')) is None
  assert flops.peak_flops('float32', device('NVIDIA H200', 'gpu')) == (989e12, 'H200 spec bf16')
  peak, source = flops.peak_flops('float32', device('Some new chip', 'gpu'))  # Unknown: measured.
  assert peak > 1e8 and source.startswith('measured float32 matmul')
  assert flops.chip('v5e').hbm_bytes == 16 * 1024 ** 3
  with pytest.raises(ValueError, match='Unknown chip .*v5e'):
    flops.chip('v9')


def test_plan_cli_reports_fit(tmp_path):
  out = tmp_path / 'plan.json'
  run = subprocess.run([sys.executable, '-m', 'experiments.plan', '--config=experiments/configs/tiny_cpu.py',
                        '--devices=4', '--config.mesh.data=2', '--config.mesh.fsdp=-1', '--chips=v5e,H200',
                        f'--out={out}'], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  plan = json.loads(out.read_text())
  assert plan['devices'] == 4 and plan['mesh'] == {'dcn': 1, 'data': 2, 'fsdp': 2, 'tensor': 1}
  assert plan['fits'] == {'v5e': True, 'H200': True} and 0 < plan['peak_bytes'] < 1 << 30
  assert '| v5e | 16.0 | yes |' in run.stdout
  bad = subprocess.run([sys.executable, '-m', 'experiments.plan', '--config=experiments/configs/tiny_cpu.py',
                        '--config.mesh.data=-1'], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and '--devices=N' in bad.stderr
