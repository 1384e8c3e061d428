"""RoPE scaling (Llama 3.1's 'llama3' and 'linear') is read from HF configs and matches transformers; other types
are refused instead of silently running as plain RoPE."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import hf_logits, randomise_norms_and_biases

from rrt_jax import Decoder
from rrt_jax.checkpoint import configs_from_json, configs_to_json
from rrt_jax.config import VANILLA, ModelConfig, RopeScaling
from rrt_jax.model.layers import rope_inv_freq
from rrt_jax.pretrained.hf import config_from_hf, load_hf

# original_max_position_embeddings 64 puts the llama3 bands (wavelengths 16..64) inside a 40-token sequence, so the
# scaling changes the logits a lot; Llama 3.1 itself uses 8192 (checked on frequencies below).
SCALINGS = {
    'llama3': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 64},
    'linear': {'rope_type': 'linear', 'factor': 4.0},
}


@pytest.fixture(scope='module')
def scaled_llamas(tmp_path_factory):
  import torch
  import transformers as tf
  models = {}
  for name, scaling in SCALINGS.items():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                            max_position_embeddings=128, tie_word_embeddings=False,
                            rope_parameters={**scaling, 'rope_theta': 5000.0})
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    randomise_norms_and_biases(model)
    directory = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(directory)
    models[name] = directory, model
  return models


@pytest.mark.parametrize('name', sorted(SCALINGS))
def test_scaled_rope_logits_match_transformers(scaled_llamas, name):
  directory, torch_model = scaled_llamas[name]
  cfg, variables = load_hf(directory)
  assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == name
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40))
  ours, _ = Decoder(cfg).apply(variables, jnp.asarray(tokens))
  theirs = hf_logits(torch_model, tokens)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
  # The scaling matters here: plain RoPE (what was computed before) is far off, so this test can fail.
  plain, _ = Decoder(cfg.replace(rope_scaling=None)).apply(variables, jnp.asarray(tokens))
  assert np.abs(np.asarray(plain) - theirs).max() > 1e-2


def test_llama3_frequencies_match_transformers_at_llama_3_1_settings():
  import transformers as tf
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  scaling = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
             'original_max_position_embeddings': 8192}
  config = tf.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                          rope_parameters={**scaling, 'rope_theta': 500000.0})
  theirs, _ = ROPE_INIT_FUNCTIONS['llama3'](config, 'cpu')
  cfg = config_from_hf(config.to_dict())
  assert cfg.rope_scaling == RopeScaling(**scaling)
  ours = rope_inv_freq(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6)
  assert not np.allclose(np.asarray(rope_inv_freq(cfg.rope_theta, cfg.rotary_dim)), theirs.numpy(), rtol=1e-3)


HF_LLAMA = dict(model_type='llama', vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, hidden_act='silu')


@pytest.mark.parametrize('rope', [
    {'rope_parameters': {'rope_type': 'default', 'rope_theta': 10000.0}},
    {'rope_scaling': None},
    {},
])
def test_plain_rope_has_no_scaling(rope):
  assert config_from_hf({**HF_LLAMA, **rope}).rope_scaling is None


def test_transformers_4_spelling_is_read():
  cfg = config_from_hf({**HF_LLAMA, 'rope_theta': 500.0, 'rope_scaling': {'type': 'linear', 'factor': 2.0}})
  assert (cfg.rope_theta, cfg.rope_scaling) == (500.0, RopeScaling('linear', 2.0))


@pytest.mark.parametrize('rope_type', ['dynamic', 'longrope'])  # yarn: tests/test_families.py.
def test_unsupported_rope_type_is_refused(rope_type):
  hf = {**HF_LLAMA, 'rope_parameters': {'rope_type': rope_type, 'factor': 4.0, 'rope_theta': 1e4}}
  with pytest.raises(ValueError, match=f"'{rope_type}'.*supported: linear, llama3, yarn"):
    config_from_hf(hf)
  with pytest.raises(ValueError, match=f"'{rope_type}' is not supported.*linear, llama3, yarn"):
    RopeScaling(rope_type, 4.0)


def test_llama3_without_its_fields_is_refused():
  hf = {**HF_LLAMA, 'rope_parameters': {'rope_type': 'llama3', 'factor': 8.0, 'rope_theta': 1e4}}
  with pytest.raises(ValueError, match='needs low_freq_factor, high_freq_factor'):
    config_from_hf(hf)


def test_rope_scaling_round_trips_through_model_config_json():
  cfg = ModelConfig(family='llama', vocab_size=96, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=48, rope_scaling=RopeScaling(**SCALINGS['llama3']))
  data = json.loads(json.dumps(configs_to_json(cfg, VANILLA)))
  assert data['model']['rope_scaling']['factor'] == 8.0
  back, _ = configs_from_json(data)
  assert back == cfg and hash(back) == hash(cfg)
