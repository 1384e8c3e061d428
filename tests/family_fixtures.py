"""Tiny random HF checkpoints of the newer families (Qwen2/2.5, Qwen3, Mistral, Gemma 2, Gemma 3, OLMo 2, Phi-3),
built and saved locally like hf_fixtures' (norms and biases re-randomised).

Each config switches on the features its family adds, at values that make them matter on 13 tokens: windows shorter
than the sequence, a query_pre_attn_scalar other than head_dim, soft-caps low enough to bend the logits, a head_dim
other than hidden_size / heads, and local/global layer patterns (Qwen2's max_window_layers, Gemma 2's alternation,
Gemma 3's 5 local : 1 global with a RoPE base of its own and linear scaling on the global layers).
"""

from __future__ import annotations

import os

from hf_fixtures import TINY, randomise_norms_and_biases

NEW_FAMILIES = ('qwen2', 'qwen3', 'mistral', 'gemma2', 'gemma3', 'olmo2', 'phi3')


def family_config(family: str, **changes):
  import transformers as tf
  if family == 'qwen2':  # Qwen2.5: q/k/v biases; sliding layers from max_window_layers on (a mixed pattern).
    kw = dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=3,
              tie_word_embeddings=False, rope_theta=5000.0)
    cls = tf.Qwen2Config
  elif family == 'qwen3':
    kw = dict(num_key_value_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=True)
    cls = tf.Qwen3Config
  elif family == 'mistral':
    kw = dict(num_key_value_heads=2, head_dim=8, sliding_window=5, tie_word_embeddings=False)
    cls = tf.MistralConfig
  elif family == 'gemma2':
    kw = dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    cls = tf.Gemma2Config
  elif family == 'gemma3':
    kw = dict(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=20, sliding_window=4,
              rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 50_000.0},
                               'sliding_attention': {'rope_type': 'default', 'rope_theta': 1000.0}})
    cls = tf.Gemma3TextConfig
  elif family == 'olmo2':
    kw = dict(num_key_value_heads=2, tie_word_embeddings=False)
    cls = tf.Olmo2Config
  elif family == 'phi3':
    kw = dict(num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, rope_parameters={'rope_type': 'default', 'rope_theta': 10_000.0,
                                               'partial_rotary_factor': 0.5})
    cls = tf.Phi3Config
  else:
    raise ValueError(family)
  return cls(**{**TINY, **kw, **changes})


def save_family(family: str, directory: str, seed: int = 0, **changes):
  """Builds, randomises and saves a tiny model of `family`; returns the torch model (eval mode, fp32)."""
  import torch
  import transformers as tf
  torch.manual_seed(seed)
  model = tf.AutoModelForCausalLM.from_config(family_config(family, **changes), attn_implementation='eager')
  model = model.float().eval()
  randomise_norms_and_biases(model, seed)
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory)
  return model
