"""experiments/repro_study.py: the tiny study end to end (and a rerun that skips every stage); the variant grid
(repro_grid) and the claim judge (repro_claims)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import repro_grid
from experiments.repro_claims import PerSeed, claims_text, format_claim, judge, judge_best, paper_claims
from experiments.repro_grid import Settings
from experiments.repro_report import flatness_text, late_drop_share, trailing_mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(workdir) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'experiments.repro_study', '--tiny', f'--workdir={workdir}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _stage_files(workdir) -> dict[str, int]:
  out = {}
  for sub in ('pretrain', 'converted', 'uptrained', 'eval'):
    for dirpath, _, names in os.walk(workdir / sub):
      if 'checkpoints' in dirpath:
        continue
      for name in names:
        if name.endswith(('.json', '.msgpack')):
          out[os.path.join(dirpath, name)] = os.stat(os.path.join(dirpath, name)).st_mtime_ns
  return out


@pytest.mark.slow  # ~60 s, the default run's longest test; the report logic has the fast tests below.
def test_tiny_study_end_to_end_then_a_rerun_skips_every_stage(tmp_path):
  workdir = tmp_path / 'study'
  first = _study(workdir)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  ran = [line for line in first.stdout.splitlines() if line.startswith('[run] ')]
  # Skipped the first time: the no-early-exit ablation's conversion, which is its base variant's.
  shared = [line for line in first.stdout.splitlines() if line.startswith('[skip] ')]
  assert len(shared) == 1 and shared[0].startswith('[skip] convert relaxed B=2 average+svd r=2, no early-exit loss')
  results = json.loads((workdir / 'results.json').read_text())

  groups = {row['group'] for row in results['rows']}
  assert groups == {'recursive', 'relaxed', 'reduced', 'scratch', 'no_early_exit'}
  names = [row['model'] for row in results['rows']]
  assert {'recursive B=2 stepwise', 'recursive B=2 average', 'relaxed B=2 average+svd r=2',
          'relaxed B=2 average+whitened_svd r=2', 'relaxed B=2 average+svd r=2, no early-exit loss'} <= set(names)
  assert any(n.startswith('reduced B=2') for n in names) and any(n.startswith('scratch B=2') for n in names)
  for row in results['rows']:
    assert sorted(row['seeds']) == ['0', '1'], row['model']
    loops = 1 if row['group'] in ('reduced', 'scratch') else 2
    for corpus in ('validation', 'austen'):
      sm = row['summary'][corpus]
      assert len(sm['bpb_mean']) == len(sm['bpb_std']) == len(sm['ppl_mean']) == loops
      for seed in row['seeds'].values():
        bpb, ppl = seed['eval'][corpus]['bpb'], seed['eval'][corpus]['ppl']
        assert all(math.isclose(b, math.log2(p)) for b, p in zip(bpb, ppl, strict=True))
  assert results['pretrain']['curve']['loss'] and results['vanilla']['validation']['bpb']
  claims = results['claims']
  assert claims and all(c['verdict'] in ('held', 'not held', 'not settled') and c['corpus'] in ('validation', 'austen')
                        for c in claims)
  kinds = {c['claim'].split(' (')[0] for c in claims}
  assert {'Stepwise is the best looping init without LoRA', 'The aggressive early-exit loss makes loop 1 usable',
          "The aggressive early-exit loss keeps the last loop's quality"} <= kinds
  for name in ('results.md', 'per_loop_bpb.png', 'uptraining_curves.png', 'pretrain_loss.png'):
    assert (workdir / name).stat().st_size > 0
  assert 'held' in (workdir / 'results.md').read_text()

  stages = _stage_files(workdir)
  before = (workdir / 'results.json').read_bytes()
  second = _study(workdir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert not [line for line in second.stdout.splitlines() if line.startswith('[run] ')]
  assert len([line for line in second.stdout.splitlines() if line.startswith('[skip] ')]) == len(ran) + 1
  assert f'stages: 0 run, {len(ran) + 1} skipped' in second.stdout
  assert _stage_files(workdir) == stages  # Nothing rewritten.
  assert (workdir / 'results.json').read_bytes() == before


def test_judge_held_not_held_and_std_units():
  c = judge('A beats B', [1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
  assert c['held'] and c['verdict'] == 'held'
  assert c['difference'] == pytest.approx(1.0) and c['std'] == pytest.approx(0.1) and c['z'] == pytest.approx(10.0)
  assert c['better_mean'] == pytest.approx(1.0) and c['worse_mean'] == pytest.approx(2.0) and c['n'] == [3, 3]

  c = judge('B beats A', [2.0, 2.1, 1.9], [1.0, 1.1, 0.9])
  assert not c['held'] and c['verdict'] == 'not held' and c['z'] == pytest.approx(-10.0)

  # Pooled std: sqrt((var_a + var_b) / 2), sample variances.
  c = judge('x', [1.0, 3.0], [4.0, 4.0])
  assert c['std'] == pytest.approx(math.sqrt((2.0 + 0.0) / 2)) and c['z'] == pytest.approx(2.0 / math.sqrt(1.0))


def test_judge_pairs_the_seeds():
  # The seeds move both sides together (a shared data order): pooled, the 0.1 gap is half a std; paired, it is
  # the same gap every seed.
  c = judge('x', [1.0, 1.2, 1.4], [1.1, 1.3, 1.5])
  assert c['z'] == pytest.approx(0.5) and c['paired_z'] is None  # The differences do not spread.
  assert c['verdict'] == 'not settled' and not c['held']  # Half a std: the seeds cannot order the two.
  c = judge('x', [1.0, 1.2, 1.4], [1.1, 1.32, 1.48])
  assert c['z'] < 1 and c['paired_z'] == pytest.approx(0.1 / 0.02)
  assert judge('x', [1.0, 1.2], [1.1, 1.3, 1.5])['paired_z'] is None  # Unequal seeds: nothing to pair.
  assert 'paired over seeds +5.0' in format_claim({**c, 'corpus': 'v', 'better_name': 'a', 'worse_name': 'b'})


def test_judge_non_inferiority_and_undefined_std():
  # 0.05 worse at a 0.1 std: not "better", but within one std, so "no worse" holds.
  worse_by_half_std = ([1.05, 1.15, 0.95], [1.0, 1.1, 0.9])
  assert judge('x', *worse_by_half_std)['verdict'] == 'not settled'
  assert judge('x', *worse_by_half_std, settled_std=0.4)['verdict'] == 'not held'
  c = judge('x', *worse_by_half_std, non_inferiority_std=1.0)
  assert c['held'] and c['z'] == pytest.approx(-0.5)
  assert not judge('x', [1.3, 1.4, 1.2], [1.0, 1.1, 0.9], non_inferiority_std=1.0)['held']  # 3 std worse.

  one_seed = judge('x', [1.0], [2.0])
  assert one_seed['held'] and one_seed['std'] is None and one_seed['z'] is None
  assert not judge('x', [2.0], [1.0], non_inferiority_std=1.0)['held']  # No std: "no worse" means not worse.
  no_spread = judge('x', [1.0, 1.0], [2.0, 2.0])
  assert no_spread['held'] and no_spread['std'] == 0.0 and no_spread['z'] is None
  json.dumps(no_spread, allow_nan=False)  # Undefined values are None: results.json stays strict JSON.
  with pytest.raises(ValueError):
    judge('x', [], [1.0])


def test_claims_text_counts_the_three_verdicts():
  ctx = dict(corpus='v', better_name='a', worse_name='b')
  claims = [judge('held', [1.0, 1.1, 0.9], [2.0, 2.1, 1.9], **ctx),
            judge('reversed', [2.0, 2.1, 1.9], [1.0, 1.1, 0.9], **ctx),
            judge('within noise', [1.0, 1.2, 1.4], [1.1, 1.3, 1.5], **ctx)]
  text = claims_text(claims)
  assert 'of 3, 1 held, 1 not held (reversed), 1 not settled' in text
  assert '- within noise [v]: **NOT SETTLED** (a 1.2000 vs b 1.3000 bpb; difference +0.1000 = +0.5 std)' in text


def test_judge_best_compares_with_the_runner_up():
  values = {'stepwise': [1.0, 1.2], 'average': [1.5, 1.7], 'lower': [1.3, 1.5]}
  c = judge_best('stepwise is best', 'stepwise', values)
  assert c['held'] and c['worse_name'] == 'lower' and c['difference'] == pytest.approx(0.3)
  c = judge_best('average is best', 'average', values)
  assert not c['held'] and c['worse_name'] == 'stepwise' and c['difference'] == pytest.approx(-0.5)


def _settings(**kw) -> Settings:
  base = dict(workdir='', tiny=False, preset='repro_7m', pretrain_steps=1, pretrain_batch=1, pretrain_lr=1e-3,
              pretrain_warmup=1, seq_len=8, uptrain_steps=1, batch=1, uptrain_lr=1e-3, eval_tokens=8, eval_batch=1,
              eval_converted=True, corpora=('validation',), calibration_tokens=8, loops=(2, 3),
              inits=('stepwise', 'average', 'lower'), relaxed_loops=3, ranks=(8, 32),
              lora_inits=('svd', 'whitened_svd', 'zero'), relaxed_other_inits=('stepwise', 'lower'), init_rank=8,
              baselines=('reduced', 'scratch'), no_early_exit_of='auto', seeds=(0, 1, 2), only=())
  return Settings(**{**base, **kw})


def test_the_default_grid_and_its_claims_on_synthetic_numbers():
  s = _settings()
  variants = repro_grid.variants(s, num_layers=12)
  names = [v.name for v in variants]
  assert len(names) == len(set(names)) == 6 + 8 + 4 + 1
  assert len({v.slug for v in variants}) == len(variants)
  assert 'reduced B=3 (4 layers, stepwise)' in names and 'relaxed B=3 lower+svd r=8' in names
  assert names[-1] == 'relaxed B=3 average+svd r=8, no early-exit loss'

  # Synthetic per-seed bpb: every claim in its paper direction except "higher rank is better" for zero init.
  bpb = {name: 2.0 for name in names}
  bpb.update({'recursive B=2 stepwise': 1.8, 'recursive B=3 stepwise': 1.9, 'relaxed B=3 average+svd r=8': 1.7,
              'relaxed B=3 average+svd r=32': 1.6, 'relaxed B=3 average+whitened_svd r=8': 1.75,
              'relaxed B=3 average+whitened_svd r=32': 1.65, 'relaxed B=3 average+zero r=32': 2.1})
  rows = []
  for v in variants:
    loops = 1 if v.one_loop else v.loops
    last = bpb[v.name.removesuffix(', no early-exit loss')]
    seeds = {str(i): {'eval': {'validation': {'bpb': [last + 0.5] * (loops - 1) + [last + 0.01 * i]}}}
             for i in range(3)}
    if v.group == 'no_early_exit':  # Without the early-exit loss: loop 1 much worse, the last loop the same.
      seeds = {str(i): {'eval': {'validation': {'bpb': [last + 2.0] * (loops - 1) + [last + 0.01 * i + 0.002]}}}
               for i in range(3)}
    rows.append({'model': v.name, 'seeds': seeds})
  claims = {c['claim']: c for c in paper_claims(PerSeed(rows), s, ('validation',))}
  not_held = sorted(k for k, c in claims.items() if not c['held'])
  assert not_held == ['A higher rank is better: rank trades parameters for quality (zero, r=8 -> 32)']
  assert claims['Stepwise is the best looping init without LoRA (B=2)']['z'] == pytest.approx(0.2 / 0.01)
  assert claims['Average + SVD is the best looping init with LoRA (B=3, r=8)']['held']
  assert claims["The aggressive early-exit loss keeps the last loop's quality (last-loop bpb)"]['held']
  assert claims['The aggressive early-exit loss makes loop 1 usable (loop-1 bpb)']['difference'] == pytest.approx(1.5)
  assert len([k for k in claims if k.startswith('Recursive (Stepwise')]) == 4


def test_trailing_mean_of_the_uptraining_curves():
  x = np.asarray([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 2.0, 2.0, 8.0, 8.0]])
  np.testing.assert_allclose(trailing_mean(x, 2), [[1.0, 1.5, 2.5, 3.5, 4.5], [2.0, 2.0, 2.0, 5.0, 8.0]])
  np.testing.assert_allclose(trailing_mean(x, 1), x)
  np.testing.assert_allclose(trailing_mean(x, 9)[:, -1], x.mean(1))


def test_late_drop_share_tells_flat_from_falling_curves():
  steps = np.arange(160)
  falling = np.stack([10.0 - 0.05 * steps, 10.2 - 0.05 * steps])  # Two seeds, a straight line down.
  flattened = np.stack([2.0 + 8.0 * np.exp(-steps / 10.0)] * 2)
  assert late_drop_share(falling) == pytest.approx(40 / 140)  # The last 40 of the 140 steps after the first window.
  assert late_drop_share(flattened) < 0.01
  assert math.isnan(late_drop_share(np.stack([1.0 + 0.01 * steps] * 2)))  # Rising: no drop to share.
  assert math.isnan(late_drop_share(np.ones((2, 4))))  # Too short to tell.
  rows = [{'model': 'flat', 'seeds': {'0': {'losses': flattened[0].tolist()}}},
          {'model': 'falling', 'seeds': {'0': {'losses': falling[0].tolist()}}}]
  assert 'steepest at the end: falling 29%, flat 0%' in flatness_text({'rows': rows})


def test_setup_line_ends_pretraining_on_the_mean_of_the_last_tenth():
  from experiments.repro_report import setup_line
  losses = [math.log(2) * 9.0] * 18 + [math.log(2) * 2.0, math.log(2) * 4.0]  # Bits 9 ... 9, 2, 4.
  pre = {'step': 20, 'tokens_per_step': 8, 'median_step_seconds': None, 'curve': {'loss': losses}}
  line = setup_line({'pretrain': pre, 'vanilla_params': 1e6}, _settings())
  assert 'final training loss 3.000 bits/byte (mean of the last 2 logged steps)' in line
