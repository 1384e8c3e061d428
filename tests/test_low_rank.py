"""The low-rank baseline (untied whitened low-rank compression): exact at full rank, beats plain SVD on the
calibration inputs, its parameter count is what a factored model stores, and the budget picks the largest rank."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.config import VANILLA, ModelConfig
from rrt_jax.convert.calibration import CalibrationConfig, collect_grams
from rrt_jax.convert.low_rank import low_rank_compress, low_rank_param_count, low_rank_recursion, rank_for_budget
from rrt_jax.convert.recursive import svd_lora
from rrt_jax.model import count_params, target_dims
from rrt_jax.model.layerwise import TARGET_INPUTS, apply_layer, depth_variables, embed
from rrt_jax.presets import SMOLLM2_135M
from rrt_jax.pretrained.hf import load_hf

SEQ = 16
CALIB = CalibrationConfig(tokens=96, seq_len=SEQ, batch_size=2)
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 96, (2, 9)))
MODULE = {'q': 'attn', 'k': 'attn', 'v': 'attn', 'o': 'attn', 'gate': 'mlp', 'up': 'mlp', 'down': 'mlp'}


def _batches(vocab: int, n: int = 3, seed: int = 0) -> list[dict]:
  """Two documents per row (segment ids 1, 2; positions restart); the last batch's second row is padding."""
  rng = np.random.default_rng(seed)
  seg = np.array([[1] * 10 + [2] * 6] * 2, np.int32)
  positions = np.array([list(range(10)) + list(range(6))] * 2, np.int32)
  out = [{'inputs': rng.integers(0, vocab, (2, SEQ)).astype(np.int32), 'positions': positions,
          'segment_ids': seg.copy()} for _ in range(n)]
  out[-1]['segment_ids'][1] = 0
  return out


@pytest.fixture(scope='module')
def originals(tiny_hf):
  out = {}
  for family in FAMILIES:
    cfg, variables = load_hf(tiny_hf[family][0])
    out[family] = (cfg, variables, collect_grams(cfg, variables, _batches(cfg.vocab_size), CALIB, progress=False))
  return out


@pytest.mark.parametrize('family', FAMILIES)
def test_full_rank_compression_is_the_original(originals, family):
  cfg, variables, grams = originals[family]
  original, _ = Decoder(cfg).apply(variables, TOKENS)
  model, compressed = low_rank_compress(variables, cfg, grams, rank=10_000)  # Capped per target.
  logits, _ = model.apply(compressed, TOKENS)
  assert float(jnp.abs(logits - original).max()) < 1e-4
  assert all(not np.any(np.asarray(depth_variables(compressed, cfg, model.rec, 0)['params'][MODULE[t]][t]['kernel']))
             for t in target_dims(cfg)), 'the kernels must be zero: the factors alone do the projection'
  low_model, low = low_rank_compress(variables, cfg, grams, rank=2)
  assert float(jnp.abs(low_model.apply(low, TOKENS)[0] - original).max()) > 1e-3, 'rank 2 must differ'


def _calibration_inputs(cfg: ModelConfig, variables: dict, batches: list[dict]) -> list[dict]:
  """Per depth position: {input name: [real tokens, d_in]} of the original model on the calibration batches."""
  hidden = [embed(cfg, variables, b['inputs']) for b in batches]
  out = []
  for depth in range(cfg.num_layers):
    layer = depth_variables(variables, cfg, VANILLA, depth)
    runs = [apply_layer(cfg, VANILLA, layer, h, b['positions'], b['segment_ids'], capture_inputs=True)
            for h, b in zip(hidden, batches, strict=True)]
    hidden = [h for h, _ in runs]
    real = [np.asarray(b['segment_ids']).reshape(-1) > 0 for b in batches]
    out.append({name: np.concatenate([np.asarray(x[name], np.float64).reshape(-1, x[name].shape[-1])[r]
                                      for (_, x), r in zip(runs, real, strict=True)]) for name in runs[0][1]})
  return out


def test_whitened_compression_reconstructs_the_calibration_outputs_better_than_plain_svd(originals):
  cfg, variables, grams = originals['llama']
  rank = 3
  model, compressed = low_rank_compress(variables, cfg, grams, rank)
  inputs = _calibration_inputs(cfg, variables, _batches(cfg.vocab_size))
  whitened_total = plain_total = 0.0
  for depth in range(cfg.num_layers):
    original = depth_variables(variables, cfg, VANILLA, depth)['params']
    factors = depth_variables(compressed, cfg, model.rec, depth)['lora']
    for target, (d_in, d_out) in target_dims(cfg).items():
      w = np.asarray(original[MODULE[target]][target]['kernel'], np.float64)
      ab = factors[MODULE[target]][target]
      assert ab['a'].shape == (d_in, min(rank, d_in, d_out))
      x = inputs[depth][TARGET_INPUTS[target]]
      whitened = np.linalg.norm(x @ (w - np.asarray(ab['a'], np.float64) @ np.asarray(ab['b'], np.float64)))
      pa, pb = svd_lora(w, min(rank, d_in, d_out), 1.0)
      plain = np.linalg.norm(x @ (w - pa.astype(np.float64) @ pb.astype(np.float64)))
      assert whitened <= plain * 1.001, (depth, target, whitened, plain)
      whitened_total, plain_total = whitened_total + whitened ** 2, plain_total + plain ** 2
  assert whitened_total < 0.9 * plain_total, (whitened_total, plain_total)


# Hand-computed: 2 layers, d_model 8, 2 heads of 4 (1 KV head), MLP 12.
LLAMA = ModelConfig(family='llama', vocab_size=11, num_layers=2, d_model=8, num_heads=2, num_kv_heads=1, head_dim=4,
                    mlp_dim=12, tie_embeddings=False)
NEOX = ModelConfig(family='gpt_neox', vocab_size=11, num_layers=2, d_model=8, num_heads=2, num_kv_heads=2,
                   head_dim=4, mlp_dim=12, norm='layer', mlp='gelu', rotary_fraction=0.5, parallel_residual=True,
                   attn_bias=True, mlp_bias=True, tie_embeddings=False)


@pytest.mark.parametrize('cfg, rank, expected', [
    # q, o (8, 8); k, v (8, 4); gate, up (8, 12); down (12, 8): r * (16 + 12 + 12 + 16 + 20 + 20 + 20) per layer,
    # + two RMS norms of 8 per layer, + the final norm's 8.
    (LLAMA, 3, 2 * (3 * 116 + 16) + 8),
    # Rank 5: k and v are capped at 4.
    (LLAMA, 5, 2 * (5 * (16 + 16 + 20 + 20 + 20) + 4 * (12 + 12) + 16) + 8),
    # q, k, v, o (8, 8); up (8, 12); down (12, 8); biases 4 * 8 + 12 + 8; two LayerNorms (scale + bias) of 8;
    # the final LayerNorm's 16.
    (NEOX, 3, 2 * (3 * (4 * 16 + 20 + 20) + 52 + 32) + 16),
])
def test_low_rank_param_count_is_what_the_factored_model_stores(cfg, rank, expected):
  assert low_rank_param_count(cfg, rank) == expected
  # The representation's variables hold the same plus the zero kernels, which are not counted.
  kernels = cfg.num_layers * sum(d_in * d_out for d_in, d_out in target_dims(cfg).values())
  assert count_params(cfg, low_rank_recursion(rank)).non_embedding - kernels == expected


@pytest.mark.parametrize('cfg', [LLAMA, SMOLLM2_135M])
def test_rank_for_budget_is_the_largest_rank_that_fits(cfg):
  budget = count_params(cfg, RecursionConfig(loops=3 if cfg.num_layers % 3 == 0 else 2, lora_rank=2)).non_embedding
  rank = rank_for_budget(cfg, budget)
  assert low_rank_param_count(cfg, rank) <= budget < low_rank_param_count(cfg, rank + 1)
  assert rank_for_budget(cfg, low_rank_param_count(cfg, rank)) == rank  # A budget met exactly.
  assert rank_for_budget(cfg, low_rank_param_count(cfg, rank + 1) - 1) == rank
  cap = max(min(dims) for dims in target_dims(cfg).values())
  assert rank_for_budget(cfg, 10 ** 12) == cap  # Past every cap nothing more is stored.
  with pytest.raises(ValueError, match='does not fit even rank 1'):
    rank_for_budget(cfg, low_rank_param_count(cfg, 1) - 1)
