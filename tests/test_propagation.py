"""K/V propagation (model/propagation.py) == the K/V the decoder itself caches where their inputs coincide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unroll import perturb

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.model import init_cache, init_variables, loop_variables, one_loop, propagate_kv

CFG = presets.TINY_LLAMA


@pytest.mark.parametrize('rec', [RecursionConfig(loops=3), RecursionConfig(loops=3, lora_rank=4),
                                 RecursionConfig(loops=3, lora_rank=4, lora_targets=('q', 'k'))],
                         ids=['recursive', 'relaxed', 'lora_on_k_not_v'])
def test_propagated_kv_equals_the_cached_kv_of_the_first_layer(rec):
  """Layer 0 of loop r caches the K/V of the loop's input: propagating that input must give the same K/V at
  every loop (each with its own LoRA), and a different layer must not."""
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(CFG, rec, jax.random.key(0)), 0, 0.05))
  model, block = Decoder(CFG, rec), one_loop(Decoder(CFG, rec))
  h = jax.random.normal(jax.random.key(1), (2, 1, CFG.d_model))
  positions = jnp.array([[3], [5]], jnp.int32)
  propagated = propagate_kv(model, variables, h, positions, range(rec.loops))  # [R, K, 2, kvh, 1, hd]
  assert propagated['k'].shape == (rec.loops, 2, 2, CFG.num_kv_heads, 1, CFG.head_dim)
  for loop in range(rec.loops):
    cache = init_cache(block.cfg, block.rec, 2, 8)
    _, cache = block.apply(loop_variables(variables, loop), h, positions, cache, method=Decoder.decode_stack)
    for name in ('k', 'v'):
      cached = cache[name][0, 0, jnp.arange(2), :, positions[:, 0]]  # [2, kvh, hd]
      np.testing.assert_allclose(propagated[name][loop, 0, :, :, 0], cached, atol=1e-5)
      assert np.abs(np.asarray(propagated[name][loop, 1, :, :, 0] - cached)).max() > 1e-3
  if rec.has_lora:  # Each loop used its own LoRA on k.
    assert np.abs(np.asarray(propagated['k'][0] - propagated['k'][1])).max() > 1e-4
