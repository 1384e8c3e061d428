"""ModelConfig.scan_unroll: the scans over layers and loops unrolled in the compiled program give the scanned
model's logits and gradients, with the same variables (so checkpoints load either way), for every looping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unroll import perturb

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.config import Looping
from rrt_jax.model import init_variables

CFG = presets.TINY_LLAMA


@pytest.mark.parametrize('rec', [
    RecursionConfig(loops=3, lora_rank=4),
    pytest.param(RecursionConfig(loops=2, lora_rank=4, looping=Looping.SEQUENCE), marks=pytest.mark.slow),
    pytest.param(RecursionConfig(loops=2, lora_rank=4, looping=Looping.MIDDLE_CYCLE, unique_layers=1),
                 marks=pytest.mark.slow),
], ids=['cycle', 'sequence', 'middle_cycle'])
def test_unrolled_scans_equal_scanned(rec):
  variables = perturb(init_variables(CFG, rec, jax.random.key(0)), 1)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)

  def loss(v, cfg):
    logits, _ = Decoder(cfg, rec).apply(v, tokens, all_exits=True)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

  scanned, unrolled = CFG, CFG.replace(scan_unroll=True)
  (l0, logits0), g0 = jax.value_and_grad(loss, has_aux=True)(variables, scanned)
  (l1, logits1), g1 = jax.value_and_grad(loss, has_aux=True)(variables, unrolled)
  np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
  init_unrolled = jax.eval_shape(lambda: init_variables(unrolled, rec, jax.random.key(0)))
  assert jax.tree.map(lambda x: x.shape, init_unrolled) == jax.tree.map(lambda x: x.shape, variables)
