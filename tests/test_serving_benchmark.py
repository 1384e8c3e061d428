"""The honest serving benchmark: the matched-quality threshold rule, bf16 serving, the HF anchor's weights, the
bandwidth bound's byte count, and the CLI end to end in its tiny mode."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.hf_anchor import decode_bytes_per_token, hf_llama
from experiments.serving_benchmark import precision_rows, select_thresholds, selection_markdown
from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.model import init_cache, init_variables
from rrt_jax.serve.precision import cast_for_serving

CFG = presets.TINY_LLAMA


def _row(model, threshold, batching, tok_s, agreement, ppl):
  return {'model': model, 'threshold': threshold, 'batching': batching, 'decode_tokens_per_s': tok_s,
          'agreement': agreement, 'early_exit_perplexity': ppl}


ROWS = [
    _row('vanilla', 1.0, 'CSB', 100.0, 1.0, 20.0),
    _row('rec', 1.0, 'CSB', 80.0, 1.0, 30.0), _row('rec', 1.0, 'CDB', 81.0, 1.0, 30.0),
    _row('rec', 0.9, 'CSB', 110.0, 0.95, 31.0), _row('rec', 0.9, 'CDB', 120.0, 0.95, 31.0),
    _row('rec', 0.7, 'CDB', 150.0, 0.89, 31.0),  # Fastest, but agrees on < 90 %.
    _row('rec', 0.5, 'CDB', 170.0, 0.97, 31.6),  # Agrees, but perplexity +5.3 %.
    _row('rec', 0.8, 'CDB', 130.0, 0.90, 31.5),  # Both exactly at the limits: qualifies, and is the fastest.
    _row('bad', 1.0, 'CSB', 50.0, 1.0, 10.0), _row('bad', 1.0, 'CDB', 55.0, 1.0, 10.0),
    _row('bad', 0.5, 'CDB', 90.0, 0.2, 10.1), _row('bad', 0.3, 'CDB', 99.0, 0.99, float('nan')),
    _row('slow', 1.0, 'CSB', 60.0, 1.0, 10.0), _row('slow', 0.9, 'CDB', 58.0, 1.0, 10.0),  # Exit qualifies, slower.
]


def test_selection_picks_the_fastest_threshold_that_keeps_quality():
  sel = select_thresholds(ROWS)
  rec = sel['rec']
  assert (rec['threshold'], rec['batching'], rec['decode_tokens_per_s']) == (0.8, 'CDB', 130.0)
  assert rec['early_exit_qualified'] and rec['qualifying_thresholds'] == [0.9, 0.8]
  assert rec['no_exit_perplexity'] == 30.0 and rec['perplexity_vs_no_exit'] == pytest.approx(1.05)
  # Nothing qualifies (low agreement; a NaN perplexity never passes): the fastest no-exit row, flagged.
  bad = sel['bad']
  assert (bad['threshold'], bad['batching'], bad['early_exit_qualified']) == (1.0, 'CDB', False)
  assert bad['qualifying_thresholds'] == []
  assert sel['vanilla']['threshold'] == 1.0 and not sel['vanilla']['early_exit_tried']
  slow = sel['slow']
  assert (slow['threshold'], slow['early_exit_qualified'], slow['qualifying_thresholds']) == (1.0, True, [0.9])
  text = selection_markdown(sel)
  assert '| rec | 0.8 | CDB | 130.0 |' in text and 'No early-exit threshold met the rule for: bad (' in text


def test_selection_rule_is_configurable_and_needs_a_reference():
  loose = select_thresholds(ROWS, min_agreement=0.85, max_ppl_increase=0.06)
  assert loose['rec']['threshold'] == 0.5  # 170 tok/s now qualifies.
  with pytest.raises(ValueError, match='no no-exit'):
    select_thresholds([_row('x', 0.5, 'CDB', 1.0, 1.0, 1.0)])


def test_bf16_serving_casts_parameters_and_cache():
  rec = RecursionConfig(loops=3, lora_rank=4)
  variables = init_variables(CFG, rec, jax.random.key(0))
  model, low = cast_for_serving(Decoder(CFG, rec), variables, 'bfloat16')
  assert model.cfg.dtype == model.cfg.param_dtype == 'bfloat16' and model.rec == rec
  assert {x.dtype for x in jax.tree.leaves(low)} == {jnp.dtype('bfloat16')}
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype('float32')}  # Input untouched.
  assert init_cache(model.cfg, rec, 1, 8)['k'].dtype == jnp.bfloat16
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 12)))
  full, _ = Decoder(CFG, rec).apply(variables, tokens)
  half, _ = model.apply(low, tokens)
  assert half.dtype == jnp.float32 and np.abs(np.asarray(half - full)).max() < 0.1  # The engine: the CLI test.


def test_precision_rows_pair_bf16_with_fp32():
  row = lambda name, t, tok_s, ppl, tokens: {'model': name, 'batching': 'CSB', 'threshold': t, 'dtype': 'x',  # noqa: E731
                                             'decode_tokens_per_s': tok_s, 'early_exit_perplexity': ppl,
                                             'tokens': tokens}
  rows = [row('m', 1.0, 10.0, 20.0, [[1, 2, 3, 4]]), row('m [bf16]', 1.0, 15.0, 20.2, [[1, 2, 9, 4]]),
          row('m', 0.5, 12.0, 21.0, [[1]]), row('other', 1.0, 1.0, 1.0, [[1]])]
  (p,) = precision_rows(rows, {'m [bf16]': 'm'})
  assert (p['model'], p['threshold'], p['speed_ratio']) == ('m', 1.0, 1.5)
  assert p['perplexity_change'] == pytest.approx(0.01) and p['agreement_with_fp32'] == 0.5  # Prefix agreement.


def test_hf_anchor_holds_our_weights():
  import torch
  for cfg in (CFG, CFG.replace(tie_embeddings=True)):
    variables = init_variables(cfg, RecursionConfig(), jax.random.key(1))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
    ours, _ = Decoder(cfg).apply(variables, jnp.asarray(tokens))
    with torch.no_grad():
      theirs = hf_llama(cfg, variables)(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_decode_bytes_count_every_loop_and_the_cache():
  rec = RecursionConfig(loops=3, lora_rank=4)
  variables = init_variables(CFG, rec, jax.random.key(0))
  got = decode_bytes_per_token(CFG, rec, variables, context=10)
  d, v, f = CFG.d_model, CFG.vocab_size, 4
  layer = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(variables['params']['stack'])) * f  # One layer.
  lora = sum(x.size for x in jax.tree.leaves(variables['lora'])) * f
  shared = layer * 2  # K = 6 / 3 layers.
  assert got['param_bytes'] == 3 * (shared + lora // 3 + d * v * f) + d * f + d * f  # + final norm + one row.
  assert got['kv_cache_bytes'] == 2 * 3 * 2 * 10 * CFG.num_kv_heads * CFG.head_dim * f


@pytest.mark.slow  # ~1.5 min on 2 CPU cores: 13 engine compilations, perplexity, stage timings, torch.
def test_cli_tiny_end_to_end(tmp_path):
  """The whole CLI on a random tiny Llama: headline, bf16 (engine included), anchors and bound in results.md /
  results.json."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, '-m', 'experiments.bench_serve', '--tiny', f'--workdir={tmp_path}', '--requests=2',
         '--prompt_len=8', '--decode_len=3', '--slots=1', '--loops=2', '--ranks=', '--thresholds=0.02',
         '--repeats=1', '--eval_tokens=32', '--bandwidth_mb=8', '--bf16', '--hf_threads=1']
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results['selection']) == {'vanilla', 'recursive B=2', 'vanilla [bf16]', 'recursive B=2 [bf16]'}
  assert results['command'].startswith('python -m experiments.bench_serve --tiny') and results['machine']
  assert {p['model'] for p in results['bf16_vs_fp32']} == {'vanilla', 'recursive B=2'}
  assert [(a['system'][:2], a['batch']) for a in results['anchors']] == [('ou', 1), ('HF', 1)]
  assert results['anchors'][1]['agreement_with_ours'] == 1.0  # Same weights, greedy: the same tokens.
  assert all(b['bound_s'] > 0 for b in results['bandwidth_bound'])
  text = (tmp_path / 'results.md').read_text()
  for heading in ('matched quality', 'bf16 against fp32', 'Anchors', 'Memory-bandwidth bound'):
    assert heading in text


@pytest.mark.slow
def test_bench_decode_tiny_times_every_layout_against_both_bounds(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out_json = tmp_path / 'decode.json'
  cmd = [sys.executable, '-m', 'experiments.bench_decode', '--tiny', '--new_tokens=4', '--repeats=1',
         '--hf_threads=1', '--requests=2', '--slots=2', '--eval_tokens=64', f'--out={out_json}']
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]  # The script asserts that every layout made the same tokens.
  results = json.loads(out_json.read_text())
  bound = results['bound']
  assert bound['ms'] > 0 and bound['read_ms'] > 0 and bound['read_bandwidth'] > 0 and bound['copy_bandwidth'] > 0
  for row in results['batches'].values():
    assert {'per_layer', 'unfused', 'stacked'} <= row.keys()
    # Finite, not positive: a tiny model's 4-token and 1-token calls differ by less than the timing noise.
    assert all(np.isfinite(row[label]['ms_per_step']) for label in ('per_layer', 'unfused', 'stacked'))
    assert [r['same_tokens'] for r in row['hf']] == [True]  # HF generate on our weights: the same greedy tokens.
  assert results['csb']['ratio'] > 0 and '| 1 |' in out.stdout and 'x bound: copy, read' in out.stdout
