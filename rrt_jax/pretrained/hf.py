"""HF transformers checkpoints (safetensors) of Gemma, Llama and GPT-NeoX -> our vanilla params.

Tensors are read one at a time from memory-mapped files, cast, and copied into preallocated layer-stacked
host buffers; each finished leaf is then placed on device (with its sharding when one is given).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rrt_jax.config import ROPE_SCALING_TYPES, ModelConfig, RopeScaling
from rrt_jax.model import LAYER_PATH as LAYER
from rrt_jax.model import Decoder
from rrt_jax.pretrained.safetensors_io import Checkpoint

_IGNORED = re.compile(r'.*(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$')


def rope_scaling_from_hf(hf: dict) -> RopeScaling | None:
  """The RoPE scaling of an HF config.json: transformers 5's rope_parameters or 4.x's rope_scaling (whose type
  may be spelled 'type'). None for plain RoPE; a type we do not implement is an error, not silently ignored."""
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type in (None, 'default'):
    return None
  if rope_type not in ROPE_SCALING_TYPES:
    raise ValueError(f'This checkpoint uses RoPE scaling type {rope_type!r}, which rrt_jax does not implement '
                     f'(supported: {", ".join(ROPE_SCALING_TYPES)} and none): its logits would be wrong.')
  if 'factor' not in rope:
    raise ValueError(f'RoPE scaling {rope_type!r} in config.json has no factor.')
  if rope_type == 'linear':
    return RopeScaling('linear', float(rope['factor']))
  # A missing llama3 field stays None, for RopeScaling to name.
  number = lambda key, cast: None if rope.get(key) is None else cast(rope[key])  # noqa: E731
  original = number('original_max_position_embeddings', int) or hf.get('max_position_embeddings')
  if rope_type == 'yarn':
    if rope.get('mscale') or rope.get('mscale_all_dim'):
      raise ValueError('This checkpoint uses yarn RoPE with mscale / mscale_all_dim (DeepSeek\'s attention factor), '
                       'which rrt_jax does not implement: its logits would be wrong.')
    truncate = rope.get('truncate')
    return RopeScaling('yarn', float(rope['factor']), original_max_position_embeddings=original,
                       beta_fast=number('beta_fast', float), beta_slow=number('beta_slow', float),
                       attention_factor=number('attention_factor', float),
                       truncate=None if truncate is None else bool(truncate))
  return RopeScaling('llama3', float(rope['factor']), low_freq_factor=number('low_freq_factor', float),
                     high_freq_factor=number('high_freq_factor', float), original_max_position_embeddings=original)


# HF model_type -> our family, for the model types read here (the others are refused by name).
FAMILY_OF_MODEL_TYPE = {'llama': 'llama', 'gemma': 'gemma', 'gpt_neox': 'gpt_neox', 'qwen2': 'qwen2',
                        'qwen3': 'qwen3', 'mistral': 'mistral', 'gemma2': 'gemma2', 'gemma3_text': 'gemma3',
                        'olmo2': 'olmo2', 'phi3': 'phi3'}
# Close relatives we do NOT read, with why: each is refused by name rather than loaded as its neighbour.
REFUSED_MODEL_TYPES = {
    'gemma3': 'the multimodal Gemma 3 (vision tower); its text-only checkpoints (model_type gemma3_text, '
              'Gemma3ForCausalLM: Gemma-3-1B, or the text model saved on its own) load',
    **dict.fromkeys(('qwen2_moe', 'qwen3_moe', 'mixtral', 'olmoe', 'phimoe'), 'mixture-of-experts MLPs'),
    'olmo': 'OLMo 1 (non-parametric LayerNorm)', 'phi': 'Phi-1/2 (parallel residual with a shared LayerNorm)',
    'phi4_multimodal': 'multimodal', 'qwen2_vl': 'multimodal', 'mistral3': 'multimodal',
    'gemma3n': 'Gemma 3n (per-layer embeddings, AltUp)', 'cohere': 'Cohere (LayerNorm, logit scale)',
}
_LLAMA_LIKE = ('llama', 'qwen2', 'qwen3', 'mistral', 'olmo2', 'phi3')
_GEMMA_LIKE = ('gemma', 'gemma2', 'gemma3_text')
_HF_LAYER_TYPES = {'full_attention': 'full', 'sliding_attention': 'sliding'}


def _refuse(model_type: str, what: str) -> None:
  raise ValueError(f'This {model_type} checkpoint has {what}, which rrt_jax does not implement: its logits would '
                   'be wrong, so it is not loaded.')


def _layer_types(hf: dict, model_type: str, num_layers: int) -> tuple[str, ...] | None:
  """Per-layer 'full' / 'sliding' from config.json (transformers' layer_types, else each family's rule)."""
  window = hf.get('sliding_window')
  types = hf.get('layer_types')
  if types is None:
    if model_type == 'gemma2':
      types = ['sliding_attention' if i % 2 == 0 else 'full_attention' for i in range(num_layers)]
    elif model_type == 'gemma3_text':
      every = hf.get('sliding_window_pattern', hf.get('_sliding_window_pattern', 6))
      types = ['sliding_attention' if (i + 1) % every else 'full_attention' for i in range(num_layers)]
    elif model_type in ('qwen2', 'qwen3'):
      slide = bool(hf.get('use_sliding_window')) and window
      first = hf.get('max_window_layers', num_layers)
      types = ['sliding_attention' if slide and i >= first else 'full_attention' for i in range(num_layers)]
    else:  # Mistral, Phi-3: every layer slides when a window is set.
      return None
  if len(types) != num_layers:
    raise ValueError(f'config.json has {len(types)} layer_types for {num_layers} layers.')
  if bad := sorted(set(types) - set(_HF_LAYER_TYPES)):
    _refuse(model_type, f'layer types {bad}')
  if 'sliding_attention' in types and not window:
    raise ValueError("config.json has sliding_attention layers but no sliding_window.")
  out = tuple(_HF_LAYER_TYPES[t] for t in types)
  return out if 'sliding' in out else None  # All full: no window.


def _gemma3_rope(hf: dict) -> tuple[dict, float]:
  """(the global layers' RoPE as an HF config dict for rope_scaling_from_hf, the local layers' base) of Gemma 3:
  transformers 5's rope_parameters per layer type, or 4.x's rope_theta + rope_local_base_freq + rope_scaling."""
  rope = hf.get('rope_parameters') or {}
  if 'full_attention' in rope or 'sliding_attention' in rope:
    full, local = rope.get('full_attention', {}), rope.get('sliding_attention', {})
    if local.get('rope_type', 'default') != 'default':
      _refuse('gemma3_text', f"RoPE scaling {local.get('rope_type')!r} on its sliding layers")
    return {'rope_parameters': full}, float(local.get('rope_theta', 10_000.0))
  return hf, float(hf.get('rope_local_base_freq', 10_000.0))


def _check_activation(model_type: str, act, expected: tuple) -> None:
  if act not in expected:
    raise ValueError(f'{model_type} checkpoint with activation {act!r} is not supported (expected one of '
                     f'{expected}).')


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json dict (transformers 4.x and 5.x spellings). A model type or feature we do
  not implement is refused by name, never loaded as something close to it."""
  model_type = hf.get('model_type')
  if model_type in REFUSED_MODEL_TYPES:
    raise ValueError(f'model_type {model_type!r} is not supported: {REFUSED_MODEL_TYPES[model_type]}.')
  if model_type not in FAMILY_OF_MODEL_TYPE:
    raise ValueError(f'Unsupported model_type {model_type!r}: rrt_jax reads {", ".join(FAMILY_OF_MODEL_TYPE)}.')
  if hf.get('use_bidirectional_attention'):
    _refuse(model_type, 'bidirectional attention (use_bidirectional_attention)')
  rope = hf.get('rope_parameters') or {}
  local_theta = None
  rope_source = hf
  if model_type == 'gemma3_text':
    rope_source, local_theta = _gemma3_rope(hf)
    rope = rope_source.get('rope_parameters') or {}
  theta = rope.get('rope_theta', rope_source.get('rope_theta', hf.get('rotary_emb_base', 10_000.0)))
  heads = hf['num_attention_heads']
  num_layers = hf['num_hidden_layers']
  common = dict(vocab_size=hf['vocab_size'], num_layers=num_layers, d_model=hf['hidden_size'],
                num_heads=heads, mlp_dim=hf['intermediate_size'], rope_theta=float(theta),
                rope_scaling=rope_scaling_from_hf(rope_source),
                max_seq_len=hf.get('max_position_embeddings', 2048))
  family = FAMILY_OF_MODEL_TYPE[model_type]
  if model_type in _LLAMA_LIKE + _GEMMA_LIKE:
    act = hf.get('hidden_activation') or hf.get('hidden_act')
    gemma = model_type in _GEMMA_LIKE
    _check_activation(model_type, act, ('gelu_pytorch_tanh', 'gelu') if gemma else ('silu',))
    if hf.get('mlp_bias') and model_type != 'llama':
      _refuse(model_type, 'MLP biases (mlp_bias)')
    if model_type in ('qwen2', 'mistral', 'phi3') and hf.get('attention_bias'):
      _refuse(model_type, 'attention_bias (its transformers model has no such option)')
    window = hf.get('sliding_window')
    layer_types = _layer_types(hf, model_type, num_layers)
    slides = layer_types is not None or (model_type in ('mistral', 'phi3') and window)
    sandwich = model_type in ('gemma2', 'gemma3_text')
    cfg = ModelConfig(
        family=family, num_kv_heads=hf.get('num_key_value_heads') or heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, norm='rms_one_plus' if gemma else 'rms',
        norm_eps=hf.get('rms_norm_eps', 1e-6), mlp='geglu' if gemma else 'swiglu',
        attn_bias=bool(hf.get('attention_bias', False)), mlp_bias=bool(hf.get('mlp_bias', False)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)), embed_scale=gemma,
        rotary_fraction=float(rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))),
        qkv_bias=model_type == 'qwen2',
        qk_norm={'qwen3': 'head', 'gemma3_text': 'head', 'olmo2': 'projection'}.get(model_type, 'none'),
        norm_placement='sandwich' if sandwich else 'post' if model_type == 'olmo2' else 'pre',
        query_pre_attn_scalar=float(hf['query_pre_attn_scalar']) if sandwich else None,
        attn_softcap=hf.get('attn_logit_softcapping') if sandwich else None,
        final_softcap=hf.get('final_logit_softcapping') if sandwich else None,
        sliding_window=int(window) if slides else None, layer_types=layer_types, local_rope_theta=local_theta,
        **common)
  elif model_type == 'gpt_neox':
    if hf.get('hidden_act', 'gelu') != 'gelu':
      raise ValueError(f'gpt_neox checkpoint with activation {hf.get("hidden_act")!r} is not supported.')
    fraction = rope.get('partial_rotary_factor', hf.get('rotary_pct', 1.0))
    cfg = ModelConfig(
        family='gpt_neox', num_kv_heads=heads, head_dim=hf['hidden_size'] // heads, norm='layer',
        norm_eps=hf.get('layer_norm_eps', 1e-5), mlp='gelu', rotary_fraction=float(fraction),
        parallel_residual=bool(hf.get('use_parallel_residual', True)),
        attn_bias=bool(hf.get('attention_bias', True)), mlp_bias=True,
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)), **common)
  return cfg.replace(**overrides) if overrides else cfg


# HF norm name -> ours, by norm placement: Llama's post_attention_layernorm is the MLP's pre-norm, Gemma 2's and
# OLMo 2's the attention output's post-norm.
_HF_NORMS = {
    'pre': {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'mlp_norm'},
    'sandwich': {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'attn_post_norm',
                 'pre_feedforward_layernorm': 'mlp_norm', 'post_feedforward_layernorm': 'mlp_post_norm'},
    'post': {'post_attention_layernorm': 'attn_post_norm', 'post_feedforward_layernorm': 'mlp_post_norm'},
}


def _phi3_fused(proj: str, layer: int, arr: np.ndarray, cfg: ModelConfig) -> Iterator[tuple[tuple, int, np.ndarray]]:
  """Phi-3's fused qkv_proj rows [q (H*hd), k (KV*hd), v (KV*hd)] and gate_up_proj rows [gate (I), up (I)]."""
  if proj == 'qkv':
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    parts = {'q': arr[:q], 'k': arr[q:q + kv], 'v': arr[q + kv:]}
    module = 'attn'
  else:
    parts = {'gate': arr[:cfg.mlp_dim], 'up': arr[cfg.mlp_dim:]}
    module = 'mlp'
  for name, part in parts.items():
    yield LAYER + (module, name, 'kernel'), layer, part.T


def _llama_like(name: str, arr: np.ndarray, cfg: ModelConfig) -> Iterator[tuple[tuple, int | None, np.ndarray]]:
  if name == 'model.embed_tokens.weight':
    yield ('embedder', 'embedding'), None, arr
  elif name == 'model.norm.weight':
    yield ('final_norm', 'scale'), None, arr
  elif name == 'lm_head.weight':
    yield ('lm_head',), None, arr.T
  elif m := re.fullmatch(r'model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)', name):
    layer, module, proj, kind = int(m[1]), m[2], m[3], m[4]
    if cfg.family == 'phi3' and proj in ('qkv', 'gate_up') and kind == 'weight':
      yield from _phi3_fused(proj, layer, arr, cfg)
      return
    leaf = 'kernel' if kind == 'weight' else 'bias'
    yield LAYER + ('attn' if module == 'self_attn' else 'mlp', proj, leaf), layer, arr.T if kind == 'weight' else arr
  elif m := re.fullmatch(r'model\.layers\.(\d+)\.self_attn\.(q|k)_norm\.weight', name):
    yield LAYER + ('attn', f'{m[2]}_norm', 'scale'), int(m[1]), arr
  elif (m := re.fullmatch(r'model\.layers\.(\d+)\.(\w+_layernorm)\.weight', name)) and (
      m[2] in _HF_NORMS[cfg.norm_placement.value]):
    yield LAYER + (_HF_NORMS[cfg.norm_placement.value][m[2]], 'scale'), int(m[1]), arr
  else:
    raise KeyError(name)


_NEOX_DENSE = {'attention.dense': ('attn', 'o'), 'mlp.dense_h_to_4h': ('mlp', 'up'),
               'mlp.dense_4h_to_h': ('mlp', 'down')}


def _gpt_neox(name: str, arr: np.ndarray, cfg: ModelConfig) -> Iterator[tuple[tuple, int | None, np.ndarray]]:
  leaf_of = {'weight': 'scale', 'bias': 'bias'}
  if name == 'gpt_neox.embed_in.weight':
    yield ('embedder', 'embedding'), None, arr
  elif m := re.fullmatch(r'gpt_neox\.final_layer_norm\.(weight|bias)', name):
    yield ('final_norm', leaf_of[m[1]]), None, arr
  elif name == 'embed_out.weight':
    yield ('lm_head',), None, arr.T
  elif m := re.fullmatch(r'gpt_neox\.layers\.(\d+)\.(input|post_attention)_layernorm\.(weight|bias)', name):
    yield LAYER + ('attn_norm' if m[2] == 'input' else 'mlp_norm', leaf_of[m[3]]), int(m[1]), arr
  elif m := re.fullmatch(r'gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)', name):
    # Fused rows are interleaved per head: [heads, (q, k, v), head_dim, ...].
    per_head = arr.reshape(cfg.num_heads, 3, cfg.head_dim, *arr.shape[1:])
    for i, proj in enumerate('qkv'):
      part = per_head[:, i].reshape(cfg.num_heads * cfg.head_dim, *arr.shape[1:])
      yield LAYER + ('attn', proj, 'kernel' if m[2] == 'weight' else 'bias'), int(m[1]), (
          part.T if m[2] == 'weight' else part)
  elif m := re.fullmatch(r'gpt_neox\.layers\.(\d+)\.(attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)'
                         r'\.(weight|bias)', name):
    yield LAYER + _NEOX_DENSE[m[2]] + ('kernel' if m[3] == 'weight' else 'bias',), int(m[1]), (
        arr.T if m[3] == 'weight' else arr)
  else:
    raise KeyError(name)


def map_tensor(cfg: ModelConfig, name: str, arr: np.ndarray) -> list[tuple[tuple, int | None, np.ndarray]]:
  """(param path, layer index or None, value in our layout) for one HF tensor."""
  if cfg.family == 'gpt_neox':
    return list(_gpt_neox(name, arr, cfg))
  return list(_llama_like(name, arr, cfg))


def param_shapes(cfg: ModelConfig) -> dict:
  """Flat {path: ShapeDtypeStruct} of the vanilla model's params, computed without allocating."""
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  return traverse_util.flatten_dict(nn.meta.unbox(shapes)['params'])


def assemble(cfg: ModelConfig, tensors, source: str, shardings: dict | None = None) -> dict:
  """Fills the vanilla params of `cfg` from (name, array) pairs in HF layout; clear errors on mismatch."""
  shapes = param_shapes(cfg)
  buffers = {path: np.zeros(s.shape, s.dtype) for path, s in shapes.items()}
  filled = {path: set() for path in shapes}
  unknown = []
  for name, arr in tensors:
    if _IGNORED.match(name):
      continue
    try:
      mapped = map_tensor(cfg, name, arr)
    except KeyError:
      unknown.append(name)
      continue
    for path, layer, value in mapped:
      if path not in buffers:
        raise ValueError(f'{source}: tensor {name} maps to {"/".join(path)}, which a {cfg.family} model '
                         f'with this config does not have (check attn_bias/mlp_bias/tie_embeddings).')
      target = buffers[path] if layer is None else buffers[path][layer]
      if value.shape != target.shape:
        raise ValueError(
            f'{source}: tensor {name} has shape {tuple(value.shape)} but the config expects '
            f'{tuple(target.shape)} at {"/".join(path)}: the checkpoint does not match the config; load it '
            'with the config read from its own config.json (config=None).')
      target[...] = value.astype(target.dtype)
      filled[path].add(layer)
  if unknown:
    raise ValueError(f'{source}: {len(unknown)} tensors have no place in a {cfg.family} model, e.g. '
                     f'{unknown[:3]}: is this checkpoint of another architecture?')
  missing = [p for p, got in filled.items()
             if (got != {None} if p[:3] != LAYER else got != set(range(cfg.num_layers)))]
  if missing:
    raise ValueError(f'{source}: missing tensors for {["/".join(p) for p in missing[:4]]}.')
  placed = {}
  for path in list(buffers):
    value = buffers.pop(path)  # Drop each host buffer once it is on device.
    placed[path] = jax.device_put(value, shardings.get(path) if shardings else None)
  return traverse_util.unflatten_dict(placed)


def load_hf(directory: str, config: ModelConfig | None = None, shardings: dict | None = None,
            **overrides) -> tuple[ModelConfig, dict]:
  """Reads an HF checkpoint directory: (config, {'params': vanilla params}).

  config: None reads it from config.json; a given config is checked against every tensor's shape.
  shardings: optional flat {param path tuple: jax.sharding.Sharding} for placing each leaf.
  """
  if config is None:
    with open(os.path.join(directory, 'config.json')) as f:
      config = config_from_hf(json.load(f), **overrides)
  ckpt = Checkpoint(directory)
  return config, {'params': assemble(config, ckpt.items(), directory, shardings)}
