"""Self-speculative decoding (rrt_jax.serve.speculative): the first loops draft, the full depth verifies; the
tokens are greedy no-exit decoding's, token for token, whatever the drafts were."""

import math

import jax
import jax.numpy as jnp
import pytest
from hlo_copies import loop_copies
from unroll import perturb

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.convert import to_recursive
from rrt_jax.model import first_loops, init_cache, init_variables
from rrt_jax.serve.generate import ExitConfig, SamplingConfig, generate, serving_variables
from rrt_jax.serve.speculative import speculative_decoder, speculative_generate

CFG = presets.TINY_LLAMA
PROMPTS = [[5, 17, 3], [9, 2, 44, 101, 7, 8, 300], [11]]
NEW = 12
NO_EXIT = ExitConfig(threshold=1.0)


@pytest.fixture(scope='module')
def vanilla():
  # Perturbed so that the random model's tokens vary (an unperturbed one repeats its input) and its first loops
  # disagree with the full depth now and then: the drafts get rejected, and sometimes accepted.
  return perturb(init_variables(CFG, RecursionConfig(), jax.random.key(0)), 0, 0.3)


@pytest.fixture(scope='module')
def relaxed(vanilla):
  rec = RecursionConfig(loops=3, init='average', lora_rank=8)
  return Decoder(CFG, rec), jax.tree.map(jnp.asarray, to_recursive(vanilla, CFG, rec))


@pytest.fixture(scope='module')
def reference(relaxed):
  model, variables = relaxed
  return generate(model, variables, PROMPTS, max_new_tokens=NEW, exit_cfg=NO_EXIT).tokens


@pytest.mark.parametrize('draft_loops,draft_len', [(1, 1), (1, 3), (2, 2), (2, 5)])
def test_tokens_are_greedy_no_exit_decoding(relaxed, reference, draft_loops, draft_len):
  model, variables = relaxed
  out = speculative_generate(model, variables, PROMPTS, NEW, draft_loops=draft_loops, draft_len=draft_len)
  assert out.tokens == reference
  assert all(len(t) == NEW for t in out.tokens)
  # Rows accepted different numbers of drafts, and the rounds count what each row emitted after the prefill.
  for rounds, accepted in zip(out.rounds, out.accepted, strict=True):
    assert len(accepted) == rounds
    assert all(0 <= a <= draft_len for a in accepted)
    assert sum(accepted) + rounds >= NEW - 1
  assert 0.0 <= out.acceptance_rate < 1.0  # This model's drafts do get rejected: verification did work.


def test_batch_one_equals_its_row_of_the_batch(relaxed, reference):
  model, variables = relaxed
  for prompt, want in zip(PROMPTS, reference, strict=True):
    assert speculative_generate(model, variables, [prompt], NEW, draft_loops=2, draft_len=3).tokens == [want]


def test_the_case_tells_drafting_from_verifying(relaxed, reference):
  """The draft's own greedy output differs from the full model's here, so emitting drafts unverified would fail
  test_tokens_are_greedy_no_exit_decoding; some drafts are accepted, so a verifier rejecting all would not
  show up as a speed-up either."""
  model, variables = relaxed
  draft, draft_vars = first_loops(model, variables, 2)
  drafted = generate(draft, draft_vars, PROMPTS, max_new_tokens=NEW, exit_cfg=NO_EXIT).tokens
  assert drafted != reference
  out = speculative_generate(model, variables, PROMPTS, NEW, draft_loops=2, draft_len=2)
  assert out.acceptance_rate > 0
  assert out.tokens == reference


def test_a_draft_that_is_the_full_model_is_always_accepted(relaxed, reference):
  model, variables = relaxed
  k = 3
  out = speculative_generate(model, variables, PROMPTS, NEW, draft_loops=3, draft_len=k)
  assert out.tokens == reference
  assert out.acceptance_rate == 1.0
  assert out.rounds == [math.ceil((NEW - 1) / (k + 1))] * len(PROMPTS)  # k + 1 tokens per round.


def test_one_loop_model_drafts_itself(vanilla):
  model, variables = Decoder(CFG), jax.tree.map(jnp.asarray, vanilla)
  want = generate(model, variables, PROMPTS, max_new_tokens=NEW, exit_cfg=NO_EXIT).tokens
  out = speculative_generate(model, variables, PROMPTS, NEW, draft_loops=1, draft_len=4)
  assert out.tokens == want and out.acceptance_rate == 1.0


def test_draft_len_zero_is_plain_greedy(relaxed, reference):
  model, variables = relaxed
  out = speculative_generate(model, variables, PROMPTS, NEW, draft_len=0)
  assert out.tokens == reference
  assert out.rounds == [NEW - 1] * len(PROMPTS) and out.acceptance_rate is None


def test_stop_tokens_end_each_row_where_generate_ends_it(relaxed, reference):
  model, variables = relaxed
  stops = [reference[0][4], reference[1][7]]  # Mid-sequence tokens of two rows (the third may not meet them).
  want = generate(model, variables, PROMPTS, max_new_tokens=NEW, exit_cfg=NO_EXIT, stop_tokens=stops).tokens
  assert len(want[0]) <= 4 and len(want[1]) <= 7
  for k in (1, 4):
    out = speculative_generate(model, variables, PROMPTS, NEW, draft_loops=2, draft_len=k, stop_tokens=stops)
    assert out.tokens == want


def test_middle_cycle_drafts_through_its_coda(vanilla):
  """Under MIDDLE_CYCLE the draft writes the prelude and exits 1..j's coda slots: still lossless."""
  rec = RecursionConfig(loops=2, looping='middle_cycle', unique_layers=1, init='average', lora_rank=8)
  model, variables = Decoder(CFG, rec), jax.tree.map(jnp.asarray, to_recursive(vanilla, CFG, rec))
  want = generate(model, variables, PROMPTS, max_new_tokens=NEW, exit_cfg=NO_EXIT).tokens
  out = speculative_generate(model, variables, PROMPTS, NEW, draft_loops=1, draft_len=3)
  assert out.tokens == want


def test_bad_settings_get_clear_errors(relaxed):
  model, variables = relaxed
  with pytest.raises(ValueError, match=r"looping='cycle' or 'middle_cycle'"):
    speculative_generate(Decoder(CFG, RecursionConfig(loops=2, looping='sequence')), variables, PROMPTS)
  for loops in (0, 4, 1.0):
    with pytest.raises(ValueError, match=r'draft_loops must be an integer in \[1, 3\]'):
      speculative_generate(model, variables, PROMPTS, draft_loops=loops)
  with pytest.raises(ValueError, match='draft_len must be an integer >= 0'):
    speculative_generate(model, variables, PROMPTS, draft_len=-1)
  with pytest.raises(ValueError, match='greedy only'):
    speculative_generate(model, variables, PROMPTS, sampling=SamplingConfig(temperature=0.7))
  with pytest.raises(ValueError, match='max_len=20 is too short.*= 23'):
    speculative_generate(model, variables, PROMPTS, max_new_tokens=12, draft_len=4, max_len=20)
  with pytest.raises(ValueError, match='outside the vocabulary'):
    speculative_generate(model, variables, [[CFG.vocab_size]])


@pytest.mark.parametrize('looping', ['cycle', 'middle_cycle'])
def test_the_rounds_write_the_cache_in_place(vanilla, looping):
  """The compiled draft+verify loop copies no K/V buffer per round: draft and verify run the loops unrolled over
  the per-(depth, layer) cache (per_layer_cache). Through the stacked cache and the model's scan over loops, every
  round copied the whole cache (the draft's prefix of it, then all of it)."""
  unique = 1 if looping == 'middle_cycle' else 0
  rec = RecursionConfig(loops=2, looping=looping, unique_layers=unique, init='average', lora_rank=8)
  model = Decoder(CFG, rec)
  _, variables = serving_variables(model, jax.tree.map(jnp.asarray, to_recursive(vanilla, CFG, rec)))
  batch, slots = 2, 64
  decoder = speculative_decoder(model, draft_loops=1, draft_len=2)
  hlo = decoder.decode.lower(variables, jnp.zeros((batch,), jnp.int32), jnp.full((batch,), 3, jnp.int32),
                             init_cache(CFG, rec, batch, slots), max_new_tokens=8, stop_tokens=()).compile().as_text()
  buffer = f'{batch},{CFG.num_kv_heads},{slots},{CFG.head_dim}'
  assert f'f32[1,{buffer}]' in hlo, 'the per-(depth, layer) K/V buffers must be in the program'
  assert loop_copies(hlo, buffer) == []
