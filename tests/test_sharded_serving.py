"""Sharded serving on 8 emulated CPU devices: generate() and the Engine over a mesh give the unsharded outputs
(greedy tokens and exit loops), bad requests still get their errors alone, the step keeps the cache in place.
The serving runs in a subprocess (tests/sharded_serving.py): the device count is fixed when jax starts."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _serve(case: str) -> dict:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'PYTHONPATH': os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get('PYTHONPATH', '')])}
  out = subprocess.run([sys.executable, os.path.join(HERE, 'sharded_serving.py'), case], env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _same(run: dict, keys=('tokens', 'exit_loops')):
  for key in keys:
    assert run['sharded'][key] == run['plain'][key], key


def _check_engine(engine: dict):
  _same(engine, ('tokens', 'exit_loops', 'errors', 'tokens_served'))
  errors = engine['sharded']['errors']
  assert [e is None for e in errors] == [True, False, True, True, False, True, False, True]
  assert 'empty' in errors[1] and 'outside the vocabulary' in errors[4] and 'max_len is 64' in errors[6]
  assert all(engine['sharded']['tokens'][i] == [] for i in (1, 4, 6))
  assert {e for loops in engine['sharded']['exit_loops'] for e in loops} == {1, 2, 3}, 'exit loops must mix'
  assert engine['sharded']['step_compiles'] == 1, 'a step got other shardings than the one before'
  assert engine['placement']['cache_kept'] and engine['placement']['h_kept']


def test_sharded_serving_equals_unsharded():
  """Mesh data=4 x tensor=2, where everything divides: 4 rows / slots over data, heads and kv_heads over tensor."""
  r = _serve('quick')
  assert r['logits_diff'] < 1e-4
  _same(r['generate'])
  assert len({e for loops in r['generate']['sharded']['exit_loops'] for e in loops}) > 1, 'exit loops must mix'
  _check_engine(r['engine'])
  placement = r['engine']['placement']
  assert placement['cache'] == [3, 2, 4, 2, 64, 16] and placement['cache_shard'] == [3, 2, 1, 1, 64, 16]
  assert r['warnings'] == []


@pytest.mark.slow
def test_sharded_serving_where_sizes_do_not_divide():
  """Mesh data=2 x tensor=4: 3 rows / slots and kv_heads=2 stay whole where they do not divide (one warning
  each), and the outputs are still the unsharded ones; sequence-wise engine; MIDDLE_CYCLE through generate()."""
  r = _serve('uneven')
  assert r['cache_spec'] == [None] * 6
  _same(r['generate'])
  _same(r['middle_cycle'])
  _check_engine(r['engine'])
  assert r['engine']['placement']['cache_shard'] == r['engine']['placement']['cache']
  assert any('batch=3 does not split over mesh data=2' in w for w in r['warnings'])
  assert any('kv=2 does not split over mesh tensor=4' in w for w in r['warnings'])
