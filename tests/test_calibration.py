"""Calibration statistics and whitened-SVD relaxation: exact at full rank, optimal on the calibration inputs,
sequential calibration sees the converted model's inputs, clear errors for bad input."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.convert.calibration import (
  CalibrationConfig,
  GramStats,
  collect_grams,
  convert,
  convert_sequential,
)
from rrt_jax.convert.recursive import svd_lora, to_recursive, whitened_svd_lora, whitening_factor
from rrt_jax.model import layer_tree
from rrt_jax.model.layerwise import apply_layer, depth_variables
from rrt_jax.pretrained.hf import load_hf

SEQ = 16
CALIB = CalibrationConfig(tokens=96, seq_len=SEQ, batch_size=2)


def _batches(vocab: int, n: int = 3, seed: int = 0) -> list[dict]:
  """Packed-looking batches: two documents per row (segment ids 1, 2; positions restart), the last row padded."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    seg = np.repeat(np.array([[1] * 10 + [2] * 6]), 2, axis=0).astype(np.int32)
    positions = np.array([list(range(10)) + list(range(6))] * 2, np.int32)
    out.append({'inputs': rng.integers(0, vocab, (2, SEQ)).astype(np.int32), 'positions': positions,
                'segment_ids': seg})
  out[-1]['segment_ids'][1] = 0  # A padded row (PadBatch): must not count.
  return out


@pytest.fixture(scope='module')
def originals(tiny_hf):
  return {family: load_hf(tiny_hf[family][0]) for family in FAMILIES}


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('sequential', [False, True])
def test_full_rank_whitened_relaxation_is_the_original(originals, family, sequential):
  cfg, variables = originals[family]
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)))
  original, _ = Decoder(cfg).apply(variables, tokens)
  rec = RecursionConfig(loops=3, init='average', lora_rank=10_000, lora_alpha=3.0, lora_init='whitened_svd')
  config = CalibrationConfig(tokens=96, seq_len=SEQ, batch_size=2, sequential=sequential)
  relaxed = convert(variables, cfg, rec, _batches(cfg.vocab_size), config, progress=False)
  logits, _ = Decoder(cfg, rec).apply(relaxed, tokens)
  assert float(jnp.abs(logits - original).max()) < 1e-4
  low = convert(variables, cfg, rec.replace(lora_rank=2), _batches(cfg.vocab_size), config, progress=False)
  low_logits, _ = Decoder(cfg, rec.replace(lora_rank=2)).apply(low, tokens)
  assert float(jnp.abs(low_logits - original).max()) > 1e-3, 'a low-rank relaxation must differ'


def test_whitened_svd_reaches_the_analytic_optimum_and_beats_plain_svd():
  rng = np.random.default_rng(0)
  # Correlated, unevenly scaled inputs: where weight-space SVD and input-aware SVD disagree.
  x = rng.standard_normal((400, 24)) @ (rng.standard_normal((24, 24)) * np.logspace(0, 2, 24))
  residual = rng.standard_normal((24, 12))
  rank, scale = 4, 0.5
  a, b = whitened_svd_lora(residual, x.T @ x, rank, scale, ridge=0.0)
  err = np.linalg.norm(x @ (residual - scale * a.astype(np.float64) @ b.astype(np.float64)))
  optimum = np.sqrt(np.sum(np.linalg.svd(x @ residual, compute_uv=False)[rank:] ** 2))
  np.testing.assert_allclose(err, optimum, rtol=1e-4)
  pa, pb = svd_lora(residual, rank, scale)
  plain = np.linalg.norm(x @ (residual - scale * pa.astype(np.float64) @ pb.astype(np.float64)))
  assert err < 0.9 * plain
  # Diagonal whitening is optimal for inputs with independent coordinates.
  xd = rng.standard_normal((4000, 24)) * np.logspace(0, 2, 24)
  ad, bd = whitened_svd_lora(residual, np.sum(xd * xd, axis=0), rank, scale, ridge=0.0)
  errd = np.linalg.norm(xd @ (residual - scale * ad.astype(np.float64) @ bd.astype(np.float64)))
  assert errd < 1.05 * np.sqrt(np.sum(np.linalg.svd(xd @ residual, compute_uv=False)[rank:] ** 2))


def test_grams_count_only_real_tokens_and_are_cached(originals, tmp_path):
  cfg, variables = originals['llama']
  batches = _batches(cfg.vocab_size)
  stats = collect_grams(cfg, variables, batches, CALIB, cache_dir=str(tmp_path), progress=False)
  assert stats.tokens == 5 * SEQ  # 6 rows, one padded.
  assert len(stats.grams) == cfg.num_layers
  assert set(stats.grams[0]) == {'attn_in', 'attn_context', 'mlp_in', 'mlp_hidden'}
  assert stats.grams[0]['mlp_hidden'].shape == (cfg.mlp_dim, cfg.mlp_dim)
  # Depth 0's attention input is the attention norm of the embeddings: recompute it by hand.
  h = Decoder(cfg).apply(variables, jnp.asarray(np.concatenate([b['inputs'] for b in batches])),
                         method=Decoder.embed)
  seg = np.concatenate([b['segment_ids'] for b in batches])
  pos = np.concatenate([b['positions'] for b in batches])
  _, inputs = apply_layer(cfg, RecursionConfig(), depth_variables(variables, cfg, RecursionConfig(), 0), h, pos, seg,
                          capture_inputs=True)
  x = np.asarray(inputs['attn_in'], np.float64)[seg > 0]
  np.testing.assert_allclose(stats.grams[0]['attn_in'], x.T @ x, rtol=1e-4, atol=1e-4)
  files = list(tmp_path.iterdir())
  assert len(files) == 1
  again = collect_grams(cfg, variables, batches, CALIB, cache_dir=str(tmp_path), progress=False)
  np.testing.assert_allclose(again.grams[3]['mlp_hidden'], stats.grams[3]['mlp_hidden'], rtol=1e-6)
  loaded = GramStats.load(str(files[0]))
  assert loaded.tokens == stats.tokens and not loaded.diagonal


def test_sequential_calibration_fits_to_the_converted_models_inputs(originals):
  """Two loops of K = 3 layers: depth 3 (loop 2, layer 0) must be fitted to the inputs that the converted
  loop 1 produces (the converted model's exit-1 hidden state), not to the original model's."""
  cfg, variables = originals['llama']
  rec = RecursionConfig(loops=2, init='average', lora_rank=2, lora_init='whitened_svd')
  batches = _batches(cfg.vocab_size)
  config = CalibrationConfig(tokens=96, seq_len=SEQ, batch_size=2, sequential=True)
  relaxed = convert_sequential(variables, cfg, rec, batches, config, progress=False)

  inputs = np.concatenate([b['inputs'] for b in batches])
  seg = np.concatenate([b['segment_ids'] for b in batches])
  pos = np.concatenate([b['positions'] for b in batches])
  model = Decoder(cfg, rec)
  hidden, _ = model.apply(relaxed, jnp.asarray(inputs), jnp.asarray(pos), jnp.asarray(seg),
                          method=Decoder.hidden_states)  # [exits, rows, S, D]
  vanilla_rec = RecursionConfig()

  def gram_of_depth3_input(h):
    _, captured = apply_layer(cfg, vanilla_rec, depth_variables(variables, cfg, vanilla_rec, 3), h, pos, seg,
                              capture_inputs=True)
    x = np.asarray(captured['attn_in'], np.float64)[seg > 0]
    return x.T @ x

  shared_q = np.asarray(layer_tree(relaxed['params'])['attn']['q']['kernel'][0])
  residual = np.asarray(layer_tree(variables['params'])['attn']['q']['kernel'][3]) - shared_q
  scale = rec.lora_scale(2)
  got = np.asarray(layer_tree(relaxed['lora'])['attn']['q']['a'][1, 0]) @ np.asarray(
      layer_tree(relaxed['lora'])['attn']['q']['b'][1, 0])
  a, b = whitened_svd_lora(residual, gram_of_depth3_input(hidden[0]), 2, scale, config.ridge)
  np.testing.assert_allclose(got, a @ b, atol=2e-4)
  # The original model's depth-3 input differs, and so would the fit.
  h = Decoder(cfg).apply(variables, jnp.asarray(inputs), method=Decoder.embed)
  for depth in range(3):
    h, _ = apply_layer(cfg, vanilla_rec, depth_variables(variables, cfg, vanilla_rec, depth), h, pos, seg)
  a0, b0 = whitened_svd_lora(residual, gram_of_depth3_input(h), 2, scale, config.ridge)
  assert np.abs(a0 @ b0 - a @ b).max() > 1e-3


def test_bad_calibration_input_gets_a_clear_error(originals):
  cfg, variables = originals['llama']
  with pytest.raises(ValueError, match='less than one window'):
    CalibrationConfig(tokens=100, seq_len=512)
  with pytest.raises(ValueError, match='ridge'):
    whitening_factor(np.zeros((4, 4)), ridge=0.0, what='G')
  with pytest.raises(ValueError, match=r'not positive definite.*ridge'):
    whitening_factor(-np.eye(3), ridge=1e-3)
  rec = RecursionConfig(loops=3, init='average', lora_rank=4, lora_init='whitened_svd')
  with pytest.raises(ValueError, match='calibration'):
    to_recursive(variables, cfg, rec)
  with pytest.raises(ValueError, match='calibration batches'):
    convert(variables, cfg, rec, None)
  with pytest.raises(ValueError, match='calibration batches'):
    convert(variables, cfg, rec, [])
  with pytest.raises(ValueError, match='whitened_svd'):
    convert_sequential(variables, cfg, rec.replace(lora_init='svd'), _batches(cfg.vocab_size), CALIB)
