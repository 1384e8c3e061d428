"""scripts/accelerator_check.sh end to end on CPU in tiny mode (RRT_CHECK_TINY=1), so the prepared GPU/TPU check
cannot rot between the sessions that have an accelerator: every stage runs and lands in the one JSON."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_check_runs_in_tiny_mode(tmp_path):
  # The smollm2 stage is the main job with other budgets (tests/test_readme.py runs the main job itself): skipped
  # here to keep the slow set inside CI's time; the skip is recorded as such.
  env = {**os.environ, 'RRT_CHECK_TINY': '1', 'RRT_CHECK_SMOLLM2': '0', 'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run(['bash', 'scripts/accelerator_check.sh', str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=3600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  report = json.loads((tmp_path / 'accelerator_check.json').read_text())
  stages = report['stages']
  assert set(stages) == {'tests', 'train', 'plan', 'decode', 'smollm2'}
  assert stages.pop('smollm2')['status'] == 'skipped'
  assert all(s['status'] == 'ok' for s in stages.values()), {k: s['status'] for k, s in stages.items()}
  train = stages['train']['results']
  assert {'tiny/vanilla', 'tiny/recursive B=3', 'tiny/relaxed B=3 r=64'} <= set(train)
  assert all(train[k]['tokens_per_s'] > 0 and 0 < train[k]['mfu'] < 1 for k in train if k.startswith('tiny/'))
  assert stages['plan']['results']['peak_bytes'] > 0 and stages['plan']['results']['devices'] == 1
  assert stages['decode']['results']['results']['tiny'][0]['same_tokens']
  assert report['machine']['backend'] == 'cpu'
