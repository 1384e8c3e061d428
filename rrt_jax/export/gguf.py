"""Our vanilla Llama-family params -> a llama.cpp GGUF file: the inverse of rrt_jax/pretrained/gguf.py.

Tensors go under llama.cpp's names (token_embd, blk.N.attn_q, ...), in HF's [out, in] layout, with the Q and K rows
permuted back into llama.cpp's interleaved rotary order (`permute_qk`, the inverse of the reader's unpermute_qk).
Matrices are f32 or f16, 1-D tensors (norms) always f32, as llama.cpp's converter writes them. The metadata are the
llama.* keys rrt_jax's reader (and llama.cpp) read, and, for a byte-level BPE tokenizer, its vocabulary and merges
(tokenizer.ggml.*), so `load_gguf` and `load_tokenizer` read the file back to the same model and tokenizer.
"""

from __future__ import annotations

import json
import os

import numpy as np

from rrt_jax.config import Family, ModelConfig
from rrt_jax.export.hf import hf_config, state_dict
from rrt_jax.export.source import ExportResult, Source, eos_id, load_source, tokenizers_object, unrolled_note
from rrt_jax.export.unroll import unroll

_NAMES = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
          'lm_head.weight': 'output.weight'}
_LAYER_NAMES = {  # HF name after 'model.layers.{i}.' -> llama.cpp name after 'blk.{i}.'.
    'self_attn.q_proj.weight': 'attn_q.weight', 'self_attn.k_proj.weight': 'attn_k.weight',
    'self_attn.v_proj.weight': 'attn_v.weight', 'self_attn.o_proj.weight': 'attn_output.weight',
    'mlp.gate_proj.weight': 'ffn_gate.weight', 'mlp.up_proj.weight': 'ffn_up.weight',
    'mlp.down_proj.weight': 'ffn_down.weight', 'input_layernorm.weight': 'attn_norm.weight',
    'post_attention_layernorm.weight': 'ffn_norm.weight'}
_DTYPES = {'float32': np.float32, 'float16': np.float16}


def permute_qk(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's convert permutation of Q/K rows (per head: rotate-half halves -> interleaved pairs); the inverse of
  rrt_jax.pretrained.gguf.unpermute_qk."""
  rows = w_OxI.shape[0]
  return w_OxI.reshape(heads, 2, rows // heads // 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def check_gguf_expressible(cfg: ModelConfig) -> None:
  """Raises unless our GGUF reader reads `cfg` back exactly: a plain Llama (no biases, head_dim = d_model /
  heads, plain or linear RoPE)."""
  if cfg.family != Family.LLAMA:
    raise ValueError(f'GGUF export writes Llama-family models; this one is {cfg.family.value}: export it to HF '
                     '(to_hf / --format=hf) instead.')
  hf_config(cfg)  # The Llama family must express it at all.
  problems = []
  if cfg.attn_bias or cfg.mlp_bias:
    problems.append('projection biases (attn_bias / mlp_bias)')
  if cfg.head_dim * cfg.num_heads != cfg.d_model:
    problems.append(f'head_dim {cfg.head_dim} != d_model / num_heads = {cfg.d_model // cfg.num_heads}')
  if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type != 'linear':
    problems.append(f'{cfg.rope_scaling.rope_type} RoPE scaling')
  if problems:
    raise ValueError(f'rrt_jax\'s GGUF reader cannot read back a model with {", ".join(problems)}: export it to HF '
                     '(to_hf / --format=hf) instead.')


def _gguf_name(hf_name: str) -> str:
  if hf_name in _NAMES:
    return _NAMES[hf_name]
  parts = hf_name.split('.', 3)  # model, layers, i, rest
  if parts[:2] != ['model', 'layers'] or parts[3] not in _LAYER_NAMES:
    raise ValueError(f'No GGUF name for tensor {hf_name}.')
  return f'blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}'


def _token_metadata(writer, tok, cfg: ModelConfig, eos: int | None) -> str | None:
  """Writes a byte-level BPE tokenizer's tokenizer.ggml.* keys; returns a note instead when it has none."""
  import gguf
  data = json.loads(tok.to_str())
  pre = json.dumps(data.get('pre_tokenizer'))
  if data.get('model', {}).get('type') != 'BPE' or '"ByteLevel"' not in pre:
    return ('the tokenizer is not a byte-level BPE, the only kind GGUF tokenizer.ggml.model=gpt2 holds: no tokenizer '
            'written to the GGUF file')
  vocab = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
  if max(vocab) >= cfg.vocab_size:
    return (f'the tokenizer has ids up to {max(vocab)}, beyond the model\'s {cfg.vocab_size}: no tokenizer written '
            'to the GGUF file')
  added = tok.get_added_tokens_decoder()
  tokens, types = [], []
  for i in range(cfg.vocab_size):  # Ids the tokenizer never produces are padded as unused, as llama.cpp does.
    if i not in vocab:
      tokens.append(f'[PAD{i}]')
      types.append(gguf.TokenType.UNUSED)
    elif i in added:
      tokens.append(vocab[i])
      types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    else:
      tokens.append(vocab[i])
      types.append(gguf.TokenType.NORMAL)
  merges = [m if isinstance(m, str) else ' '.join(m) for m in data['model'].get('merges', [])]
  writer.add_tokenizer_model('gpt2')
  # Our reader's pre-tokenizer: SmolLM's (digits split one by one, then byte-level) or plain byte-level.
  writer.add_tokenizer_pre('smollm' if '"individual_digits": true' in pre else 'gpt2')
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_add_bos_token(False)  # rrt_jax models are trained without a BOS token.
  if eos is not None:
    writer.add_eos_token_id(eos)
  return None


def _placeholder_tokens(writer, cfg: ModelConfig) -> None:
  """No tokenizer: tokenizer.ggml.model 'none' (llama.cpp's vocabulary-less model) with one unused placeholder per
  id, because rrt_jax's reader (and llama.cpp) count tokenizer.ggml.tokens."""
  import gguf
  writer.add_tokenizer_model('none')
  writer.add_token_list([f'[UNUSED{i}]' for i in range(cfg.vocab_size)])
  writer.add_token_types([gguf.TokenType.UNUSED] * cfg.vocab_size)


def to_gguf(source: Source, out_path: str | os.PathLike, step: int | None = None, dtype: str = 'float32',
            tokenizer=None, name: str = 'rrt_jax export') -> ExportResult:
  """Writes the unrolled Llama-family model (the final exit's function as a plain model) as a GGUF file at the local
  path `out_path`; rrt_jax.pretrained.gguf.load_gguf reads it back to the same params.

  source: a training workdir (latest checkpoint, or `step`), an rrt_jax.save directory, or (cfg, rec, variables).
  dtype: 'float32' or 'float16' for the matrices (norms stay float32).
  tokenizer: overrides the recorded tokenizer."""
  try:
    import gguf
  except ImportError as e:
    raise ImportError('Writing GGUF files needs the `gguf` package: pip install gguf==0.19.0') from e
  if dtype not in _DTYPES:
    raise ValueError(f'GGUF export writes float32 or float16 tensors, not {dtype!r}.')
  model = load_source(source, step, tokenizer)
  cfg, notes = model.cfg, list(model.notes)
  check_gguf_expressible(cfg)
  params = unroll(cfg, model.rec, model.variables)['params']
  tensors = state_dict(cfg, params)
  out_path = os.fspath(out_path)
  if os.path.dirname(out_path):
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
  writer = gguf.GGUFWriter(out_path, 'llama')
  writer.add_name(name)
  writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == 'float32' else gguf.LlamaFileType.MOSTLY_F16)
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.num_layers)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_dimension_count(cfg.rotary_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  if cfg.rope_scaling is not None:  # Linear: check_gguf_expressible refused the rest.
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
  tok, note = tokenizers_object(model.tokenizer)
  note = note if tok is None else _token_metadata(writer, tok, cfg, eos_id(model.tokenizer))
  if note:
    notes.append(note)
    _placeholder_tokens(writer, cfg)
  for hf_name, value in tensors.items():
    gguf_name = _gguf_name(hf_name)
    if gguf_name.endswith('attn_q.weight'):
      value = permute_qk(value, cfg.num_heads)
    elif gguf_name.endswith('attn_k.weight'):
      value = permute_qk(value, cfg.num_kv_heads)
    value = np.ascontiguousarray(value, _DTYPES[dtype] if value.ndim > 1 else np.float32)
    writer.add_tensor(gguf_name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  notes += unrolled_note(model)
  return ExportResult(out_path, (os.path.basename(out_path),), tuple(notes))
