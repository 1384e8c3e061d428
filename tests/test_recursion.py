"""Invariants 2 and 4: the scanned recursive model equals the unrolled tied model, for CYCLE and SEQUENCE,
at every loop exit, and the shared params' gradient is the sum of the per-depth gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from unroll import depth_order, perturb, unroll

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.convert import to_recursive
from rrt_jax.model import init_variables, layer_tree

TINY = {'llama': presets.TINY_LLAMA, 'gemma': presets.TINY_GEMMA, 'gpt_neox': presets.TINY_PYTHIA}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 11)))


def random_variables(cfg, rec, seed=0):
  """Random variables with every leaf perturbed, LoRA B and vector deltas included."""
  return jax.tree.map(jnp.asarray, perturb(init_variables(cfg, rec, jax.random.key(seed)), seed, 0.2))


def _grid():
  """Every (family, looping) in the default run, its rank alternating; the other rank in the slow set."""
  out = []
  for i, (family, looping) in enumerate((f, lp) for f in sorted(TINY) for lp in ('cycle', 'sequence')):
    for j, rank in enumerate((None, 4)):
      marks = [pytest.mark.slow] if (i + j) % 2 else []
      out.append(pytest.param(family, looping, rank, marks=marks, id=f'{rank}-{looping}-{family}'))
  return out


@pytest.mark.parametrize('family,looping,lora_rank', _grid())
def test_recursive_equals_unrolled_tied_model(family, looping, lora_rank):
  cfg = TINY[family]
  rec = RecursionConfig(loops=3, looping=looping, lora_rank=lora_rank, lora_alpha=8.0)
  variables = random_variables(cfg, rec)
  recursive, _ = Decoder(cfg, rec).apply(variables, TOKENS)
  vanilla, _ = Decoder(cfg).apply(unroll(variables, looping, 3, lora_alpha=8.0), TOKENS)
  assert float(jnp.std(vanilla)) > 0.1
  np.testing.assert_allclose(recursive, vanilla, atol=2e-4, rtol=0)


def test_depth_order_matters():
  """The comparison above can fail: SEQUENCE weights run in CYCLE order give different logits."""
  cfg = TINY['llama']
  rec = RecursionConfig(loops=3, looping='sequence')
  variables = random_variables(cfg, rec)
  recursive, _ = Decoder(cfg, rec).apply(variables, TOKENS)
  wrong, _ = Decoder(cfg).apply(unroll(variables, 'cycle', 3), TOKENS)
  assert float(jnp.abs(recursive - wrong).max()) > 1e-2


@pytest.mark.parametrize('lora_rank', [None, 4])
def test_every_loop_exit_equals_truncated_model(lora_rank):
  cfg = TINY['gemma']
  rec = RecursionConfig(loops=3, lora_rank=lora_rank)
  variables = random_variables(cfg, rec, seed=1)
  exits, _ = Decoder(cfg, rec).apply(variables, TOKENS, all_exits=True)
  assert exits.shape == (3, 2, 11, cfg.vocab_size)
  for b in range(3):
    depth = (b + 1) * 2
    truncated = unroll(variables, 'cycle', 3, depths=depth)
    expected, _ = Decoder(cfg.replace(num_layers=depth)).apply(truncated, TOKENS)
    np.testing.assert_allclose(exits[b], expected, atol=2e-4, rtol=0)


def test_sequence_has_only_the_final_exit():
  cfg = TINY['llama']
  rec = RecursionConfig(loops=2, looping='sequence')
  exits, _ = Decoder(cfg, rec).apply(random_variables(cfg, rec), TOKENS, all_exits=True)
  assert exits.shape[0] == 1


# Loop 1 of any init is the vanilla model; one init in the default run, the rest repeat it in the slow set.
@pytest.mark.parametrize('init', ['stepwise'] + [pytest.param(i, marks=pytest.mark.slow)
                                                for i in ('average', 'stepwise_ends', 'lower', 'upper', 'random')])
def test_one_loop_is_the_vanilla_model(init):
  cfg = TINY['gpt_neox']
  vanilla = random_variables(cfg, RecursionConfig(), seed=2)
  for rec in (RecursionConfig(loops=1, init=init), RecursionConfig(loops=1, init=init, lora_rank=3)):
    converted = to_recursive(vanilla, cfg, rec)
    jax.tree.map(np.testing.assert_array_equal, converted['params'], vanilla['params'])
    out, _ = Decoder(cfg, rec).apply(converted, TOKENS)
    ref, _ = Decoder(cfg).apply(vanilla, TOKENS)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize('looping', ['cycle', 'sequence'])
def test_shared_gradient_is_sum_of_unrolled_gradients(looping):
  cfg = TINY['llama']
  loops = 3
  rec = RecursionConfig(loops=loops, looping=looping)
  variables = random_variables(cfg, rec, seed=3)
  targets = jnp.roll(TOKENS, -1, axis=1)

  def loss(v, model):
    logits, _ = model.apply(v, TOKENS)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  grads = jax.grad(loss)(variables, Decoder(cfg, rec))['params']
  unrolled = jax.tree.map(jnp.asarray, unroll(variables, looping, loops))
  unrolled_grads = jax.grad(loss)(unrolled, Decoder(cfg))['params']

  shared = traverse_util.flatten_dict(layer_tree(grads))
  per_depth = traverse_util.flatten_dict(layer_tree(unrolled_grads))
  order = depth_order(looping, loops, 2)
  for path, g in shared.items():
    assert g.shape[0] == 2, f'{path}: shared params must carry K = 2 layers and no loop axis'
    expected = np.stack([sum(per_depth[path][d] for d, (_, k) in enumerate(order) if k == kk) for kk in range(2)])
    np.testing.assert_allclose(g, expected, atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(g).max()) > 0
  for name in ('embedder', 'final_norm', 'lm_head'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads[name],
                 unrolled_grads[name])


def test_configs_are_hashable_static_args():
  rec = RecursionConfig(loops=2, lora_targets='q,v')
  assert rec.lora_targets == ('q', 'v')
  assert hash(rec) == hash(dataclasses.replace(rec))
