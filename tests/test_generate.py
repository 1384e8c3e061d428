"""Generation: cached early-exit decoding against full recompute; threshold 1.0 is the no-exit output;
bad requests get clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unroll import perturb

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.model import init_cache, init_variables
from rrt_jax.serve.generate import ExitConfig, Generator, SamplingConfig, generate

CFG = presets.TINY_GEMMA
PROMPTS = [[5, 17, 3], [9, 2, 44, 101, 7, 8, 300], [11]]


@pytest.fixture(scope='module')
def relaxed():
  rec = RecursionConfig(loops=3, lora_rank=4)
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(CFG, rec, jax.random.key(0)), 0, 0.05))
  return Decoder(CFG, rec), variables


def reference_greedy(model, variables, prompt, steps, exit_index=-1):
  """Full recompute every step (no cache); the token is the argmax of exit `exit_index`'s logits. Sequences
  are right-padded to 16 so one compilation serves every step (causal: padding does not change them)."""
  forward = jax.jit(lambda v, t: model.apply(v, t, all_exits=True)[0])
  seq = list(prompt)
  for _ in range(steps):
    padded = np.zeros((1, 16), np.int32)
    padded[0, :len(seq)] = seq
    logits = forward(variables, jnp.asarray(padded))
    seq.append(int(jnp.argmax(logits[exit_index, 0, len(seq) - 1])))
  return seq[len(prompt):]


def test_threshold_one_is_the_no_exit_output(relaxed):
  model, variables = relaxed
  out = generate(model, variables, PROMPTS, max_new_tokens=6, exit_cfg=ExitConfig(threshold=1.0))
  for prompt, tokens, exits in zip(PROMPTS, out.tokens, out.exit_loops, strict=True):
    assert tokens == reference_greedy(model, variables, prompt, 6)
    assert exits == [3] * 6


def test_sequence_looping_decodes_in_its_own_depth_order():
  """SEQUENCE (1, 1, 2, 2, ...) cannot exit early; its cached decode equals full recompute."""
  rec = RecursionConfig(loops=2, looping='sequence', lora_rank=4)
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(CFG, rec, jax.random.key(1)), 0, 0.05))
  model = Decoder(CFG, rec)
  out = generate(model, variables, PROMPTS[:2], max_new_tokens=5, exit_cfg=ExitConfig(threshold=1.0))
  for prompt, tokens in zip(PROMPTS[:2], out.tokens, strict=True):
    assert tokens == reference_greedy(model, variables, prompt, 5)


def test_exit_at_the_first_loop_with_full_kv_is_exit_one_greedy(relaxed):
  """threshold 0: every token exits after loop 1; with kv_fill='full' the cache is the no-exit cache, so the
  tokens are the greedy tokens of exit 1 of the full model."""
  model, variables = relaxed
  out = generate(model, variables, PROMPTS, max_new_tokens=5, exit_cfg=ExitConfig(threshold=0.0, kv_fill='full'))
  for prompt, tokens, exits in zip(PROMPTS, out.tokens, out.exit_loops, strict=True):
    assert tokens == reference_greedy(model, variables, prompt, 5, exit_index=0)
    assert exits == [1] * 5


def test_propagated_kv_comes_from_the_exit_state(relaxed):
  """All tokens exit after loop 1 (threshold 0). Full mode feeds loop 2 with the loop-1 state, i.e. the exit
  state, so at (loop 2, layer 1) both modes write the same K/V; deeper skipped entries differ (propagate keeps
  using the exit state, full mode uses the evolving one); the entries of loop 1 are the same."""
  model, variables = relaxed
  prompts = np.array([[5, 17, 3, 9], [9, 2, 44, 101]], np.int32)
  lengths = jnp.array([4, 4])
  caches = {}
  for fill in ('propagate', 'full'):
    gen = Generator(model, ExitConfig(threshold=0.0, kv_fill=fill))
    cache = init_cache(CFG, model.rec, 2, 16)
    token, _, cache = gen.prefill(variables, jnp.asarray(prompts), lengths, cache, jax.random.key(0))
    _, _, cache = gen.step(variables, token, jnp.asarray([4, 4]), cache, jax.random.key(1))
    caches[fill] = jax.tree.map(np.asarray, cache)
  p, f = caches['propagate']['k'], caches['full']['k']  # [B=3, K=2, batch, kv_heads, T, head_dim]
  np.testing.assert_allclose(p[..., :4, :], f[..., :4, :], atol=1e-6)  # Prompt: full in both modes.
  np.testing.assert_allclose(p[0, ..., 4, :], f[0, ..., 4, :], atol=1e-6)  # Loop 1 ran for real.
  np.testing.assert_allclose(p[1, 0, ..., 4, :], f[1, 0, ..., 4, :], atol=1e-5)  # Same input: the exit state.
  assert np.abs(p[1, 1, ..., 4, :] - f[1, 1, ..., 4, :]).max() > 1e-4
  assert np.abs(p[2, ..., 4, :] - f[2, ..., 4, :]).max() > 1e-4


def test_intermediate_thresholds_mix_exit_loops(relaxed):
  model, variables = relaxed
  gen = Generator(model, ExitConfig(threshold=0.02))
  out = generate(model, variables, PROMPTS, max_new_tokens=8, exit_cfg=ExitConfig(threshold=0.02), generator=gen)
  loops = {e for row in out.exit_loops for e in row}
  assert loops <= {1, 2, 3} and len(out.tokens[0]) == 8


def test_sampling_and_stop_tokens(relaxed):
  model, variables = relaxed
  greedy = generate(model, variables, PROMPTS[:1], max_new_tokens=6)
  stop = greedy.tokens[0][2]
  stopped = generate(model, variables, PROMPTS[:1], max_new_tokens=6, stop_tokens=[stop])
  assert stopped.tokens[0] == greedy.tokens[0][:greedy.tokens[0].index(stop)]
  a = generate(model, variables, PROMPTS, 6, sampling=SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=1))
  b = generate(model, variables, PROMPTS, 6, sampling=SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=1))
  assert a.tokens == b.tokens and all(0 <= t < CFG.vocab_size for row in a.tokens for t in row)


def test_bad_requests_are_rejected(relaxed):
  model, variables = relaxed
  with pytest.raises(ValueError, match='Prompt 1 is empty'):
    generate(model, variables, [[1, 2], []], 4)
  with pytest.raises(ValueError, match='outside the vocabulary'):
    generate(model, variables, [[1, CFG.vocab_size + 3]], 4)
  with pytest.raises(ValueError, match='cache slots but max_len'):
    generate(model, variables, [[1] * 20], 10, max_len=16)
  with pytest.raises(ValueError, match='Unknown confidence'):
    ExitConfig(confidence='entropy')


V = CFG.vocab_size
sampled = lambda **kw: lambda: dict(sampling=SamplingConfig(**{'temperature': 1.0} | kw))  # noqa: E731
exiting = lambda threshold: lambda: dict(exit_cfg=ExitConfig(threshold=threshold))  # noqa: E731
# Bad generate() argument -> what its one ValueError must say: the parameter, the value and the allowed range.
# Configs are built inside the test (lambdas): their own checks raise.
BAD_ARGUMENTS = {
    'max_new_tokens<0': (dict(max_new_tokens=-2), r'max_new_tokens must be an integer >= 1, got -2'),
    'max_new_tokens float': (dict(max_new_tokens=2.5), r'max_new_tokens must be an integer >= 1, got 2.5'),
    'threshold<0': (exiting(-0.1), r'threshold must be a number >= 0 .*got -0.1'),
    'threshold nan': (exiting(float('nan')), r'threshold must be a number >= 0 .*got nan'),
    'temperature<0': (sampled(temperature=-1.0), r'temperature must be a finite number >= 0 .*got -1.0'),
    'temperature nan': (sampled(temperature=float('nan')), r'temperature must be a finite number >= 0 .*got nan'),
    'top_p 0': (sampled(top_p=0.0), r'top_p must be a number in \(0, 1\] .*got 0.0'),
    'top_p>1': (sampled(top_p=1.5), r'top_p must be a number in \(0, 1\] .*got 1.5'),
    'top_k<0': (sampled(top_k=-3), r'top_k must be an integer >= 0 .*got -3'),
    'top_k float': (sampled(top_k=2.5), r'top_k must be an integer >= 0 .*got 2.5'),
    'top_k>vocab': (sampled(top_k=V + 1), rf'top_k must be in \[0, vocab_size={V}\] .*got {V + 1}'),
    'float ids': (dict(prompts=[[5, 17], [1.0, 2.5]]), rf'Prompt 1 must hold integer token ids in \[0, {V}\).*2.5'),
    'negative id': (dict(prompts=[[5, -1]]), rf'Prompt 0 has token ids outside the vocabulary \[0, {V}\): \[-1\]'),
    'id=vocab': (dict(prompts=[[V]]), rf'outside the vocabulary \[0, {V}\): \[{V}\]'),
}


@pytest.mark.parametrize('name', list(BAD_ARGUMENTS))
def test_bad_arguments_are_one_clear_error(relaxed, name):
  """Each bad value is one ValueError naming it, its value and the allowed range, before anything runs: no
  silent token 0 from a NaN temperature, no raw jax error from top_k."""
  model, variables = relaxed
  bad, message = BAD_ARGUMENTS[name]
  with pytest.raises(ValueError, match=message):
    kwargs = dict(prompts=PROMPTS, max_new_tokens=3) | (bad() if callable(bad) else bad)
    generate(model, variables, **kwargs)


def test_cli_generates_from_a_training_workdir(tmp_path):
  """End to end: train a tiny relaxed model for a few steps, then generate from its workdir with the CLI."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  train = [sys.executable, '-m', 'experiments.train', '--config=experiments/configs/tiny_cpu.py',
           f'--workdir={tmp_path}', '--config.train.steps=3', '--config.data.split=validation']
  assert subprocess.run(train, cwd=root, capture_output=True, timeout=300).returncode == 0
  cli = [sys.executable, '-m', 'experiments.generate', f'--workdir={tmp_path}', '--tokenizer=bytes',
         '--prompt=Hello', '--prompt=The Debian', '--max_new_tokens=5', '--exit_threshold=0.5']
  out = subprocess.run(cli, cwd=root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  header, *lines = out.stdout.strip().splitlines()
  assert header.endswith('tokenizer bytes (given)')  # What it loaded and which tokenizer it encodes with.
  assert lines[0].startswith("'Hello' -> ") and lines[2].startswith("'The Debian' -> ")
  assert lines[1].startswith('  exit loops: [') and len(eval(lines[1].split(': ', 1)[1])) <= 5
