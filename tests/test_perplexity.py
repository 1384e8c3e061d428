"""Per-loop perplexity: sliding windows score every token exactly once; the mean has no padding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.eval.perplexity import per_loop_perplexity, sliding_windows
from rrt_jax.model import init_variables


@pytest.mark.parametrize('length,window,stride', [(50, 16, 16), (50, 16, 5), (17, 16, 16), (9, 16, 4)])
def test_every_token_is_scored_once(length, window, stride):
  ids = np.arange(100, 100 + length)
  w = sliding_windows(ids, window, stride)
  assert w.num_tokens == length - 1
  scored = np.sort(w.targets[w.mask > 0])
  np.testing.assert_array_equal(scored, ids[1:])
  # Each scored target's input is its predecessor in the sequence.
  np.testing.assert_array_equal(w.inputs[w.mask > 0], scored - 1)


def test_bad_stride_is_rejected():
  with pytest.raises(ValueError, match='stride must be in'):
    sliding_windows(range(10), 4, 5)


def test_per_loop_perplexity_matches_direct_computation():
  cfg = presets.TINY_GEMMA
  rec = RecursionConfig(loops=3)
  model = Decoder(cfg, rec)
  variables = init_variables(cfg, rec, jax.random.key(0))
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=40)
  # Window covers the whole text: the direct computation over the full sequence is the reference.
  got = per_loop_perplexity(model, variables, sliding_windows(ids, 64), batch_size=1)
  logits, _ = model.apply(variables, jnp.asarray(ids[None, :-1]), all_exits=True)
  logp = jax.nn.log_softmax(logits)
  for b in range(3):
    nll = -np.mean([float(logp[b, 0, t, ids[t + 1]]) for t in range(len(ids) - 1)])
    assert got[b] == pytest.approx(math.exp(nll), rel=1e-5)
  # Batching with padding windows (3 windows, batch 2) does not change the result.
  w = sliding_windows(ids, 16)
  np.testing.assert_allclose(per_loop_perplexity(model, variables, w, batch_size=2),
                             per_loop_perplexity(model, variables, w, batch_size=1), rtol=1e-5)
