"""The newer families (Qwen2/2.5, Qwen3, Mistral, Gemma 2, Gemma 3, OLMo 2, Phi-3): logits at parity with
transformers (fp32), the features each tiny config switches on really matter, the conversion recipe (calibration,
whitened SVD, layer-wise healing, KD uptraining) runs, the relaxed model exports to a checkpoint transformers reloads
at the final exit, local/global layer patterns loop only where a shared layer keeps one attention type, and every
feature we do not implement is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from family_fixtures import NEW_FAMILIES, family_config, save_family
from hf_fixtures import hf_logits

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.config import ModelConfig, RopeScaling
from rrt_jax.convert import to_recursive
from rrt_jax.convert.calibration import CalibrationConfig, convert
from rrt_jax.export import to_hf
from rrt_jax.model import init_cache
from rrt_jax.pretrained.hf import config_from_hf, load_hf
from rrt_jax.train.healing import HealingConfig, heal
from rrt_jax.train.optimizer import trainable_collections
from rrt_jax.train.step import LossConfig, init_state, make_train_step

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 13))

# A recursion each family's layer pattern admits; Gemma 3's 5 local : 1 global fits only middle-cycle.
RECURSIONS = {
    'qwen2': RecursionConfig(loops=3, looping='sequence', lora_rank=4),  # G G G L L L: two runs of 3.
    'qwen3': RecursionConfig(loops=2, lora_rank=4),
    'mistral': RecursionConfig(loops=2, looping='middle_cycle', unique_layers=1, lora_rank=4),
    'gemma2': RecursionConfig(loops=3, lora_rank=4),  # K = 2: a local and a global shared layer.
    'gemma3': RecursionConfig(loops=2, looping='middle_cycle', unique_layers=1, lora_rank=4),
    'olmo2': RecursionConfig(loops=2, lora_rank=4),
    'phi3': RecursionConfig(loops=3, lora_rank=4),
}


# Checkpoints beside each family's own: (family, config changes).
VARIANTS = {
    # YaRN (Qwen3's long-context RoPE) at a small original context, so the ramp spans several frequencies; one with
    # transformers' defaults, one with every field set.
    'qwen3_yarn': ('qwen3', dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 100.0,
                                                  'original_max_position_embeddings': 64})),
    'qwen3_yarn_fields': ('qwen3', dict(rope_parameters={
        'rope_type': 'yarn', 'factor': 8.0, 'rope_theta': 100.0, 'original_max_position_embeddings': 64,
        'beta_fast': 16.0, 'beta_slow': 2.0, 'attention_factor': 1.3, 'truncate': False})),
}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """{family or variant: (directory, torch model)}, saved when first asked for."""
  root, cache = tmp_path_factory.mktemp('families'), {}

  def get(name):
    if name not in cache:
      family, changes = VARIANTS.get(name, (name, {}))
      seed = NEW_FAMILIES.index(family) + len(NEW_FAMILIES) * (name != family)
      cache[name] = (str(root / name), save_family(family, str(root / name), seed=seed, **changes))
    return cache[name]
  return get


def _logits(cfg: ModelConfig, rec: RecursionConfig, variables: dict) -> np.ndarray:
  return np.asarray(jax.jit(Decoder(cfg, rec).apply)(variables, jnp.asarray(TOKENS))[0])


@pytest.mark.parametrize('family', NEW_FAMILIES + tuple(VARIANTS))
def test_logits_match_transformers(checkpoints, family):
  directory, torch_model = checkpoints(family)
  cfg, variables = load_hf(directory)
  assert cfg.family == VARIANTS.get(family, (family,))[0]
  theirs = hf_logits(torch_model, TOKENS)
  ours = _logits(cfg, RecursionConfig(), variables)
  assert np.abs(theirs).max() > 0.5  # Non-trivial logits, so a small |delta| means something.
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  if cfg.sliding_window:  # The window is shorter than the sequence (its effect: test_each_config_feature_matters).
    assert cfg.sliding_window < TOKENS.shape[1]


# Config-only features (no weights of their own, so the loader cannot catch them): dropping each one moves the logits,
# so the parity above holds only because it is implemented. Features with weights (biases, q/k norms, post-norms,
# fused projections) are checked by the loader: every tensor must find its place.
ABLATIONS = [
    ('mistral', dict(sliding_window=None)),
    ('gemma2', dict(sliding_window=None, layer_types=None)),
    ('gemma2', dict(attn_softcap=None)),
    ('gemma2', dict(final_softcap=None)),
    ('gemma2', dict(query_pre_attn_scalar=None)),
    ('gemma3', dict(local_rope_theta=None)),
    ('gemma3', dict(rope_scaling=None)),
    ('qwen3_yarn', dict(rope_scaling=RopeScaling('yarn', 4.0, original_max_position_embeddings=64,
                                                 attention_factor=1.0))),
    ('qwen3_yarn_fields', dict(rope_scaling=RopeScaling('yarn', 8.0, original_max_position_embeddings=64,
                                                        beta_fast=16.0, beta_slow=2.0, attention_factor=1.3))),
]


@pytest.mark.parametrize('family,ablation', ABLATIONS, ids=[f'{f}-{next(iter(a))}' for f, a in ABLATIONS])
def test_each_config_feature_matters(checkpoints, family, ablation):
  directory, torch_model = checkpoints(family)
  cfg, variables = load_hf(directory)
  wrong = _logits(cfg.replace(**ablation), RecursionConfig(), variables)
  assert np.abs(wrong - hf_logits(torch_model, TOKENS)).max() > 1e-3


@pytest.mark.parametrize('family', NEW_FAMILIES)
def test_relaxed_model_exports_to_transformers_at_the_final_exit(checkpoints, family, tmp_path):
  """Full-rank relaxation reproduces the original (invariant 3, which also checks each pattern's per-shared-layer
  attention types), and exports (LoRA and vector deltas merged) to a checkpoint that transformers reloads as the
  original model. The uptrained low-rank model's export: test_conversion_recipe_runs."""
  directory, torch_model = checkpoints(family)
  cfg, vanilla = load_hf(directory)
  rec = RECURSIONS[family].replace(lora_rank=10_000)  # Capped at full rank per projection.
  relaxed = to_recursive(vanilla, cfg, rec)
  theirs = hf_logits(torch_model, TOKENS)
  np.testing.assert_allclose(_logits(cfg, rec, relaxed), theirs, atol=1e-4, rtol=0)
  exported = _export_and_reload(cfg, rec, relaxed, tmp_path)
  assert type(exported) is type(torch_model)
  np.testing.assert_allclose(hf_logits(exported, TOKENS), theirs, atol=1e-4, rtol=0)
  back_cfg, _ = load_hf(str(tmp_path))
  assert back_cfg.replace(max_seq_len=cfg.max_seq_len) == cfg


def _export_and_reload(cfg: ModelConfig, rec: RecursionConfig, variables: dict, directory):
  import transformers as tf
  to_hf((cfg, rec, variables), directory)
  return tf.AutoModelForCausalLM.from_pretrained(directory, dtype='float32', attn_implementation='eager').eval()


def _batches(vocab: int, n: int, seq: int = 16) -> list[dict]:
  rng = np.random.default_rng(1)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, vocab, (2, seq + 1)).astype(np.int32)
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                'positions': np.tile(np.arange(seq, dtype=np.int32), (2, 1)),
                'segment_ids': np.ones((2, seq), np.int32), 'loss_mask': np.ones((2, seq), np.float32)})
  return out


def _recipe(checkpoints, family, tmp_path):
  """Calibrate -> whitened-SVD relaxation -> layer-wise healing -> 2 KD steps -> export; returns the KD losses, the
  healing report and (our final exit's logits, the exported model's)."""
  cfg, vanilla = load_hf(checkpoints(family)[0])
  rec = RECURSIONS[family].replace(lora_init='whitened_svd')
  batches = _batches(cfg.vocab_size, 3)
  relaxed = convert(vanilla, cfg, rec, batches, CalibrationConfig(tokens=96, seq_len=16), progress=False)
  healed, report = heal(vanilla, cfg, rec, relaxed, batches, HealingConfig(steps_per_layer=2), progress=False)
  tx = optax.adam(1e-3)
  trainable = trainable_collections(True)
  step = jax.jit(make_train_step(Decoder(cfg, rec), Decoder(cfg), tx, LossConfig(kd_weight=1.0), 1, trainable))
  state = init_state(healed, tx, trainable)
  losses = []
  for batch in batches[:2]:
    state, metrics = step(state, vanilla, jax.tree.map(jnp.asarray, batch))
    losses.append(float(metrics['loss']))
  variables = jax.device_get(state.variables)
  exported = _export_and_reload(cfg, rec, variables, tmp_path)
  return losses, report, (_logits(cfg, rec, variables), hf_logits(exported, TOKENS))


@pytest.mark.parametrize('family', [
    'gemma2',  # Local and global shared layers in one scan; calibration and healing of both types; soft-capped KD.
    *[pytest.param(f, marks=pytest.mark.slow) for f in NEW_FAMILIES if f != 'gemma2']])
def test_conversion_recipe_runs(checkpoints, family, tmp_path):
  losses, report, (ours, exported) = _recipe(checkpoints, family, tmp_path)
  assert all(np.isfinite(losses)) and losses[0] > 0
  assert report.before and all(np.isfinite(report.after))
  np.testing.assert_allclose(exported, ours, atol=1e-4, rtol=0)  # The uptrained rank-4 model at its final exit.


def test_a_shared_layer_keeps_one_attention_type(checkpoints):
  gemma3, _ = load_hf(checkpoints('gemma3')[0])  # Layers L L L L L G.
  with pytest.raises(ValueError, match=r"pattern LLLLLG.*'cycle' with loops in \[1\]; looping='sequence' with loops "
                                       r"in \[1\]; looping='middle_cycle' with loops=2, unique_layers=1; or loops=4"):
    Decoder(gemma3, RecursionConfig(loops=2)).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  gemma2, _ = load_hf(checkpoints('gemma2')[0])  # Layers L G L G L G: K must be even under CYCLE.
  with pytest.raises(ValueError, match=r"loops=2 \(cycle.*'cycle' with loops in \[1, 3\]"):
    Decoder(gemma2, RecursionConfig(loops=2, lora_rank=2)).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"loops=3 \(sequence.*'sequence' with loops in \[1\]"):
    Decoder(gemma2, RecursionConfig(loops=3, looping='sequence')).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))


def test_cached_decoding_equals_full_recompute_across_the_window(checkpoints):
  """Sliding-window layers mask the cache by slot position: decoding token by token past the window gives the full
  recompute's logits (a mixed pattern, looped)."""
  cfg, vanilla = load_hf(checkpoints('gemma2')[0])
  rec = RECURSIONS['gemma2']
  model, variables = Decoder(cfg, rec), to_recursive(vanilla, cfg, rec)
  full = _logits(cfg, rec, variables)
  cache = init_cache(cfg, rec, batch=2, max_len=16)
  step = jax.jit(model.apply)
  for t in range(TOKENS.shape[1]):
    logits, cache = step(variables, jnp.asarray(TOKENS[:, t:t + 1]), jnp.full((2, 1), t, jnp.int32), cache=cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-4, rtol=0)


# One config.json per family with a feature rrt_jax does not implement: each is refused with its name, never loaded.
UNIMPLEMENTED = [
    ('qwen2', dict(rope_parameters={'rope_type': 'dynamic', 'factor': 4.0, 'rope_theta': 1e4}), "'dynamic'"),
    ('qwen3', dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e4, 'mscale': 1.0,
                                    'mscale_all_dim': 0.5, 'original_max_position_embeddings': 32}), 'mscale'),
    ('mistral', dict(hidden_act='gelu'), "activation 'gelu'"),
    ('gemma2', dict(use_bidirectional_attention=True), 'bidirectional'),
    ('gemma3', dict(rope_parameters={'full_attention': {'rope_type': 'default', 'rope_theta': 1e6},
                                     'sliding_attention': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4}}),
     "RoPE scaling 'linear' on its sliding layers"),
    ('olmo2', dict(rope_parameters={'rope_type': 'dynamic', 'factor': 2.0, 'rope_theta': 1e4}), "'dynamic'"),
    ('phi3', dict(rope_parameters={'rope_type': 'longrope', 'rope_theta': 1e4, 'short_factor': [1.0] * 4,
                                   'long_factor': [1.0] * 4, 'original_max_position_embeddings': 32}), "'longrope'"),
]


@pytest.mark.parametrize('family,changes,message', UNIMPLEMENTED, ids=[u[0] for u in UNIMPLEMENTED])
def test_an_unimplemented_feature_is_refused(family, changes, message):
  hf = family_config(family).to_dict()
  hf.update(changes)
  with pytest.raises(ValueError, match=message):
    config_from_hf(hf)


@pytest.mark.parametrize('model_type', ['gemma3', 'qwen3_moe', 'mixtral', 'olmo', 'phi'])
def test_close_relatives_are_refused_by_name(model_type):
  hf = family_config('qwen3').to_dict()
  hf['model_type'] = model_type
  with pytest.raises(ValueError, match=f"model_type '{model_type}' is not supported: "):
    config_from_hf(hf)


def test_yarn_exports_to_its_config_json(checkpoints):
  from rrt_jax.export import hf_config
  cfg, _ = load_hf(checkpoints('qwen3_yarn_fields')[0])
  rope = hf_config(cfg)['rope_parameters']  # hf_config reads its result back and checks it gives cfg.
  assert (rope['rope_type'], rope['beta_fast'], rope['truncate'], rope['attention_factor']) == ('yarn', 16.0, False,
                                                                                                  1.3)


def test_bias_a_family_does_not_have_is_refused():
  for family in ('mistral', 'phi3'):
    hf = {**family_config(family).to_dict(), 'attention_bias': True}
    with pytest.raises(ValueError, match='attention_bias'):
      config_from_hf(hf)


# The public config.json values of each preset's model (transformers' config classes fill in the rest as the
# checkpoints' files do): our reader must give exactly the preset.
PUBLIC_CONFIGS = {
    'qwen3_0_6b': ('Qwen3Config', dict(
        vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, tie_word_embeddings=True, attention_bias=False, use_sliding_window=False)),
    'qwen2_5_0_5b': ('Qwen2Config', dict(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32_768, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        tie_word_embeddings=True, use_sliding_window=False, sliding_window=32_768, max_window_layers=24)),
    'llama3_2_1b': ('LlamaConfig', dict(
        vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131_072, rms_norm_eps=1e-5,
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500_000.0, 'factor': 32.0, 'low_freq_factor': 1.0,
                         'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192},
        tie_word_embeddings=True)),
    'gemma3_1b': ('Gemma3TextConfig', dict(
        vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=512,
        rope_parameters={'full_attention': {'rope_type': 'default', 'rope_theta': 1_000_000.0},
                         'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0}})),
}


@pytest.mark.parametrize('name', list(PUBLIC_CONFIGS))
def test_presets_are_what_the_public_configs_read_as(name):
  import transformers as tf

  from rrt_jax import presets
  cls, fields = PUBLIC_CONFIGS[name]
  assert config_from_hf(getattr(tf, cls)(**fields).to_dict()) == presets.get(name)
