"""The per-layer serving layout (LayerLayout.PER_LAYER): the same values as the stacked training layout for every
looping that has it, a lossless round trip, generate() and the engine equal in either layout, and the on-device
decode loop equal to stepping from the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_copies import loop_copies
from unroll import perturb

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.config import LayerLayout
from rrt_jax.model import (
    FUSED_PROJECTIONS,
    init_cache,
    init_variables,
    layer_layout,
    layer_tree,
    per_layer_cache,
    propagate_kv,
    with_layer_layout,
)
from rrt_jax.serve.engine import Engine, EngineConfig, Request
from rrt_jax.serve.generate import ExitConfig, Generator, generate, token_keys

CFG = presets.TINY_GEMMA
RECS = {
    'vanilla': RecursionConfig(),
    'relaxed': RecursionConfig(loops=3, lora_rank=4),
    'middle_cycle': RecursionConfig(loops=2, looping='middle_cycle', unique_layers=1, lora_rank=4),
}
PROMPTS = [[5, 17, 3], [9, 2, 44, 101, 7, 8, 300], [11]]


def _model(name):
  rec = RECS[name]
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(CFG, rec, jax.random.key(0)), 0, 0.05))
  return Decoder(CFG, rec), variables


@pytest.mark.parametrize('name', sorted(RECS))
def test_per_layer_layout_has_the_same_logits_and_round_trips(name):
  model, variables = _model(name)
  served, per_layer = with_layer_layout(model, variables, 'per_layer')
  assert layer_layout(per_layer) == LayerLayout.PER_LAYER and served.cfg.layer_layout == LayerLayout.PER_LAYER
  tokens = jnp.asarray(np.arange(14).reshape(2, 7) * 13 % CFG.vocab_size)
  want = model.apply(variables, tokens, all_exits=True)[0]
  got = served.apply(per_layer, tokens, all_exits=True)[0]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  back_model, back = with_layer_layout(served, per_layer, 'stacked')
  assert back_model.cfg.layer_layout == LayerLayout.STACKED
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True))


# Families whose fused projections differ: q/k/v biases with per-depth bias deltas and a gate (Qwen2), and no
# gate with biases on every projection and parallel residual (Pythia: q/k/v fuse, up stays alone).
FUSION_CFGS = {
    'qwen2': presets.QWEN2_5_0_5B.replace(vocab_size=512, num_layers=4, d_model=64, num_heads=4, num_kv_heads=2,
                                          head_dim=16, mlp_dim=96, max_seq_len=64),
    'pythia': presets.TINY_PYTHIA,
}


@pytest.mark.parametrize('name', sorted(FUSION_CFGS))
def test_the_serving_layout_fuses_projections_and_keeps_every_delta(name):
  cfg = FUSION_CFGS[name]
  rec = RecursionConfig(loops=2, lora_rank=4)  # relax_vectors: bias deltas on q/k/v (Qwen2), every bias (Pythia).
  model = Decoder(cfg, rec)
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(cfg, rec, jax.random.key(0)), 0, 0.05))
  served, fused = with_layer_layout(model, variables, 'per_layer')
  unfused_model, unfused = with_layer_layout(model.clone(cfg=cfg.replace(fuse_projections=False)), variables,
                                             'per_layer')
  first = lambda tree: jax.tree.map(lambda x: x[0], layer_tree(tree)) if '0' not in layer_tree(tree) else \
      layer_tree(tree)['0']  # noqa: E731
  stacked_layer, layer = first(variables['params']), first(fused['params'])
  expected = {(module, name) for module, groups in FUSED_PROJECTIONS.items() for name, parts in groups.items()
              if all(p in stacked_layer[module] for p in parts)}
  assert expected == ({('attn', 'qkv'), ('mlp', 'gate_up')} if name == 'qwen2' else {('attn', 'qkv')})
  for module, fused_name in expected:
    parts = FUSED_PROJECTIONS[module][fused_name]
    assert not any(p in layer[module] for p in parts)  # Their kernels (and biases) live in the fused one only.
    np.testing.assert_array_equal(layer[module][fused_name]['kernel'],
                                  np.concatenate([stacked_layer[module][p]['kernel'] for p in parts], axis=-1))
  assert jax.tree.structure(first(unfused['params'])) == jax.tree.structure(stacked_layer)
  assert jax.tree.structure(fused['lora']) == jax.tree.structure(unfused['lora'])  # LoRA is never fused.
  tokens = jnp.asarray(np.arange(14).reshape(2, 7) * 13 % cfg.vocab_size)
  want = model.apply(variables, tokens, all_exits=True)[0]
  np.testing.assert_allclose(served.apply(fused, tokens, all_exits=True)[0], want, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(unfused_model.apply(unfused, tokens, all_exits=True)[0], want, atol=2e-5, rtol=1e-5)
  back = with_layer_layout(served, fused, 'stacked')[1]
  assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True))
  # Per-layer variables carry their own fusion: a model told otherwise is corrected, not mismatched.
  assert with_layer_layout(served.clone(cfg=served.cfg.replace(fuse_projections=False)), fused,
                           'per_layer')[0].cfg.fuse_projections
  gen = [generate(*pair, PROMPTS, 6, exit_cfg=ExitConfig(threshold=1.0), layer_layout='per_layer').tokens
         for pair in ((served, fused), (unfused_model, unfused))]
  assert gen[0] == gen[1] == generate(model, variables, PROMPTS, 6, exit_cfg=ExitConfig(threshold=1.0),
                                      layer_layout='stacked').tokens


def test_propagated_kv_is_the_same_in_both_layouts():
  model, variables = _model('relaxed')
  served, per_layer = with_layer_layout(model, variables, 'per_layer')
  h = jax.random.normal(jax.random.key(1), (2, 1, CFG.d_model))
  positions = jnp.array([[3], [5]])
  want = propagate_kv(model, variables, h, positions, (1, 2))
  got = propagate_kv(served, per_layer, h, positions, (1, 2))
  for key in ('k', 'v'):
    np.testing.assert_allclose(got[key], want[key], atol=1e-6)


@pytest.mark.parametrize('name', sorted(RECS))
def test_a_per_layer_cache_steps_as_the_stacked_one(name):
  """Two no-exit decode steps of a per-layer model: the per-(loop, layer) cache the decode loop carries gives the
  stacked cache's tokens, and holds the same K/V, every (loop, layer) written in its own buffer."""
  model, variables = _model(name)
  served, per_layer = with_layer_layout(model, variables, 'per_layer')
  gen = Generator(model, ExitConfig(threshold=1.0))
  cache = init_cache(CFG, model.rec, 2, 32)
  keys = token_keys(jax.random.key(0), jnp.arange(2, dtype=jnp.int32), jnp.zeros(2, jnp.int32))
  prompts = jnp.asarray([[5, 17, 3, 0], [9, 2, 44, 101]])
  _, _, cache = gen.prefill(per_layer, prompts, jnp.asarray([3, 4]), cache, keys)
  split = per_layer_cache(jax.tree.map(jnp.copy, cache))  # Its own buffers: the step donates each cache.
  layers = model.rec.shared_layers(CFG.num_layers)
  assert isinstance(split['k'], tuple) and len(split['k']) == model.rec.loops  # One buffer per (loop, layer).
  assert all(isinstance(loop, tuple) and len(loop) == layers for loop in split['k'])
  tokens, positions = jnp.asarray([7, 8]), jnp.asarray([3, 4])
  step = gen.counted_step  # The step the decode loop runs (it donates the cache: each is replaced below).
  for _ in range(2):
    want_token, _, cache, _ = step(per_layer, tokens, positions, cache, keys)
    got_token, _, split, _ = step(per_layer, tokens, positions, split, keys)
    np.testing.assert_array_equal(got_token, want_token)
    for name_ in ('k', 'v'):
      restacked = jnp.concatenate([jnp.stack(loop, axis=1) for loop in split[name_]])
      np.testing.assert_allclose(restacked, cache[name_], atol=1e-6)
    tokens, positions = want_token, positions + 1
  assert float(jnp.abs(cache['k'][..., 4, :]).max()) > 0, 'the steps must have written K'


@pytest.mark.parametrize('name,threshold', [('relaxed', 1.0), ('relaxed', 0.02), ('middle_cycle', 0.02)])
def test_generate_is_the_same_in_both_layouts(name, threshold):
  model, variables = _model(name)
  exit_cfg = ExitConfig(threshold=threshold)
  stacked = generate(model, variables, PROMPTS, 6, exit_cfg=exit_cfg, layer_layout='stacked')
  per_layer = generate(model, variables, PROMPTS, 6, exit_cfg=exit_cfg)
  assert per_layer.tokens == stacked.tokens and per_layer.exit_loops == stacked.exit_loops
  if threshold < 1:
    assert any(e < model.rec.loops for row in per_layer.exit_loops for e in row)  # The exits were exercised.


def test_device_loop_equals_host_steps_and_honours_stop_tokens():
  """generate()'s on-device loop against the jitted step fed back from the host (what generate() did before)."""
  model, variables = _model('relaxed')
  gen = Generator(model, ExitConfig(threshold=0.02))
  rows, steps = 2, 5
  prompts = jnp.asarray([[5, 17, 3, 8], [9, 2, 44, 101]], jnp.int32)
  lengths = jnp.array([4, 4], jnp.int32)
  base, seeds = jax.random.key(0), jnp.arange(rows, dtype=jnp.int32)
  cache = init_cache(CFG, model.rec, rows, 16)
  token, exit_loop, cache = gen.prefill(variables, prompts, lengths, cache, token_keys(base, seeds, seeds * 0))
  host_tokens, host_exits = [token], [exit_loop]
  for i in range(1, steps):
    token, exit_loop, cache = gen.step(variables, token, lengths + i - 1, cache,
                                       token_keys(base, seeds, jnp.full(rows, i, jnp.int32)))
    host_tokens.append(token)
    host_exits.append(exit_loop)
  host = np.stack(host_tokens).T.tolist()
  out = generate(model, variables, prompts.tolist(), steps, exit_cfg=ExitConfig(threshold=0.02), generator=gen)
  assert out.tokens == host
  assert out.exit_loops == np.stack(host_exits).T.tolist()
  stop = host[0][2]  # Row 0 stops before its third token; row 1 at its first `stop`, if any.
  stopped = generate(model, variables, prompts.tolist(), steps, exit_cfg=ExitConfig(threshold=0.02),
                     stop_tokens=[stop], generator=gen)
  for row, full in zip(stopped.tokens, host, strict=True):
    assert row == (full[:full.index(stop)] if stop in full else full)


def test_engine_serves_the_same_tokens_in_the_per_layer_layout():
  model, variables = _model('relaxed')
  config = EngineConfig(slots=2, max_len=32, exit=ExitConfig(threshold=0.02))
  requests = [Request(p, 5) for p in PROMPTS]
  completions, _ = Engine(model, variables, config).run(requests)
  assert layer_layout(Engine(model, variables, config).variables) == LayerLayout.PER_LAYER
  want = generate(model, variables, PROMPTS, 5, exit_cfg=ExitConfig(threshold=0.02), layer_layout='stacked')
  assert [c.tokens for c in completions] == want.tokens


def test_sequence_looping_has_no_per_layer_form():
  rec = RecursionConfig(loops=2, looping='sequence')
  model = Decoder(CFG.replace(layer_layout='per_layer'), rec)
  with pytest.raises(ValueError, match="SEQUENCE model keeps layer_layout='stacked'"):
    model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  variables = init_variables(CFG, rec, jax.random.key(0))
  served, same = with_layer_layout(Decoder(CFG, rec), variables, 'per_layer')
  assert same is variables and served.cfg.layer_layout == LayerLayout.STACKED



@pytest.mark.parametrize('rec', [RecursionConfig(), RecursionConfig(loops=4, lora_rank=4),
                                 RecursionConfig(loops=2, looping='middle_cycle', unique_layers=1, lora_rank=4)],
                         ids=['vanilla', 'relaxed', 'middle_cycle'])
def test_the_decode_loop_writes_the_cache_in_place(rec):
  """The compiled no-exit decode loop of a per-layer model copies no K/V buffer per step: the attention reads the
  old buffers and the write is ordered after (attention.cached_attention), and a recursive model's cache is one
  buffer per (loop, layer) (per_layer_cache; BUILD_NOTES, issue 26). Without the ordering this program copies 2
  buffers per layer per step (SmolLM2-135M copied 180); with [R, ...] buffers per layer, sliced by loop and
  concatenated back, every buffer of a recursive model was copied whole per step."""
  cfg = presets.SMOLLM2_135M.replace(num_layers=4, vocab_size=512, d_model=64, num_heads=4, num_kv_heads=2,
                                     head_dim=16, mlp_dim=128)
  model = Decoder(cfg, rec)
  gen = Generator(model, ExitConfig(threshold=1.0))
  model, variables = with_layer_layout(model, init_variables(cfg, rec, jax.random.key(0)), LayerLayout.PER_LAYER)
  batch, slots, steps = 1, 32, 8
  hlo = gen.decode_loop.lower(variables, jnp.zeros((steps, batch), jnp.int32), jnp.zeros((steps, batch), jnp.int32),
                              jnp.full((batch,), 3, jnp.int32), init_cache(cfg, model.rec, batch, slots),
                              jax.random.key(0), jnp.arange(batch, dtype=jnp.int32), jnp.zeros((0,), jnp.int32),
                              jnp.int32(steps)).compile().as_text()
  buffer = f'{batch},{cfg.num_kv_heads},{slots},{cfg.head_dim}'
  assert f'f32[1,{buffer}]' in hlo, 'the per-(loop, layer) K/V buffers must be in the program'
  assert loop_copies(hlo, buffer) == []
