"""Invariant 3: relaxed conversion. Full rank reproduces the original model for every init method and
lora_alpha; rank r gives the best rank-r residual; zero-init LoRA starts as the plain recursive model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES
from flax import traverse_util
from unroll import unroll

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.convert import source_layers, to_recursive
from rrt_jax.model import layer_tree, with_layer_tree
from rrt_jax.pretrained.hf import load_hf

INITS = ['stepwise', 'stepwise_ends', 'average', 'lower', 'upper', 'random']
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 96, size=(2, 9)))


@pytest.fixture(scope='module')
def originals(tiny_hf):
  out = {}
  for family in FAMILIES:
    cfg, variables = load_hf(tiny_hf[family][0])
    logits, _ = jax.jit(Decoder(cfg).apply)(variables, TOKENS)
    out[family] = (cfg, variables, logits)
  return out


# Each family and each looping in the default run; the other three pairs repeat them in the slow set.
@pytest.mark.parametrize('family,looping', [
    (f, lp) if (f, lp) in {('llama', 'cycle'), ('gemma', 'sequence'), ('gpt_neox', 'cycle')}
    else pytest.param(f, lp, marks=pytest.mark.slow) for f in FAMILIES for lp in ('cycle', 'sequence')])
def test_full_rank_relaxed_model_is_the_original(originals, family, looping):
  cfg, variables, original = originals[family]
  # Rank 10_000 is capped at min(d_in, d_out) per target; alpha != rank on purpose.
  base = RecursionConfig(loops=3, looping=looping, lora_rank=10_000, lora_alpha=3.0)
  relaxed_fwd = jax.jit(Decoder(cfg, base).apply)  # The init method does not change the forward pass.
  plain_fwd = jax.jit(Decoder(cfg, base.replace(lora_rank=None)).apply)
  for init in INITS:
    rec = base.replace(init=init)
    logits, _ = relaxed_fwd(to_recursive(variables, cfg, rec), TOKENS)
    err = float(jnp.abs(logits - original).max())
    assert err < 1e-4, f'{family}/{looping}/{init}: max |delta logit| = {err}'
    plain_logits, _ = plain_fwd(to_recursive(variables, cfg, rec.replace(lora_rank=None)), TOKENS)
    assert float(jnp.abs(plain_logits - original).max()) > 1e-2, 'without LoRA the model must differ'


def test_full_rank_needs_the_vector_deltas(originals):
  """Averaged norms/biases are beyond LoRA's reach: without per-depth vector deltas it is not exact."""
  cfg, variables, original = originals['gpt_neox']
  rec = RecursionConfig(loops=2, init='average', lora_rank=10_000, relax_vectors=False)
  logits, _ = Decoder(cfg, rec).apply(to_recursive(variables, cfg, rec), TOKENS)
  assert float(jnp.abs(logits - original).max()) > 1e-3


@pytest.mark.parametrize('alpha', [None, pytest.param(2.0, marks=pytest.mark.slow), 64.0])
def test_rank_r_is_the_truncated_svd_of_the_residual(originals, alpha):
  cfg, variables, _ = originals['llama']
  rank, loops = 3, 2
  rec = RecursionConfig(loops=loops, init='average', lora_rank=rank, lora_alpha=alpha)
  relaxed = to_recursive(variables, cfg, rec)
  logits, _ = Decoder(cfg, rec).apply(relaxed, TOKENS)

  # Reference: original kernels with each residual to the averaged shared kernel truncated by numpy SVD.
  orig = traverse_util.flatten_dict(jax.tree.map(np.asarray, layer_tree(variables['params'])))
  shared = traverse_util.flatten_dict(jax.tree.map(np.asarray, layer_tree(relaxed['params'])))
  k_layers = cfg.num_layers // loops
  layers = {}
  for path, w in orig.items():
    rows = []
    for depth in range(cfg.num_layers):
      base = shared[path][depth % k_layers].astype(np.float64)
      residual = w[depth].astype(np.float64) - base
      if path[-1] == 'kernel':
        u, s, vh = np.linalg.svd(residual, full_matrices=False)
        residual = (u[:, :rank] * s[:rank]) @ vh[:rank]
      rows.append(base + residual)  # Norm scales: exact via the vector deltas.
    layers[path] = np.stack(rows).astype(np.float32)
  reference = with_layer_tree(variables['params'], traverse_util.unflatten_dict(layers))
  expected, _ = Decoder(cfg).apply({'params': reference}, TOKENS)
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_zero_init_lora_starts_as_the_recursive_model(originals):
  cfg, variables, _ = originals['gemma']
  rec = RecursionConfig(loops=2, init='stepwise', lora_rank=4, lora_init='zero')
  relaxed = to_recursive(variables, cfg, rec)
  a = layer_tree(relaxed['lora'])['attn']['q']['a']
  assert float(jnp.abs(a).min()) >= 0 and float(jnp.std(a)) > 0  # A is random, B is zero.
  logits, _ = Decoder(cfg, rec).apply(relaxed, TOKENS)
  plain_rec = rec.replace(lora_rank=None)
  plain, _ = Decoder(cfg, plain_rec).apply(to_recursive(variables, cfg, plain_rec), TOKENS)
  np.testing.assert_allclose(logits, plain, atol=1e-5, rtol=0)


def test_stepwise_source_layers_of_the_paper():
  """Fixed-ends Stepwise reproduces the layer lists of the first author's code (Bae et al., ICLR 2025, App. F.1)."""
  ends = lambda layers, loops: source_layers(RecursionConfig(loops=loops, init='stepwise_ends'), layers)
  assert ends(18, 2) == [0, 2, 4, 6, 8, 11, 13, 15, 17]
  assert ends(18, 3) == [0, 3, 7, 10, 14, 17]
  assert ends(22, 2) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21]
  assert ends(16, 2) == [0, 2, 4, 6, 9, 11, 13, 15]
  assert source_layers(RecursionConfig(loops=2, init='stepwise'), 6) == [0, 2, 4]
  assert source_layers(RecursionConfig(loops=3, init='lower'), 6) == [0, 1]
  assert source_layers(RecursionConfig(loops=3, init='upper'), 6) == [4, 5]


def test_unroll_reference_agrees_with_conversion(originals):
  """Cross-check of the two references: merging the SVD LoRA back gives the original weights."""
  cfg, variables, _ = originals['gemma']
  rec = RecursionConfig(loops=3, init='average', lora_rank=10_000, lora_alpha=5.0)
  merged = unroll(to_recursive(variables, cfg, rec), 'cycle', 3, lora_alpha=5.0)
  for path, w in traverse_util.flatten_dict(variables['params']).items():
    np.testing.assert_allclose(traverse_util.flatten_dict(merged['params'])[path], w, atol=2e-5)


def test_norm_init_methods(originals):
  """avg averages the tied norms, choice takes the source layer's, zero is the norm's identity."""
  for family, identity in (('gemma', 0.0), ('llama', 1.0)):
    cfg, variables, _ = originals[family]
    scale = np.asarray(layer_tree(variables['params'])['attn_norm']['scale'])  # [6, d]

    def shared(norm_init, init, cfg=cfg, variables=variables):
      rec = RecursionConfig(loops=3, init=init, norm_init=norm_init)
      return np.asarray(layer_tree(to_recursive(variables, cfg, rec)['params'])['attn_norm']['scale'])
    np.testing.assert_allclose(shared('avg', 'stepwise'), [scale[[0, 2, 4]].mean(0), scale[[1, 3, 5]].mean(0)],
                               rtol=1e-6)
    np.testing.assert_array_equal(shared('choice', 'stepwise'), scale[[0, 3]])  # Stepwise: layers 0, B.
    np.testing.assert_array_equal(shared('auto', 'stepwise'), scale[[0, 3]])
    np.testing.assert_array_equal(shared('zero', 'average'), np.full((2, scale.shape[1]), identity))
