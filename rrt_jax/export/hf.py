"""Our vanilla params -> an HF transformers checkpoint directory (every family rrt_jax/pretrained/hf.py reads): its
inverse.

Kernels are transposed back to torch's [out, in]. Our Q/K rows are already in HF's rotate-half order and Gemma's
norm weights are stored as HF stores them (the w of 1 + w), so neither is changed; GPT-NeoX's Q, K and V are
fused again into query_key_value in its per-head interleaved row order ([heads, (q, k, v), head_dim]), Phi-3's
into qkv_proj ([q, k, v] rows) and gate_up_proj ([gate, up] rows). config.json
is checked by reading it back with our own config_from_hf: a model the family cannot express (a Llama-family
config with an untied Gemma norm, GPT-NeoX with grouped K/V heads...) is refused rather than written wrongly.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rrt_jax.config import Family, ModelConfig
from rrt_jax.export.source import ExportResult, Source, eos_id, load_source, tokenizers_object, unrolled_note
from rrt_jax.export.unroll import unroll
from rrt_jax.model import LAYER_PATH, layer_tree
from rrt_jax.pretrained.hf import _HF_NORMS, FAMILY_OF_MODEL_TYPE, config_from_hf

WEIGHTS_FILE = 'model.safetensors'
ARCHITECTURES = {Family.LLAMA: 'LlamaForCausalLM', Family.GEMMA: 'GemmaForCausalLM',
                 Family.GPT_NEOX: 'GPTNeoXForCausalLM', Family.QWEN2: 'Qwen2ForCausalLM',
                 Family.QWEN3: 'Qwen3ForCausalLM', Family.MISTRAL: 'MistralForCausalLM',
                 Family.GEMMA2: 'Gemma2ForCausalLM', Family.GEMMA3: 'Gemma3ForCausalLM',
                 Family.OLMO2: 'Olmo2ForCausalLM', Family.PHI3: 'Phi3ForCausalLM'}
MODEL_TYPES = {v: k for k, v in FAMILY_OF_MODEL_TYPE.items()}  # Our family -> HF model_type.
_GEMMA_FAMILIES = (Family.GEMMA, Family.GEMMA2, Family.GEMMA3)
# Fields of ours that say how a model computes, not what it computes: not part of an HF config.
_RUNTIME_FIELDS = ('dtype', 'param_dtype', 'remat', 'attention')

_PROJECTIONS = {'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj',
                'o': 'self_attn.o_proj', 'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj', 'down': 'mlp.down_proj'}
_NEOX_PROJECTIONS = {'o': 'attention.dense', 'up': 'mlp.dense_h_to_4h', 'down': 'mlp.dense_4h_to_h'}
_NEOX_FUSED = ('q', 'k', 'v')
_PHI3_FUSED = {'q': 'self_attn.qkv_proj', 'k': 'self_attn.qkv_proj', 'v': 'self_attn.qkv_proj',
               'gate': 'mlp.gate_up_proj', 'up': 'mlp.gate_up_proj'}  # Row order: as listed.
_TOP_LEVEL = {('embedder', 'embedding'), ('final_norm', 'scale'), ('final_norm', 'bias'), ('lm_head',)}


def _suffix(leaf: str) -> str:
  return 'weight' if leaf in ('kernel', 'scale') else 'bias'


def _layer_name(cfg: ModelConfig, path: tuple) -> str:
  """HF name after 'layers.{i}.' of one of our per-layer leaves (attn/q/kernel, mlp_norm/scale, ...)."""
  module, leaf = path[:-1], path[-1]
  norms = {ours: hf for hf, ours in _HF_NORMS[cfg.norm_placement.value].items()}
  if len(module) == 1 and module[0] in norms:
    return f'{norms[module[0]]}.{_suffix(leaf)}'
  if module in (('attn', 'q_norm'), ('attn', 'k_norm')):
    return f'self_attn.{module[1]}.{_suffix(leaf)}'
  if len(module) == 2 and module[0] in ('attn', 'mlp'):
    table = _NEOX_PROJECTIONS if cfg.family == Family.GPT_NEOX else _PROJECTIONS
    if module[1] in table:
      return f'{table[module[1]]}.{_suffix(leaf)}'
  raise ValueError(f'No HF {cfg.family} name for layer leaf {"/".join(path)}.')


def state_dict(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """Vanilla 'params' of Decoder(cfg) as the family's HF state dict: fp32, contiguous, [out, in] kernels. A tied
  model has no head tensor (transformers ties it on load)."""
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
  flat = traverse_util.flatten_dict(params)
  if stray := [p for p in flat if p not in _TOP_LEVEL and p[:len(LAYER_PATH)] != LAYER_PATH]:
    raise ValueError(f'params {["/".join(p) for p in stray[:3]]} are not those of a vanilla model: unroll a '
                     'recursive model first (rrt_jax.export.unroll).')
  neox = cfg.family == Family.GPT_NEOX
  prefix = 'gpt_neox.' if neox else 'model.'
  out = {prefix + ('embed_in' if neox else 'embed_tokens') + '.weight': f32(params['embedder']['embedding'])}
  fused: dict[tuple[int, str], dict[str, np.ndarray]] = {}
  phi3: dict[tuple[int, str], dict[str, np.ndarray]] = {}
  for path, stacked in traverse_util.flatten_dict(layer_tree(params)).items():
    stacked = np.asarray(stacked, np.float32)
    if stacked.shape[0] != cfg.num_layers:
      raise ValueError(f'Layer leaf {"/".join(path)} holds {stacked.shape[0]} layers, the config {cfg.num_layers}.')
    for i in range(cfg.num_layers):
      value = stacked[i].T if path[-1] == 'kernel' else stacked[i]
      if neox and path[0] == 'attn' and path[1] in _NEOX_FUSED:
        fused.setdefault((i, _suffix(path[-1])), {})[path[1]] = value
        continue
      if cfg.family == Family.PHI3 and path[-1] == 'kernel' and path[1] in _PHI3_FUSED:
        phi3.setdefault((i, _PHI3_FUSED[path[1]]), {})[path[1]] = value
        continue
      out[f'{prefix}layers.{i}.{_layer_name(cfg, path)}'] = f32(value)
  for (i, suffix), parts in sorted(fused.items()):
    if set(parts) != set(_NEOX_FUSED):
      raise ValueError(f'GPT-NeoX layer {i} has {sorted(parts)} of q, k, v {suffix}s: all three are fused together.')
    # The inverse of convert/hf.py's split: rows [heads, (q, k, v), head_dim, ...].
    per_head = np.stack([parts[p].reshape(cfg.num_heads, cfg.head_dim, *parts[p].shape[1:]) for p in _NEOX_FUSED],
                        axis=1)
    rows = 3 * cfg.num_heads * cfg.head_dim
    out[f'gpt_neox.layers.{i}.attention.query_key_value.{suffix}'] = f32(per_head.reshape(rows, *per_head.shape[3:]))
  for (i, name), parts in sorted(phi3.items()):
    order = [p for p, fused_name in _PHI3_FUSED.items() if fused_name == name]
    if set(parts) != set(order):
      raise ValueError(f'Phi-3 layer {i} has {sorted(parts)} of {order}: they are fused together.')
    out[f'model.layers.{i}.{name}.weight'] = f32(np.concatenate([parts[p] for p in order], axis=0))
  final = 'gpt_neox.final_layer_norm' if neox else 'model.norm'
  for leaf, value in params['final_norm'].items():
    out[f'{final}.{_suffix(leaf)}'] = f32(value)
  if not cfg.tie_embeddings:
    out['embed_out.weight' if neox else 'lm_head.weight'] = f32(np.asarray(params['lm_head']).T)
  return out


def _rope(cfg: ModelConfig) -> tuple[dict, dict | None]:
  """(transformers 5's rope_parameters, transformers 4's rope_scaling or None)."""
  params = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  scaling = None
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    scaling = {'rope_type': s.rope_type, 'type': s.rope_type, 'factor': s.factor}
    if s.rope_type == 'llama3':
      scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                     original_max_position_embeddings=s.original_max_position_embeddings)
    if s.rope_type == 'yarn':
      scaling['original_max_position_embeddings'] = s.original_max_position_embeddings
      scaling.update({k: getattr(s, k) for k in ('beta_fast', 'beta_slow', 'attention_factor', 'truncate')
                      if getattr(s, k) is not None})
    params.update({k: v for k, v in scaling.items() if k != 'type'})
  return params, scaling


def hf_config(cfg: ModelConfig, eos_token_id: int | None = None, dtype: str = 'float32') -> dict:
  """config.json of the vanilla model `cfg` for its family, in transformers 5's spelling with transformers 4's
  RoPE keys beside it (both read it). Raises when the family cannot express `cfg` exactly."""
  if cfg.family not in ARCHITECTURES:
    raise ValueError(f'No HF architecture for family {cfg.family!r}.')
  rope_parameters, rope_scaling = _rope(cfg)
  hf = dict(
      architectures=[ARCHITECTURES[cfg.family]], model_type=MODEL_TYPES[cfg.family.value], vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_seq_len,
      tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attn_bias, rope_parameters=rope_parameters,
      rope_theta=cfg.rope_theta, bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None, dtype=dtype,
      torch_dtype=dtype, use_cache=True)
  if cfg.family == Family.GPT_NEOX:
    rope_parameters['partial_rotary_factor'] = cfg.rotary_fraction
    hf.update(hidden_act='gelu', layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
              rotary_pct=cfg.rotary_fraction, rotary_emb_base=cfg.rope_theta)
  else:
    act = 'gelu_pytorch_tanh' if cfg.family in _GEMMA_FAMILIES else 'silu'
    hf.update(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act=act, rms_norm_eps=cfg.norm_eps)
    if cfg.family in _GEMMA_FAMILIES:
      hf['hidden_activation'] = act
    elif cfg.family == Family.LLAMA:
      hf['mlp_bias'] = cfg.mlp_bias
    if cfg.rotary_fraction != 1.0:
      rope_parameters['partial_rotary_factor'] = hf['partial_rotary_factor'] = cfg.rotary_fraction
    _newer_features(cfg, hf)
  if rope_scaling is not None:
    hf['rope_scaling'] = rope_scaling
  _check_expressible(cfg, hf)
  return hf


def _newer_features(cfg: ModelConfig, hf: dict) -> None:
  """The config.json keys of sliding windows, layer patterns, Gemma 2/3's scalars and Gemma 3's local RoPE."""
  hf['sliding_window'] = cfg.sliding_window
  if cfg.layer_types is not None:
    hf['layer_types'] = [f'{t}_attention' for t in cfg.layer_types]
  elif cfg.family in (Family.QWEN2, Family.QWEN3, Family.GEMMA2, Family.GEMMA3):  # Their default has a pattern.
    hf['layer_types'] = ['sliding_attention' if s else 'full_attention' for s in cfg.sliding_layers]
  if cfg.family in (Family.QWEN2, Family.QWEN3):
    hf['use_sliding_window'] = bool(cfg.sliding_window)
    hf['max_window_layers'] = cfg.num_layers
  if cfg.family in (Family.GEMMA2, Family.GEMMA3):
    scalar = cfg.query_pre_attn_scalar  # transformers types it int.
    hf.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
              attn_logit_softcapping=cfg.attn_softcap,
              final_logit_softcapping=cfg.final_softcap)
  if cfg.family == Family.GEMMA3:
    local = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta
    hf['rope_parameters'] = {'full_attention': hf['rope_parameters'],
                             'sliding_attention': {'rope_type': 'default', 'rope_theta': local}}
    hf['rope_local_base_freq'] = local


def _check_expressible(cfg: ModelConfig, hf: dict) -> None:
  try:
    back = config_from_hf(json.loads(json.dumps(hf)))
  except ValueError as e:
    raise ValueError(f'An HF {cfg.family} checkpoint cannot express this model: {e}') from None
  back = back.replace(**{k: getattr(cfg, k) for k in _RUNTIME_FIELDS})
  if wrong := [f.name for f in dataclasses.fields(cfg) if getattr(back, f.name) != getattr(cfg, f.name)]:
    what = ', '.join(f'{k}={getattr(cfg, k)!r} (HF would give {getattr(back, k)!r})' for k in wrong)
    raise ValueError(f'An HF {cfg.family} checkpoint cannot express this model: {what}.')


def _write_json(path: str, data: dict) -> None:
  with open(path, 'w') as f:
    json.dump(data, f, indent=2)
    f.write('\n')


def to_hf(source: Source, out_dir: str | os.PathLike, step: int | None = None, dtype: str | None = 'float32',
          tokenizer=None) -> ExportResult:
  """Writes the unrolled model (the final exit's function as a plain cfg.num_layers-layer model) as an HF
  checkpoint in the local directory `out_dir`: model.safetensors, config.json, generation_config.json and, for a
  tokenizer with a tokenizer.json form, tokenizer.json + tokenizer_config.json.

  source: a training workdir (latest checkpoint, or `step`), an rrt_jax.save directory, or (cfg, rec, variables).
  dtype: the tensors' dtype ('float32', 'bfloat16', 'float16'); None = the model's param_dtype.
  tokenizer: overrides the recorded tokenizer (an rrt_jax.pretrained.tokenizer tokenizer)."""
  try:
    from safetensors.numpy import save_file
  except ImportError as e:
    raise ImportError('Writing HF checkpoints needs the safetensors package: pip install safetensors==0.8.0') from e
  model = load_source(source, step, tokenizer)
  cfg, notes = model.cfg, list(model.notes)
  dtype = dtype or cfg.param_dtype
  np_dtype = jnp.dtype(dtype)  # ml_dtypes' bfloat16 for 'bfloat16'; safetensors writes it as BF16.
  tok, tok_note = tokenizers_object(model.tokenizer)
  eos = eos_id(model.tokenizer)
  config = hf_config(cfg, eos, dtype)  # Before the unrolling: an inexpressible model fails at once.
  params = unroll(cfg, model.rec, model.variables)['params']
  tensors = {name: value.astype(np_dtype) for name, value in state_dict(cfg, params).items()}
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={'format': 'pt'})
  _write_json(os.path.join(out_dir, 'config.json'), config)
  _write_json(os.path.join(out_dir, 'generation_config.json'), {'eos_token_id': eos, 'bos_token_id': None})
  files = [WEIGHTS_FILE, 'config.json', 'generation_config.json']
  if tok is None:
    notes.append(tok_note)
  else:
    with open(os.path.join(out_dir, 'tokenizer.json'), 'w') as f:
      f.write(tok.to_str())
    tok_config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': cfg.max_seq_len,
                  'clean_up_tokenization_spaces': False}
    if eos is not None:
      tok_config['eos_token'] = tok.id_to_token(eos)
    _write_json(os.path.join(out_dir, 'tokenizer_config.json'), tok_config)
    files += ['tokenizer.json', 'tokenizer_config.json']
  notes += unrolled_note(model)
  return ExportResult(out_dir, tuple(files), tuple(notes))
