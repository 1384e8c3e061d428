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
  return RopeScaling('llama3', float(rope['factor']), low_freq_factor=number('low_freq_factor', float),
                     high_freq_factor=number('high_freq_factor', float), original_max_position_embeddings=original)


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json dict (transformers 4.x and 5.x spellings)."""
  model_type = hf.get('model_type')
  rope = hf.get('rope_parameters') or {}
  theta = rope.get('rope_theta', hf.get('rope_theta', hf.get('rotary_emb_base', 10_000.0)))
  heads = hf['num_attention_heads']
  common = dict(vocab_size=hf['vocab_size'], num_layers=hf['num_hidden_layers'], d_model=hf['hidden_size'],
                num_heads=heads, mlp_dim=hf['intermediate_size'], rope_theta=float(theta),
                rope_scaling=rope_scaling_from_hf(hf),
                max_seq_len=hf.get('max_position_embeddings', 2048))
  if model_type in ('llama', 'gemma'):
    act = hf.get('hidden_activation') or hf.get('hidden_act')
    gemma = model_type == 'gemma'
    expected_act = ('gelu_pytorch_tanh', 'gelu') if gemma else ('silu',)
    if act not in expected_act:
      raise ValueError(f'{model_type} checkpoint with activation {act!r} is not supported '
                       f'(expected one of {expected_act}).')
    cfg = ModelConfig(
        family=model_type, num_kv_heads=hf.get('num_key_value_heads') or heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, norm='rms_one_plus' if gemma else 'rms',
        norm_eps=hf.get('rms_norm_eps', 1e-6), mlp='geglu' if gemma else 'swiglu',
        attn_bias=bool(hf.get('attention_bias', False)), mlp_bias=bool(hf.get('mlp_bias', False)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)), embed_scale=gemma, **common)
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
  else:
    raise ValueError(f'Unsupported model_type {model_type!r}: rrt_jax reads gemma, llama and gpt_neox.')
  return cfg.replace(**overrides) if overrides else cfg


def _llama_like(name: str, arr: np.ndarray) -> Iterator[tuple[tuple, int | None, np.ndarray]]:
  if name == 'model.embed_tokens.weight':
    yield ('embedder', 'embedding'), None, arr
  elif name == 'model.norm.weight':
    yield ('final_norm', 'scale'), None, arr
  elif name == 'lm_head.weight':
    yield ('lm_head',), None, arr.T
  elif m := re.fullmatch(r'model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)', name):
    layer, module, proj, kind = int(m[1]), m[2], m[3], m[4]
    leaf = 'kernel' if kind == 'weight' else 'bias'
    yield LAYER + ('attn' if module == 'self_attn' else 'mlp', proj, leaf), layer, arr.T if kind == 'weight' else arr
  elif m := re.fullmatch(r'model\.layers\.(\d+)\.(input|post_attention)_layernorm\.weight', name):
    yield LAYER + ('attn_norm' if m[2] == 'input' else 'mlp_norm', 'scale'), int(m[1]), arr
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
  return list(_llama_like(name, arr))


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
