"""Tiny random HF checkpoints of each family, built and saved locally (no download).

Every norm weight and bias is re-randomised before saving: default inits (ones / zeros) would hide a missing
Gemma (1 + w) or a mis-mapped bias.
"""

from __future__ import annotations

import os

import numpy as np

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
            num_attention_heads=4, initializer_range=0.1)


def hf_config(family: str):
  import transformers as tf
  if family == 'llama':
    return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5000.0, **TINY)
  if family == 'gemma':
    return tf.GemmaConfig(num_key_value_heads=1, head_dim=16, **TINY)
  if family == 'gpt_neox':
    return tf.GPTNeoXConfig(rotary_pct=0.25, **TINY)
  raise ValueError(family)


def randomise_norms_and_biases(model, seed: int = 0) -> None:
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('.bias'):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith('weight') else 0.0))


def save_tiny(family: str, directory: str, seed: int = 0):
  """Builds, randomises and saves a tiny HF model; returns the torch model (eval mode, fp32)."""
  import torch
  import transformers as tf
  torch.manual_seed(seed)
  model = tf.AutoModelForCausalLM.from_config(hf_config(family)).float().eval()
  randomise_norms_and_biases(model, seed)
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory)
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
