"""Invariant 5: KV-cached decoding equals full recompute, token by token, at every loop exit, with B = 3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unroll import perturb

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.model import init_cache, init_variables


@pytest.mark.parametrize('preset,lora_rank', [('tiny_llama', None), ('tiny_gemma', 4),
                                              pytest.param('tiny_pythia', 4, marks=pytest.mark.slow)])
def test_cached_decoding_equals_full_recompute(preset, lora_rank):
  cfg = presets.get(preset)
  rec = RecursionConfig(loops=3, lora_rank=lora_rank)
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(cfg, rec, jax.random.key(0)), 0, 0.1))
  model = Decoder(cfg, rec)
  full = jax.jit(lambda v, t: model.apply(v, t, all_exits=True)[0])
  step = jax.jit(lambda v, t, p, c: model.apply(v, t, p, cache=c, all_exits=True))

  # Two rows with prompts of different lengths (3 and 5), then 6 decode steps, one token each.
  rng = np.random.default_rng(0)
  seqs = rng.integers(0, cfg.vocab_size, size=(2, 11))
  prompt_lens = np.array([3, 5])
  cache = init_cache(cfg, rec, batch=2, max_len=16)
  prompt = np.where(np.arange(5)[None] < prompt_lens[:, None], seqs[:, :5], 0)  # Right-padded.
  logits, cache = step(variables, jnp.asarray(prompt), jnp.broadcast_to(jnp.arange(5), (2, 5)), cache)
  for row in range(2):
    reference = full(variables, jnp.asarray(seqs[row:row + 1, :prompt_lens[row]]))
    np.testing.assert_allclose(logits[:, row, :prompt_lens[row]], reference[:, 0], atol=1e-4, rtol=0)

  positions = prompt_lens.copy()
  for _ in range(6):
    tokens = seqs[np.arange(2), positions][:, None]
    logits, cache = step(variables, jnp.asarray(tokens), jnp.asarray(positions[:, None]), cache)
    assert logits.shape == (3, 2, 1, cfg.vocab_size)  # Every loop's exit, one token per row.
    for row in range(2):
      reference = full(variables, jnp.asarray(seqs[row:row + 1, :positions[row] + 1]))
      np.testing.assert_allclose(logits[:, row, 0], reference[:, 0, -1], atol=1e-4, rtol=0)
    positions += 1

  # One slot per depth position: loops wrote different keys into their own slots.
  assert cache['k'].shape == (3, 2, 2, cfg.num_kv_heads, 16, cfg.head_dim)
  assert float(jnp.abs(cache['k'][0] - cache['k'][1]).max()) > 1e-3
  assert float(jnp.abs(cache['k'][..., 12:, :]).max()) == 0  # Nothing written past the last position.
