"""experiments/bench_matmul.py: every weight format computes the same chain (within its rounding), so the timings
compare the same work, and the byte counts are the formats' sizes."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_matmul as bm
from rrt_jax import presets


def test_formats_compute_the_same_chain_and_count_their_bytes():
  cfg = presets.get('tiny_llama')
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, cfg.d_model)), jnp.float32)
  weights = {fmt: bm.make_weights(cfg, 2, fmt) for fmt in ('f32', 'bf16', 'int8')}
  out = {fmt: np.asarray(jax.jit(bm.chain)(w, x)) for fmt, w in weights.items()}
  assert out['f32'].shape == (2, cfg.vocab_size)
  for fmt in ('bf16', 'int8'):
    err = np.abs(out[fmt] - out['f32']).max() / np.abs(out['f32']).max()
    assert 1e-6 < err < 0.05, (fmt, err)  # Rounded (not the f32 weights), yet the same chain.
  f32 = bm.weight_bytes(weights['f32'])
  assert bm.weight_bytes(weights['bf16']) == f32 // 2
  scales = sum(o * 4 for _, o in bm.layer_shapes(cfg)) * 2 + cfg.vocab_size * 4
  assert bm.weight_bytes(weights['int8']) == f32 // 4 + scales
