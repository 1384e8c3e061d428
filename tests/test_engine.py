"""Continuous depth-wise batching engine: the same greedy tokens and exit loops as sequential early-exit
decoding, for depth-wise and sequence-wise batching; slots are refilled; bad requests are rejected alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unroll import perturb

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.model import init_cache, init_variables, loop_variables, multi_lora_variables, one_loop
from rrt_jax.serve.engine import Engine, EngineConfig, Request
from rrt_jax.serve.generate import ExitConfig, Generator, SamplingConfig, generate

# Random tiny Llama: its max-prob confidences spread around 0.02-0.04, so a threshold of 0.025 mixes exit loops.
CFG = presets.TINY_LLAMA
PROMPTS = [[5, 17, 3], [9, 2, 44, 101, 7, 8, 300], [11], list(range(4, 21)), [7, 8]]
NEW_TOKENS = [8, 5, 10, 6, 9]
THRESHOLD = 0.025


@pytest.fixture(scope='module')
def relaxed():
  rec = RecursionConfig(loops=3, lora_rank=4)
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(CFG, rec, jax.random.key(0)), 0, 0.02))
  return Decoder(CFG, rec), variables


def sequential(model, variables, exit_cfg, prompts=PROMPTS, new_tokens=NEW_TOKENS):
  gen = Generator(model, exit_cfg)
  return [generate(model, variables, [p], max_new_tokens=n, exit_cfg=exit_cfg, max_len=64, generator=gen)
          for p, n in zip(prompts, new_tokens, strict=True)]


@pytest.fixture(scope='module')
def reference(relaxed):
  return sequential(*relaxed, ExitConfig(threshold=THRESHOLD))


@pytest.mark.parametrize('depthwise', [True, False])
def test_engine_equals_sequential_early_exit(relaxed, reference, depthwise):
  model, variables = relaxed
  engine = Engine(model, variables, EngineConfig(slots=2, max_len=64, depthwise=depthwise,
                                                 exit=ExitConfig(threshold=THRESHOLD)))
  completions, stats = engine.run([Request(p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)])
  for done, ref in zip(completions, reference, strict=True):
    assert done.error is None
    assert done.tokens == ref.tokens[0]
    assert done.exit_loops == ref.exit_loops[0]
  exit_loops = {e for done in completions for e in done.exit_loops}
  assert exit_loops == {1, 2, 3}, 'the threshold must mix exit loops for this test to mean anything'
  assert stats.tokens == sum(NEW_TOKENS)
  if depthwise:  # Freed slots are refilled at once: no slot idles while an arrived request waits.
    assert stats.idle_while_waiting == 0
  else:  # Sequence-wise: early exits leave bubbles.
    assert stats.idle_while_waiting > 0


@pytest.mark.parametrize('rec', [RecursionConfig(loops=3),
                                 RecursionConfig(loops=3, lora_rank=4, lora_targets=('q', 'k'))],
                         ids=['no_lora', 'lora_on_k_not_v'])
def test_recursive_engine_equals_sequential_early_exit(rec):
  """Without LoRA the propagated K/V of every later loop come from the same shared weights; with LoRA on k only,
  v's propagation must use no LoRA."""
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(CFG, rec, jax.random.key(4)), 4, 0.02))
  model = Decoder(CFG, rec)
  exit_cfg = ExitConfig(threshold=THRESHOLD)
  reference = sequential(model, variables, exit_cfg)
  engine = Engine(model, variables, EngineConfig(slots=2, max_len=64, exit=exit_cfg))
  completions, _ = engine.run([Request(p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)])
  assert [c.tokens for c in completions] == [r.tokens[0] for r in reference]
  assert [c.exit_loops for c in completions] == [r.exit_loops[0] for r in reference]
  assert len({e for c in completions for e in c.exit_loops}) > 1


def test_depthwise_takes_fewer_steps_than_sequencewise(relaxed):
  model, variables = relaxed
  requests = [Request(p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
  steps = {}
  for depthwise in (True, False):
    engine = Engine(model, variables, EngineConfig(slots=2, max_len=64, depthwise=depthwise,
                                                   exit=ExitConfig(threshold=THRESHOLD)))
    _, stats = engine.run(requests)
    steps[depthwise] = stats.steps
    assert 0 < stats.utilisation <= 1
  assert steps[True] < steps[False]


def test_vanilla_model_through_the_sequencewise_engine():
  rec = RecursionConfig(loops=1)
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(CFG, rec, jax.random.key(1)), 1, 0.02))
  model = Decoder(CFG, rec)
  reference = sequential(model, variables, ExitConfig(), PROMPTS[:3], NEW_TOKENS[:3])
  engine = Engine(model, variables, EngineConfig(slots=2, max_len=64, depthwise=False))
  completions, stats = engine.run([Request(p, n) for p, n in zip(PROMPTS[:3], NEW_TOKENS[:3], strict=True)])
  assert [c.tokens for c in completions] == [r.tokens[0] for r in reference]
  assert stats.exit_loop_counts == [sum(NEW_TOKENS[:3])]


def test_sequencewise_without_exit_equals_generate(relaxed):
  """CSB without early exit: the per-loop step (loop b's own LoRA buffers, the head at the last loop only) gives
  generate()'s no-exit tokens, every token from loop R, in R engine steps per token."""
  model, variables = relaxed
  reference = sequential(model, variables, ExitConfig(), PROMPTS[:3], NEW_TOKENS[:3])
  engine = Engine(model, variables, EngineConfig(slots=3, max_len=64, depthwise=False))
  assert [engine.slots.emits_at(b) for b in range(3)] == [False, False, True]
  completions, stats = engine.run([Request(p, n) for p, n in zip(PROMPTS[:3], NEW_TOKENS[:3], strict=True)])
  assert [c.tokens for c in completions] == [r.tokens[0] for r in reference]
  assert stats.exit_loop_counts == [0, 0, sum(NEW_TOKENS[:3])]
  # All three start together; the prefill emits token 1, each later token takes 3 steps.
  assert stats.steps == 3 * (max(NEW_TOKENS[:3]) - 1)


def test_bad_requests_are_rejected_without_disturbing_others(relaxed, reference):
  model, variables = relaxed
  bad = [Request([], 4), Request([1, CFG.vocab_size + 3], 4), Request([1] * 60, 10), Request([1, 2], 0)]
  requests = [Request(p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
  mixed = [requests[0], bad[0], requests[1], bad[1], requests[2], bad[2], requests[3], bad[3], requests[4]]
  engine = Engine(model, variables, EngineConfig(slots=2, max_len=64, exit=ExitConfig(threshold=THRESHOLD)))
  completions, _ = engine.run(mixed)
  good = [c for c in completions if c.error is None]
  assert [c.tokens for c in good] == [r.tokens[0] for r in reference]
  errors = [c.error for c in completions if c.error is not None]
  assert len(errors) == 4 and not any(c.tokens for c in completions if c.error)
  assert 'empty' in errors[0] and 'outside the vocabulary' in errors[1]
  assert 'max_len is 64' in errors[2] and 'max_new_tokens must be an integer >= 1, got 0' in errors[3]


def test_bad_request_values_are_rejected_with_the_generate_checks(relaxed):
  """The engine's per-request check is generate()'s (validate_prompts): one message naming value and range."""
  model, variables = relaxed
  engine = Engine(model, variables, EngineConfig(slots=2, max_len=64))
  bad = [Request([1.0, 2.5], 4), Request([1, 2], -1), Request([1, 2], 2.5), Request([1, -4], 4),
         Request([1, 2], 4, seed=-1), Request([1, 2], 4, arrival=float('inf')), Request([1, 2], 4, arrival=-1.0)]
  completions, _ = engine.run(bad + [Request([5, 17, 3], 2)])  # An infinite arrival used to hang the run.
  assert [c.error for c in completions[:-1]] == [
      f'The prompt must hold integer token ids in [0, {CFG.vocab_size}), got float64 values [1.0, 2.5].',
      'max_new_tokens must be an integer >= 1, got -1.', 'max_new_tokens must be an integer >= 1, got 2.5.',
      f'The prompt has token ids outside the vocabulary [0, {CFG.vocab_size}): [-4].',
      'Request seed must be an integer in [0, 2**31), got -1.',
      'Request arrival must be a finite number of seconds >= 0, got inf.',
      'Request arrival must be a finite number of seconds >= 0, got -1.0.']
  assert completions[-1].error is None and len(completions[-1].tokens) == 2
  with pytest.raises(ValueError, match=rf'top_k must be in \[0, vocab_size={CFG.vocab_size}\]'):
    Engine(model, variables, EngineConfig(sampling=SamplingConfig(temperature=1.0, top_k=CFG.vocab_size + 1)))
  with pytest.raises(ValueError, match='temperature must be a finite number >= 0'):
    EngineConfig(sampling=SamplingConfig(temperature=float('nan')))


SAMPLING = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=7)


@pytest.fixture(scope='module')
def sampling_engine(relaxed):
  """One engine (one compilation) for the sampling tests: Engine.run keeps no state between runs."""
  return Engine(*relaxed, EngineConfig(slots=2, max_len=64, exit=ExitConfig(threshold=THRESHOLD), sampling=SAMPLING))


def test_sampled_outputs_do_not_depend_on_rejected_requests(sampling_engine, reference):
  """Each request samples with its own key (its seed and token index), never its list index or slot: adding
  rejected requests, first among them, leaves every valid request's sampled tokens as they were."""
  good = [Request(p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
  bad = [Request([], 4), Request([1, CFG.vocab_size], 4), Request([1, 2], 0)]
  alone, _ = sampling_engine.run(good)
  mixed, _ = sampling_engine.run([bad[0], good[0], bad[1], *good[1:3], bad[2], *good[3:]])
  assert [c.tokens for c in mixed if c.error is None] == [c.tokens for c in alone]
  assert [c.tokens for c in alone] != [r.tokens[0] for r in reference], 'sampling must differ from greedy here'


def test_seeded_requests_sample_as_generate_does(relaxed, sampling_engine):
  """A request's key depends only on its seed and token index, so with seed=0 the engine samples exactly as
  generate() does for the same prompt alone (row 0), whatever the schedule."""
  model, variables = relaxed
  exit_cfg = ExitConfig(threshold=THRESHOLD)
  gen = Generator(model, exit_cfg, SAMPLING)
  reference = [generate(model, variables, [p], n, sampling=SAMPLING, exit_cfg=exit_cfg, max_len=64, generator=gen)
               for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
  completions, _ = sampling_engine.run([Request(p, n, seed=0) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)])
  assert [c.tokens for c in completions] == [r.tokens[0] for r in reference]
  assert [c.exit_loops for c in completions] == [r.exit_loops[0] for r in reference]


def test_requests_arriving_over_time_are_all_served(relaxed, reference):
  model, variables = relaxed
  arrivals = [0.0, 0.05, 0.05, 0.3, 0.31]
  requests = [Request(p, n, a) for p, n, a in zip(PROMPTS, NEW_TOKENS, arrivals, strict=True)]
  engine = Engine(model, variables, EngineConfig(slots=3, max_len=64, exit=ExitConfig(threshold=THRESHOLD)))
  completions, stats = engine.run(requests)
  assert [c.tokens for c in completions] == [r.tokens[0] for r in reference]
  for done in completions:
    assert done.arrival <= done.first_token <= done.finished
  assert stats.idle_while_waiting == 0


def test_multi_lora_selects_each_rows_loop(relaxed):
  """Rows at different loops in one call of the one-loop block == each row run alone at its loop."""
  model, variables = relaxed
  block = one_loop(model)
  h = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (1, 1, CFG.d_model)), (3, 1, CFG.d_model))
  loops = jnp.array([2, 0, 1])
  positions = jnp.zeros((3, 1), jnp.int32)
  cache = jax.tree.map(lambda c: c[:1], init_cache(CFG, model.rec, 3, 4))  # One loop's slots.
  mixed, _ = block.apply(multi_lora_variables(variables), h, positions, cache, jax.nn.one_hot(loops, 3),
                         method=Decoder.decode_stack)
  for row, b in enumerate(np.asarray(loops)):
    alone, _ = block.apply(loop_variables(variables, int(b)), h[row:row + 1], positions[row:row + 1],
                           jax.tree.map(lambda c, r=row: c[:, :, r:r + 1], cache), method=Decoder.decode_stack)
    np.testing.assert_allclose(mixed[-1, row], alone[-1, 0], atol=1e-5)
  assert np.abs(np.asarray(mixed[-1, 0] - mixed[-1, 1])).max() > 1e-3  # Same input: only the LoRA differs.


def test_engine_rejects_what_it_cannot_serve(relaxed):
  model, variables = relaxed
  with pytest.raises(ValueError, match='kv_fill'):
    Engine(model, variables, EngineConfig(exit=ExitConfig(threshold=0.5, kv_fill='full')))
  with pytest.raises(ValueError, match='looping=cycle'):
    seq = RecursionConfig(loops=3, looping='sequence')
    Engine(Decoder(CFG, seq), init_variables(CFG, seq, jax.random.key(0)), EngineConfig())


def test_benchmark_rows_are_consistent(relaxed):
  """The serving benchmark on tiny models: one CSB row for vanilla, CSB + CDB rows per threshold for the
  relaxed model; no-exit rows agree with themselves; every generated token has an exit loop."""
  from experiments.serving_benchmark import benchmark, markdown
  from rrt_jax.eval.perplexity import sliding_windows
  model, variables = relaxed
  vanilla_rec = RecursionConfig(loops=1)
  models = {'vanilla': (Decoder(CFG, vanilla_rec), init_variables(CFG, vanilla_rec, jax.random.key(3))),
            'relaxed': (model, variables)}
  requests = [Request(p, n) for p, n in zip(PROMPTS[:3], NEW_TOKENS[:3], strict=True)]
  windows = sliding_windows(list(np.random.default_rng(0).integers(3, CFG.vocab_size, 65)), 32)
  rows, latencies = benchmark(models, requests, windows, [THRESHOLD], slots=2, repeats=1)
  assert [(r['model'], r['batching'], r['threshold']) for r in rows] == [
      ('vanilla', 'CSB', 1.0), ('relaxed', 'CSB', 1.0), ('relaxed', 'CDB', 1.0), ('relaxed', 'CSB', THRESHOLD),
      ('relaxed', 'CDB', THRESHOLD)]
  assert rows[0]['speedup_vs_vanilla_csb'] == 1.0
  assert all(r['agreement'] == 1.0 for r in rows if r['threshold'] == 1.0)
  assert all(len(r['exit_loops']) == sum(NEW_TOKENS[:3]) for r in rows)
  assert rows[-1]['mean_exit_loop'] < 3.0 and rows[2]['mean_exit_loop'] == 3.0
  assert rows[-1]['exit_loops'] == rows[-2]['exit_loops']  # Same tokens, same exits: only the schedule differs.
  assert rows[-1]['steps'] < rows[-2]['steps'] < rows[2]['steps']
  assert set(latencies) == {'vanilla', 'relaxed'} and latencies['relaxed']['batch_2']['block_s'] > 0
  assert '| relaxed | CDB | 0.025 |' in markdown(rows, latencies, 2)
