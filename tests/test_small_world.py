"""experiments/small_world.py: the students' sizes against the budget, the flatness and goal judges, and the tiny
study end to end (slow), with a rerun that skips every stage and a rerun with other flags that is refused."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import small_world as sw
from experiments import small_world_report as swr
from rrt_jax import RecursionConfig, presets
from rrt_jax.model import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = presets.SMALL_WORLD_1M


def _settings(**kw) -> sw.Settings:
  base = dict(workdir='', tiny=False, vocab=4096, tokenizer_docs=0, preset='small_world_1m', seq_len=128,
              pretrain_steps=1, pretrain_batch=1, pretrain_lr=1e-3, pretrain_warmup=1, flat_share=0.02,
              student_share=0.5, size_slack=0.1, loops=(2, 3), middle_loops=(4,), init='average',
              lora_init='whitened_svd', baselines=('reduced', 'low_rank'), calibration_tokens=256, uptrain_steps=1,
              batch=1, uptrain_lr=1e-3, exit_alpha=0.1, seeds=(0,), corpora=('validation',),
              eval_tokens=1, eval_batch=1, serve_seed=0, serve_slots=1, serve_requests=1,
              serve_prompt_len=1, serve_decode_len=1,
              thresholds=(1.0,), min_agreement=0.9, max_ppl_increase=0.05, serve_eval_tokens=1, serve_repeats=1,
              spec_batches=(1,), spec_draft_lens=(2,), spec_new_tokens=1, spec_repeats=1)
  return sw.Settings(**{**base, **kw})


def test_students_are_half_the_teacher_within_the_slack():
  s = _settings()
  teacher = count_params(CFG, RecursionConfig()).non_embedding
  limit = sw.budget(s, CFG)
  assert limit == int(teacher * 0.55)
  students = sw.students(s, CFG)
  assert [st.group for st in students] == ['relaxed', 'relaxed', 'middle', 'reduced', 'low_rank']
  for st in students:
    size = sw.non_embedding(s, CFG, st)
    assert 0.45 * teacher <= size <= limit, (st.name, size, teacher)
    if st.group in ('relaxed', 'middle'):  # The largest rank that fits.
      assert sw.non_embedding(s, CFG, dataclasses.replace(st, rank=st.rank + 1)) > limit
      assert sw.recursion(s, st).lora_init == 'whitened_svd' and sw.recursion(s, st).init == 'average'
  reduced = next(st for st in students if st.group == 'reduced')
  assert sw.student_config(CFG, reduced).num_layers == CFG.num_layers // 2


def test_students_that_cannot_fit_get_a_clear_error():
  with pytest.raises(ValueError, match='--loops=4: must divide'):
    sw.students(_settings(loops=(4,)), CFG)
  with pytest.raises(ValueError, match='even at LoRA rank 1: raise --size_slack'):
    sw.students(_settings(loops=(2,), size_slack=0.0, middle_loops=()), CFG)


def test_flatness_is_the_late_share_of_the_drop():
  steps = np.arange(400)
  assert sw.curve_flatness(3 + 2 * np.exp(-steps / 20), 0.02)['flat']  # Converged early.
  falling = sw.curve_flatness(5 - steps / 400, 0.02)  # Still falling at the same rate: ~a quarter of the drop.
  assert not falling['flat'] and 0.2 < falling['late_drop_share'] < 0.3
  assert sw.curve_flatness([1.0, 2.0], 0.02) == {'late_drop_share': None, 'flat': False}  # Too short to tell.


def _results(student_ppl: list[list[float]], baseline_ppl: list[list[float]], speedup: float) -> dict:
  def row(name, group, ppl):
    seeds = {str(i): {'eval': {'validation': {'ppl': p}}, 'losses': []} for i, p in enumerate(ppl)}
    return {'model': name, 'group': group, 'seeds': seeds, 'flatness': {'flat': True, 'late_drop_share': 0.01}}
  spec = [{'batch': 1, 'draft_len': 3, 'exact': True, 'speedup_vs_generate': speedup,
           'speedup_vs_greedy_on_device': speedup, 'acceptance_rate': 0.5}]
  return {'pretrain': {'chinchilla': {'tokens_per_param': 12.0}, 'flatness': {'flat': True, 'late_drop_share': 0.01}},
          'teacher': {'validation': {'ppl': [10.0]}},
          'rows': [row('student', 'relaxed', student_ppl), row('reduced', 'reduced', baseline_ppl)],
          'serving': {'selection': {'student': {'early_exit_tried': True, 'early_exit_qualified': True,
                                                'speedup_vs_vanilla_csb': speedup, 'batching': 'CDB',
                                                'threshold': 0.8, 'agreement': 0.95, 'perplexity_vs_no_exit': 1.02}}},
          'speculation': {'models': {'student': spec}}}


def test_goals_judge_ratio_baselines_and_speed():
  s = _settings(corpora=('validation',))
  good = {g['goal']: g['held'] for g in swr.goals(_results([[20, 11.0], [20, 11.2], [20, 11.1]],
                                                          [[12.0], [12.3], [12.1]], 1.6), s)}
  assert all(good.values()), good
  bad = {g['goal']: g['held'] for g in swr.goals(_results([[20, 12.0], [20, 12.5], [20, 11.8]],
                                                         [[12.0], [12.3], [12.1]], 1.2), s)}
  assert not bad['student within 1.15x of the teacher\'s perplexity [validation]']  # 1.21x.
  assert not bad["student beats reduced beyond the seeds' std [validation]"]  # Within the seeds' spread.
  assert not bad['student: CDB >= 1.5x vanilla + CSB at matched quality']
  assert not bad['student: self-speculation >= 1.3x at batch 1 (lossless)']
  assert bad['teacher curve flat (last quarter < 2% of the drop)']


def _study(workdir, *extra) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'experiments.small_world', '--tiny', f'--workdir={workdir}', *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.longest
def test_tiny_study_end_to_end_then_a_rerun_skips_every_stage(tmp_path):
  workdir = tmp_path / 'small_world'
  first = _study(workdir)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert ' 0 skipped' in first.stdout
  for name in ('results.json', 'results.md', 'pretrain_loss.png', 'per_loop_ppl.png', 'uptraining_curves.png',
               'tokenizer/tokenizer.json'):
    assert (workdir / name).stat().st_size > 0, name
  results = json.loads((workdir / 'results.json').read_text())
  assert results['tokenizer']['vocab_size'] == 320 and results['tokenizer']['bytes_per_token'] > 1
  teacher = results['teacher']
  for corpus in ('validation', 'austen'):
    assert len(teacher[corpus]['ppl']) == 1 and 1 < teacher[corpus]['ppl'][0] < 3 * 320  # 8 steps: maybe not < uniform.
  assert [r['group'] for r in results['rows']] == ['relaxed', 'relaxed', 'middle', 'reduced', 'low_rank']
  loops = {'relaxed': None, 'middle': 4, 'reduced': 1, 'low_rank': 1}
  for row in results['rows']:
    assert sorted(row['seeds']) == ['0', '1']
    want = loops[row['group']] or row['spec']['loops']
    for corpus in ('validation', 'austen'):
      mean, std = row['summary'][corpus]['ppl_mean'], row['summary'][corpus]['ppl_std']
      assert len(mean) == len(std) == want, row['model']
      assert all(math.isfinite(m) and 1 < m < 3 * 320 for m in mean) and all(d >= 0 for d in std)
  served = [r['model'] for r in results['rows'] if r['group'] == 'relaxed']
  assert set(results['serving']['selection']) == {'vanilla (teacher)', *served}
  drafting = [r['model'] for r in results['rows'] if r['group'] in ('relaxed', 'middle')]  # Loop 1 drafts.
  assert set(results['speculation']['models']) == set(drafting) and len(drafting) == 3
  for rows in results['speculation']['models'].values():
    assert rows and all(r['exact'] for r in rows)  # Lossless: every decode reproduced generate's tokens.
    assert {r['batch'] for r in rows} == {1, 2}
  goal_names = [g['goal'] for g in results['goals']]
  assert any('within 1.15x' in g for g in goal_names) and any('self-speculation' in g for g in goal_names)
  assert '## Goals' in (workdir / 'results.md').read_text()

  again = _study(workdir)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert ' 0 run,' in again.stdout and '[run]' not in again.stdout
  assert json.loads((workdir / 'results.json').read_text())['rows'][0]['summary'] == results['rows'][0]['summary']

  other = _study(workdir, '--uptrain_steps=4')
  assert other.returncode != 0 and 'made with other settings than this run' in other.stderr


def test_a_non_default_exit_alpha_is_a_stage_input(tmp_path):
  """Uptraining, serving and speculation record --exit_alpha when it is not the paper's 0.1, so a workdir never
  mixes students trained with different exit weights; at 0.1 the inputs are those of workdirs made before it."""
  paper = sw.SmallWorld(_settings(workdir=str(tmp_path)))
  varied = sw.SmallWorld(_settings(workdir=str(tmp_path), exit_alpha=1.0))
  assert paper.exit_inputs() == {} and varied.exit_inputs() == {'exit_alpha': 1.0}
  for inputs in ('serving_inputs', 'speculation_inputs'):
    assert 'exit_alpha' not in getattr(paper, inputs)([])
    assert getattr(varied, inputs)([])['exit_alpha'] == 1.0
