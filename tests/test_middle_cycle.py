"""looping='middle_cycle' (Mixture-of-Recursions, arXiv 2507.10524, Table 12): unique first and last layers
around a looped middle. unique_layers=0 is CYCLE; the scanned model equals the unrolled one at every exit;
full-rank relaxation (plain and whitened SVD) reproduces the original; cached decoding and generation equal full
recompute; parameter counts; clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from unroll import perturb, unroll_middle_cycle

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.convert import source_layers, tied_depths, to_recursive
from rrt_jax.convert.calibration import CalibrationConfig, convert
from rrt_jax.model import (
  check_variables,
  count_params,
  init_cache,
  init_variables,
  layer_tree,
  logical_axes,
  with_layer_tree,
)
from rrt_jax.model.layerwise import apply_layer, depth_variables, embed
from rrt_jax.pretrained.hf import load_hf
from rrt_jax.serve.engine import Engine
from rrt_jax.serve.generate import ExitConfig, Generator, generate

TINY = {'llama': presets.TINY_LLAMA, 'gemma': presets.TINY_GEMMA, 'gpt_neox': presets.TINY_PYTHIA}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 96, size=(2, 9)))  # In every tiny vocabulary.
# L = 6: prelude 1, middle 4 = 2 loops x K = 2 shared layers, coda 1.
MC = RecursionConfig(loops=2, looping='middle_cycle', unique_layers=1)


def random_variables(cfg, rec, seed=0, scale=0.2):
  return jax.tree.map(jnp.asarray, perturb(init_variables(cfg, rec, jax.random.key(seed)), seed, scale))


def test_unique_layers_zero_is_cycle():
  cfg = TINY['llama']
  for cycle in (RecursionConfig(loops=3), RecursionConfig(loops=3, lora_rank=4)):
    middle = cycle.replace(looping='middle_cycle')
    variables = random_variables(cfg, cycle)
    same = random_variables(cfg, middle)
    assert jax.tree.structure(variables) == jax.tree.structure(same)
    jax.tree.map(np.testing.assert_array_equal, variables, same)
    expected, _ = Decoder(cfg, cycle).apply(variables, TOKENS, all_exits=True)
    got, _ = Decoder(cfg, middle).apply(variables, TOKENS, all_exits=True)
    np.testing.assert_array_equal(got, expected)
    assert jax.tree.structure(init_cache(cfg, middle, 2, 8)) == jax.tree.structure(init_cache(cfg, cycle, 2, 8))
  vanilla = {'params': init_variables(cfg, RecursionConfig(), jax.random.key(1))['params']}
  rec = RecursionConfig(loops=3, init='random', lora_rank=4, lora_init='zero')
  jax.tree.map(np.testing.assert_array_equal, to_recursive(vanilla, cfg, rec),
               to_recursive(vanilla, cfg, rec.replace(looping='middle_cycle')))


@pytest.mark.parametrize('family,lora_rank', [('llama', None), ('gemma', 4),
                                              pytest.param('gpt_neox', 4, marks=pytest.mark.slow)])
def test_every_exit_equals_the_unrolled_model(family, lora_rank):
  """Exit r of the scanned model = a vanilla model of [prelude, r loops of tied middle copies, coda]."""
  cfg = TINY[family]
  rec = MC.replace(lora_rank=lora_rank, lora_alpha=8.0)
  variables = random_variables(cfg, rec)
  exits, _ = Decoder(cfg, rec).apply(variables, TOKENS, all_exits=True)
  assert exits.shape == (2, 2, 9, cfg.vocab_size)
  last, _ = Decoder(cfg, rec).apply(variables, TOKENS)
  np.testing.assert_allclose(last, exits[-1], atol=1e-5, rtol=0)
  for r in (1, 2):
    unrolled = unroll_middle_cycle(variables, 2, lora_alpha=8.0, exit_loops=r)
    expected, _ = Decoder(cfg.replace(num_layers=2 + 2 * r)).apply(unrolled, TOKENS)
    assert float(jnp.std(expected)) > 0.1
    np.testing.assert_allclose(exits[r - 1], expected, atol=2e-4, rtol=0)


def test_the_unique_layers_are_not_the_shared_ones():
  """A check that the test above can fail: the unrolled model with its prelude and coda swapped differs."""
  cfg = TINY['llama']
  variables = random_variables(cfg, MC)
  got, _ = Decoder(cfg, MC).apply(variables, TOKENS)
  params = with_layer_tree(variables['params'], layer_tree(variables['params'], 'coda'), 'prelude')
  params = with_layer_tree(params, layer_tree(variables['params'], 'prelude'), 'coda')
  swapped, _ = Decoder(cfg).apply(unroll_middle_cycle({'params': params}, 2), TOKENS)
  assert float(jnp.abs(got - swapped).max()) > 1e-2


@pytest.fixture(scope='module')
def llama(tiny_hf):
  cfg, variables = load_hf(tiny_hf['llama'][0])
  return cfg, variables, Decoder(cfg).apply(variables, TOKENS)[0]


@pytest.mark.parametrize('source', ['hf', 'random'])
def test_full_rank_relaxed_middle_cycle_is_the_original(llama, source):
  if source == 'hf':
    cfg, variables, original = llama
  else:
    cfg = presets.TINY_LLAMA
    variables = {'params': random_variables(cfg, RecursionConfig())['params']}
    original, _ = Decoder(cfg).apply(variables, TOKENS)
  for loops, unique in ((2, 1), (4, 1), (2, 2)):
    rec = RecursionConfig(loops=loops, looping='middle_cycle', unique_layers=unique, init='average',
                          lora_rank=10_000, lora_alpha=3.0)
    relaxed = to_recursive(variables, cfg, rec)
    np.testing.assert_array_equal(layer_tree(relaxed['params'], 'prelude')['attn']['q']['kernel'],
                                  layer_tree(variables['params'])['attn']['q']['kernel'][:unique])
    logits, _ = Decoder(cfg, rec).apply(relaxed, TOKENS)
    err = float(jnp.abs(logits - original).max())
    assert err < 1e-4, f'loops={loops}, unique_layers={unique}: max |delta logit| = {err}'
    plain = rec.replace(lora_rank=None)
    plain_logits, _ = Decoder(cfg, plain).apply(to_recursive(variables, cfg, plain), TOKENS)
    assert float(jnp.abs(plain_logits - original).max()) > 1e-2, 'without LoRA the model must differ'


def test_looping_inits_pick_among_the_middle_layers():
  rec = lambda init, loops=2: RecursionConfig(loops=loops, looping='middle_cycle', unique_layers=1,  # noqa: E731
                                              init=init)
  assert source_layers(rec('stepwise'), 6) == [1, 3]
  assert source_layers(rec('stepwise_ends'), 6) == [1, 4]
  assert source_layers(rec('lower'), 6) == [1, 2]
  assert source_layers(rec('upper'), 6) == [3, 4]
  assert all(1 <= d <= 4 for d in source_layers(rec('random', 4), 6))
  assert tied_depths(rec('average'), 6, 0) == [1, 3] and tied_depths(rec('average'), 6, 1) == [2, 4]
  cfg = presets.TINY_LLAMA
  vanilla = {'params': random_variables(cfg, RecursionConfig())['params']}
  shared = layer_tree(to_recursive(vanilla, cfg, rec('average'))['params'])['mlp']['up']['kernel']
  original = np.asarray(layer_tree(vanilla['params'])['mlp']['up']['kernel'])
  np.testing.assert_allclose(shared, [original[[1, 3]].mean(0), original[[2, 4]].mean(0)], rtol=1e-6)
  coda = layer_tree(to_recursive(vanilla, cfg, rec('average'))['params'], 'coda')['mlp']['up']['kernel']
  np.testing.assert_array_equal(coda, original[5:])


def test_layerwise_walk_equals_the_model():
  """depth_variables + apply_layer over all L depth positions (unique ones included) = the model's last exit."""
  cfg = TINY['gpt_neox']
  rec = MC.replace(lora_rank=4)
  variables = random_variables(cfg, rec, seed=2)
  model = Decoder(cfg, rec)
  h = embed(cfg, variables, TOKENS)
  for depth in range(cfg.num_layers):
    layer = depth_variables(variables, cfg, rec, depth)
    assert ('lora' in layer) == (0 < depth < 5)
    h, _ = apply_layer(cfg, rec, layer, h)
  hidden, _ = model.apply(variables, TOKENS, method=Decoder.hidden_states)
  np.testing.assert_allclose(h, hidden[-1], atol=1e-4, rtol=0)


def test_param_counts_count_the_unique_layers_as_non_embedding():
  cfg = presets.TINY_LLAMA  # L = 6
  vanilla = count_params(cfg, RecursionConfig())
  final_norm = cfg.d_model
  per_layer = (vanilla.non_embedding - final_norm) // cfg.num_layers
  middle = count_params(cfg, MC)  # 2 unique + K = 2 shared layers.
  assert middle.non_embedding == 4 * per_layer + final_norm
  assert middle.embedding == vanilla.embedding and middle.lora == 0
  cycle_lora = count_params(cfg, RecursionConfig(loops=2, lora_rank=4)).lora  # 6 relaxed depth positions.
  relaxed = count_params(cfg, MC.replace(lora_rank=4))
  assert relaxed.lora == cycle_lora // 6 * 4  # Only the R * K = 4 looped positions are relaxed.
  assert relaxed.non_embedding == middle.non_embedding + relaxed.lora


@pytest.mark.parametrize('preset,lora_rank', [('tiny_llama', 4),
                                              pytest.param('tiny_pythia', None, marks=pytest.mark.slow)])
def test_cached_decoding_equals_full_recompute(preset, lora_rank):
  cfg = presets.get(preset)
  rec = MC.replace(lora_rank=lora_rank)
  variables = random_variables(cfg, rec, scale=0.1)
  model = Decoder(cfg, rec)
  full = jax.jit(lambda v, t: model.apply(v, t, all_exits=True)[0])
  step = jax.jit(lambda v, t, p, c: model.apply(v, t, p, cache=c, all_exits=True))
  rng = np.random.default_rng(0)
  seqs = rng.integers(0, cfg.vocab_size, size=(2, 10))
  prompt_lens = np.array([3, 5])
  cache = init_cache(cfg, rec, batch=2, max_len=16)
  assert cache['coda']['k'].shape == (2, 1, 2, cfg.num_kv_heads, 16, cfg.head_dim)  # [E, U, B, H, T, D]
  assert cache['prelude']['k'].shape == (1, 1, 2, cfg.num_kv_heads, 16, cfg.head_dim)
  prompt = np.where(np.arange(5)[None] < prompt_lens[:, None], seqs[:, :5], 0)
  logits, cache = step(variables, jnp.asarray(prompt), jnp.broadcast_to(jnp.arange(5), (2, 5)), cache)
  for row in range(2):
    reference = full(variables, jnp.asarray(seqs[row:row + 1, :prompt_lens[row]]))
    np.testing.assert_allclose(logits[:, row, :prompt_lens[row]], reference[:, 0], atol=1e-4, rtol=0)
  positions = prompt_lens.copy()
  for _ in range(5):
    tokens = seqs[np.arange(2), positions][:, None]
    logits, cache = step(variables, jnp.asarray(tokens), jnp.asarray(positions[:, None]), cache)
    assert logits.shape == (2, 2, 1, cfg.vocab_size)
    for row in range(2):
      reference = full(variables, jnp.asarray(seqs[row:row + 1, :positions[row] + 1]))
      np.testing.assert_allclose(logits[:, row, 0], reference[:, 0, -1], atol=1e-4, rtol=0)
    positions += 1
  # Each exit has its own coda slots: they hold different K/V.
  assert float(jnp.abs(cache['coda']['k'][0] - cache['coda']['k'][1]).max()) > 1e-3
  assert float(jnp.abs(cache['prelude']['k'][..., :10, :]).max()) > 0
  assert float(jnp.abs(cache['coda']['k'][..., 11:, :]).max()) == 0


PROMPTS = [[5, 17, 3], [9, 2, 44, 101, 7, 8, 300], [11]]


@pytest.fixture(scope='module')
def relaxed():
  cfg = presets.TINY_GEMMA
  rec = MC.replace(lora_rank=4)
  return Decoder(cfg, rec), random_variables(cfg, rec, scale=0.05)


def greedy(model, variables, prompt, steps, exit_index=-1):
  forward = jax.jit(lambda v, t: model.apply(v, t, all_exits=True)[0])
  seq = list(prompt)
  for _ in range(steps):
    padded = np.zeros((1, 16), np.int32)
    padded[0, :len(seq)] = seq
    seq.append(int(jnp.argmax(forward(variables, jnp.asarray(padded))[exit_index, 0, len(seq) - 1])))
  return seq[len(prompt):]


def test_generate_without_exit_is_greedy_recompute(relaxed):
  model, variables = relaxed
  out = generate(model, variables, PROMPTS, max_new_tokens=6, exit_cfg=ExitConfig(threshold=1.0))
  for prompt, tokens, exits in zip(PROMPTS, out.tokens, out.exit_loops, strict=True):
    assert tokens == greedy(model, variables, prompt, 6)
    assert exits == [2] * 6


def test_exit_one_with_full_kv_is_exit_one_greedy(relaxed):
  """threshold 0 and kv_fill='full': every token exits after loop 1 with the no-exit cache (every exit's coda
  slots real), so the tokens are exit 1's greedy tokens of the full model."""
  model, variables = relaxed
  out = generate(model, variables, PROMPTS, max_new_tokens=5, exit_cfg=ExitConfig(threshold=0.0, kv_fill='full'))
  for prompt, tokens, exits in zip(PROMPTS, out.tokens, out.exit_loops, strict=True):
    assert tokens == greedy(model, variables, prompt, 5, exit_index=0)
    assert exits == [1] * 5


def test_skipped_exits_run_the_coda_on_the_exit_state(relaxed):
  """Every token exits after loop 1. Under 'propagate' exit 2's coda runs on the exit state, so its first coda
  layer caches the same K/V as exit 1's; under 'full' it runs on loop 2's output and differs."""
  model, variables = relaxed
  prompts = np.array([[5, 17, 3, 9], [9, 2, 44, 101]], np.int32)
  caches = {}
  for fill in ('propagate', 'full'):
    gen = Generator(model, ExitConfig(threshold=0.0, kv_fill=fill))
    cache = init_cache(model.cfg, model.rec, 2, 16)
    token, _, cache = gen.prefill(variables, jnp.asarray(prompts), jnp.array([4, 4]), cache, jax.random.key(0))
    _, _, cache = gen.step(variables, token, jnp.asarray([4, 4]), cache, jax.random.key(1))
    caches[fill] = np.asarray(cache['coda']['k'])  # [E, U, batch, kv_heads, T, head_dim]
  p, f = caches['propagate'], caches['full']
  np.testing.assert_allclose(p[..., :4, :], f[..., :4, :], atol=1e-6)  # Prompt: every exit real.
  np.testing.assert_allclose(p[0, ..., 4, :], f[0, ..., 4, :], atol=1e-6)  # The exit taken.
  np.testing.assert_allclose(p[1, 0, ..., 4, :], p[0, 0, ..., 4, :], atol=1e-5)
  assert np.abs(f[1, 0, ..., 4, :] - f[0, 0, ..., 4, :]).max() > 1e-4


def test_intermediate_thresholds_generate(relaxed):
  model, variables = relaxed
  out = generate(model, variables, PROMPTS, max_new_tokens=8, exit_cfg=ExitConfig(threshold=0.02))
  assert {e for row in out.exit_loops for e in row} <= {1, 2} and len(out.tokens[0]) == 8


def test_the_engine_refuses_middle_cycle(relaxed):
  model, variables = relaxed
  with pytest.raises(ValueError, match="middle_cycle.*looping='cycle'"):
    Engine(model, variables)


def test_bad_unique_layers_get_clear_errors():
  with pytest.raises(ValueError, match=r"needs looping='middle_cycle'"):
    RecursionConfig(loops=2, unique_layers=1)
  with pytest.raises(ValueError, match='non-negative'):
    RecursionConfig(loops=2, looping='middle_cycle', unique_layers=-1)
  with pytest.raises(ValueError, match=r'no middle layers.*choose unique_layers from \[0, 1, 2\]'):
    RecursionConfig(loops=2, looping='middle_cycle', unique_layers=3).shared_layers(6)
  with pytest.raises(ValueError, match=r'loops=3 does not divide.*loops from \[1, 2, 4\].*unique_layers from \[0\]'):
    RecursionConfig(loops=3, looping='middle_cycle', unique_layers=1).shared_layers(6)
  with pytest.raises(ValueError, match='unique_layers'):
    Decoder(presets.TINY_LLAMA, RecursionConfig(loops=2, looping='middle_cycle', unique_layers=3)).init(
        jax.random.key(0), TOKENS)
  with pytest.raises(ValueError, match='is_unique_depth'):
    MC.depth_to_shared(5, 6)
  assert [MC.unique_part(d, 6) for d in range(6)] == [('prelude', 0), None, None, None, None, ('coda', 0)]
  assert [MC.depth_to_loop(d, 6) * 2 + MC.depth_to_shared(d, 6) for d in range(1, 5)] == [0, 1, 2, 3]


def test_experiment_config_accepts_middle_cycle():
  from experiments.configs import tiny_cpu
  from rrt_jax.train.setup import recursion_config
  c = tiny_cpu.get_config()
  c.recursion.looping, c.recursion.unique_layers = 'middle_cycle', 1
  rec = recursion_config(c)
  assert rec.looping == 'middle_cycle' and rec.unique_layers == 1


@pytest.mark.slow
def test_training_gradients_reach_the_unique_layers():
  cfg = TINY['llama']
  rec = MC.replace(lora_rank=4)
  variables = random_variables(cfg, rec, scale=0.05)

  def loss(v):
    logits, _ = Decoder(cfg, rec).apply(v, TOKENS, all_exits=True)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  grads = jax.grad(loss)(variables)
  for part in ('prelude', 'coda'):
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(layer_tree(grads['params'], part)))
  assert float(jnp.abs(layer_tree(grads['lora'])['attn']['q']['b']).max()) > 0


SEQ = 16


def _batches(vocab: int, n: int = 3, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  seg = np.repeat(np.array([[1] * 10 + [2] * 6]), 2, axis=0).astype(np.int32)
  positions = np.array([list(range(10)) + list(range(6))] * 2, np.int32)
  return [{'inputs': rng.integers(0, vocab, (2, SEQ)).astype(np.int32), 'positions': positions,
           'segment_ids': seg} for _ in range(n)]


@pytest.mark.parametrize('sequential', [False, True])
def test_full_rank_whitened_svd_calibration_is_the_original(llama, sequential):
  cfg, variables, original = llama
  rec = MC.replace(init='average', lora_rank=10_000, lora_alpha=3.0, lora_init='whitened_svd')
  config = CalibrationConfig(tokens=96, seq_len=SEQ, batch_size=2, sequential=sequential)
  relaxed = convert(variables, cfg, rec, _batches(cfg.vocab_size), config, progress=False)
  logits, _ = Decoder(cfg, rec).apply(relaxed, TOKENS)
  assert float(jnp.abs(logits - original).max()) < 1e-4
  low = rec.replace(lora_rank=2)
  low_logits, _ = Decoder(cfg, low).apply(convert(variables, cfg, low, _batches(cfg.vocab_size), config,
                                                  progress=False), TOKENS)
  assert float(jnp.abs(low_logits - original).max()) > 1e-3, 'a low-rank relaxation must differ'
  flat = traverse_util.flatten_dict(relaxed['lora'])
  assert all(x.shape[:2] == (2, 2) for x in flat.values())  # Only the looped positions are relaxed.


def test_unique_layers_have_logical_axes_and_are_checked():
  rec = MC.replace(lora_rank=4)
  axes = logical_axes(presets.TINY_PYTHIA, rec)
  flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  for path, spec in flat:
    assert spec is not None and all(name is not None for name in spec), path
  assert tuple(layer_tree(axes['params'], 'coda')['attn']['q']['kernel']) == ('layers', 'embed', 'heads')
  variables = init_variables(presets.TINY_PYTHIA, rec, jax.random.key(0))
  check_variables(variables, presets.TINY_PYTHIA, rec)
  with pytest.raises(ValueError, match=r'missing prelude|unexpected prelude|shape'):
    check_variables(variables, presets.TINY_PYTHIA, rec.replace(looping='cycle', unique_layers=0))
