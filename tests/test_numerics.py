"""bf16 compute with fp32 params, and remat policies that change memory, not results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.model import init_variables, layer_tree, logical_axes

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 16)))


def test_bf16_compute_keeps_fp32_params_and_logits():
  cfg = presets.TINY_GEMMA
  rec = RecursionConfig(loops=2, lora_rank=4)
  variables = init_variables(cfg.replace(dtype='bfloat16'), rec, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
  bf16, _ = Decoder(cfg.replace(dtype='bfloat16'), rec).apply(variables, TOKENS)
  fp32, _ = Decoder(cfg, rec).apply(variables, TOKENS)
  assert bf16.dtype == jnp.float32
  # bf16 has ~3 significant digits: close to fp32, but not equal (so it really ran in bf16).
  err = float(jnp.max(jnp.abs(bf16 - fp32)))
  assert 1e-4 < err < 0.1 * float(jnp.max(jnp.abs(fp32)))


@pytest.mark.parametrize('policy', ['dots', pytest.param('full', marks=pytest.mark.slow),
                                    pytest.param('dots_no_batch', marks=pytest.mark.slow)])
def test_remat_policies_give_the_same_gradients(policy):
  cfg = presets.TINY_LLAMA
  rec = RecursionConfig(loops=3, lora_rank=4)
  variables = init_variables(cfg, rec, jax.random.key(1))

  def loss(v, c):
    logits, _ = Decoder(c, rec).apply(v, TOKENS)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  expected = jax.grad(loss)(variables, cfg)
  got = jax.grad(loss)(variables, cfg.replace(remat=policy))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), got, expected)


def test_every_weight_has_logical_axis_names():
  axes = logical_axes(presets.TINY_PYTHIA, RecursionConfig(loops=2, lora_rank=4))
  flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  for path, spec in flat:
    assert spec is not None and all(name is not None for name in spec), path
  lora_q_a = layer_tree(axes['lora'])['attn']['q']['a']
  assert tuple(lora_q_a) == ('loops', 'layers', 'embed', 'lora_rank')
  assert tuple(layer_tree(axes['params'])['attn']['q']['kernel']) == ('layers', 'embed', 'heads')
