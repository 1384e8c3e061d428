"""The vmapped while-loop decode (serve/vmapped_decode.py) against the unrolled one: the same tokens, exit loops
and cache at thresholds where rows exit at different loops (kv_fill propagate and full; relaxed, plain recursive
and middle_cycle models; greedy and sampled), and a batch runs as many loops as its deepest row: one when every
token exits at loop 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.model import dynamic_loop_variables, init_cache, loop_variables, variable_shapes
from rrt_jax.serve.generate import ExitConfig, Generator, SamplingConfig, token_keys
from rrt_jax.serve.vmapped_decode import decode_token, vmapped_step

CFG = presets.TINY_GEMMA
RECS = {  # 6 layers: 3 loops x K = 2; middle_cycle: prelude 1, 2 loops x K = 2, coda 1.
    'relaxed': RecursionConfig(loops=3, lora_rank=4),
    'recursive': RecursionConfig(loops=3),
    'middle_cycle': RecursionConfig(loops=2, looping='middle_cycle', unique_layers=1, lora_rank=4),
}
TOKENS_B = np.array([5, 17, 300, 44], np.int32)
POSITIONS_B = np.array([3, 7, 0, 11], np.int32)  # Rows at their own positions (T = 16).
STEPS = 4
MIX = 0.0055  # Random weights give near-uniform max_prob (1 / V ~ 0.002); at this threshold rows exit apart.


def gaussian(tree, seed: int, fan_in: bool) -> dict:
  """Gaussian leaves of `tree`'s shapes (of fan-in scale, or unit); no compilation, unlike init_variables."""
  rng = np.random.default_rng(seed)
  scale = lambda shape: (shape[-2] ** -0.5 if len(shape) >= 2 else 0.2) if fan_in else 1.0  # noqa: E731
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * scale(x.shape)), tree)


@pytest.fixture(scope='module')
def models():
  """{name: (model, variables, cache)}: random weights, and a random cache standing for each row's context (both
  decodes read the same one)."""
  out = {}
  for i, (name, rec) in enumerate(RECS.items()):
    cache = gaussian(init_cache(CFG, rec, len(TOKENS_B), 16), 10 + i, fan_in=False)
    out[name] = (Decoder(CFG, rec), gaussian(variable_shapes(CFG, rec), i, fan_in=True), cache)
  return out


def run(model, variables, cache, exit_cfg, sampling, decode):
  """STEPS decode steps fed back -> per step (tokens, exit loops, loops run), and the final cache."""
  gen = Generator(model, exit_cfg, sampling, decode)
  tokens, positions, cache = jnp.asarray(TOKENS_B), jnp.asarray(POSITIONS_B), jax.tree.map(jnp.copy, cache)
  base, seeds = jax.random.key(sampling.seed), jnp.arange(len(TOKENS_B), dtype=jnp.int32)
  steps = []
  for step in range(STEPS):
    keys = token_keys(base, seeds, jnp.full(len(TOKENS_B), step + 1, jnp.int32))
    tokens, exits, cache, loops = gen.counted_step(variables, tokens, positions + step, cache, keys)
    steps.append(tuple(np.asarray(x) for x in (tokens, exits, loops)))
  return steps, jax.tree.map(np.asarray, cache)


slow = lambda case: pytest.param(case, marks=pytest.mark.slow)  # noqa: E731
CASES = {  # id -> (model, threshold, kv_fill, sampling)
    'relaxed-propagate-sampled': ('relaxed', MIX, 'propagate', SamplingConfig(1.0, top_k=40, top_p=0.9, seed=3)),
    'relaxed-full': ('relaxed', MIX, 'full', SamplingConfig()),
    'recursive-propagate': ('recursive', MIX, 'propagate', SamplingConfig()),
    'middle_cycle-propagate': ('middle_cycle', MIX, 'propagate', SamplingConfig()),
    # Covered above or by test_generate / test_middle_cycle (generate() decodes vmapped by default):
    'relaxed-propagate': ('relaxed', MIX, 'propagate', SamplingConfig()),
    'recursive-no-exit': ('recursive', 1.0, 'propagate', SamplingConfig()),
    'middle_cycle-full': ('middle_cycle', MIX, 'full', SamplingConfig()),
}
SLOW = ('relaxed-propagate', 'recursive-no-exit', 'middle_cycle-full')


@pytest.mark.parametrize('case', [slow(c) if c in SLOW else c for c in CASES])
def test_vmapped_equals_unrolled(models, case):
  name, threshold, fill, sampling = CASES[case]
  model, variables, cache = models[name]
  exit_cfg, loops = ExitConfig(threshold, kv_fill=fill), model.rec.loops
  vmapped, v_cache = run(model, variables, cache, exit_cfg, sampling, 'vmapped')
  unrolled, u_cache = run(model, variables, cache, exit_cfg, sampling, 'unrolled')
  for (v_tokens, v_exits, v_loops), (u_tokens, u_exits, _) in zip(vmapped, unrolled, strict=True):
    np.testing.assert_array_equal(v_tokens, u_tokens)
    np.testing.assert_array_equal(v_exits, u_exits)
    # A row runs to its exit, or every loop under 'full' (the oracle computes the skipped loops).
    np.testing.assert_array_equal(v_loops, v_exits if fill == 'propagate' else np.full_like(v_exits, loops))
  for v, u in zip(jax.tree.leaves(v_cache), jax.tree.leaves(u_cache), strict=True):
    np.testing.assert_allclose(v, u, atol=1e-4, rtol=1e-4)  # Batch-1 vs batch-4 matmuls.
  exits = np.stack([e for _, e, _ in vmapped])  # [STEPS, B]
  if threshold < 1:  # Rows of one step exit at different loops, so the vmapped loop masks finished rows.
    assert any(len(set(row)) > 1 for row in exits.tolist()), exits
  else:
    assert (exits == loops).all()


def test_a_batch_runs_as_many_loops_as_its_deepest_row(models):
  """The while_loop's counter per row (under vmap the batch runs their max): threshold 0 exits every token at
  loop 1, so the step runs ONE loop instead of R; threshold 1.0 runs all R."""
  model, variables, cache = models['relaxed']
  for threshold, want in ((0.0, 1), (1.0, model.rec.loops)):
    steps, _ = run(model, variables, cache, ExitConfig(threshold), SamplingConfig(), 'vmapped')
    for _, exits, loops in steps:
      assert (exits == want).all() and (loops == want).all() and loops.max() == want


def test_one_sequence_alone_is_its_row_of_the_batch(models):
  """decode_token outside vmap (no shared loop index) gives each row what the vmapped batch gives it."""
  model, variables, cache = models['relaxed']
  exit_cfg = ExitConfig(MIX)
  batch = jax.jit(lambda v, t, p, c: vmapped_step(model, v, exit_cfg, t, p, c))
  logits, exits, new_cache, loops = batch(variables, jnp.asarray(TOKENS_B), jnp.asarray(POSITIONS_B), cache)
  alone = jax.jit(lambda v, t, p, c, r: decode_token(model, v, exit_cfg, t, p, c, r))
  assert len(set(np.asarray(exits).tolist())) > 1
  for row, (token, position) in enumerate(zip(TOKENS_B, POSITIONS_B, strict=True)):
    row_logits, row_exit, row_kv, row_loops = alone(variables, token, position, cache, jnp.int32(row))
    np.testing.assert_allclose(row_logits, logits[row], atol=1e-5, rtol=1e-5)
    assert int(row_exit) == int(exits[row]) and int(row_loops) == int(loops[row])
    np.testing.assert_allclose(row_kv['k'][:, :, :, 0], new_cache['k'][:, :, row, :, position], atol=1e-5,
                               rtol=1e-5)


def test_dynamic_loop_variables_are_loop_variables(models):
  _, variables, _ = models['relaxed']
  for b in range(3):
    dynamic = jax.jit(dynamic_loop_variables)(variables, jnp.int32(b))
    jax.tree.map(np.testing.assert_array_equal, dynamic, loop_variables(variables, b))


def test_unknown_decode_is_refused(models):
  model, _, _ = models['relaxed']
  with pytest.raises(ValueError, match="Unknown decode 'scan'"):
    Generator(model, decode='scan')
