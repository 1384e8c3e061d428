"""Outside anchors for the serving benchmark: HF transformers (PyTorch CPU) generate on our exact weights, and the
memory-bandwidth bound of a decode step.

The HF model is built from our vanilla params through rrt_jax.export's state dict (the inverse of
rrt_jax/pretrained/hf.py's mapping), so both sides decode the same numbers; nothing is downloaded.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import traverse_util

from rrt_jax.config import Family, ModelConfig, RecursionConfig
from rrt_jax.export import state_dict
from rrt_jax.model import LAYER_PATH, init_cache


def llama_state_dict(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """Our vanilla Llama 'params' as an HF LlamaForCausalLM state dict (fp32 numpy, [out, in] kernels): the export
  library's mapping (rrt_jax.export.state_dict), for the plain-RoPE Llama models the anchor builds."""
  if cfg.family != Family.LLAMA or cfg.rope_scaling is not None:
    raise ValueError(f'The HF anchor builds plain-RoPE Llama models; got family {cfg.family}, rope_scaling '
                     f'{cfg.rope_scaling}.')
  return state_dict(cfg, params)


def _hf_config_kwargs(cfg: ModelConfig) -> dict:
  return dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_act='silu', max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta}, attention_bias=cfg.attn_bias,
      mlp_bias=cfg.mlp_bias, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
      pad_token_id=0, dtype='float32')


def _build(config_kwargs: dict, state: dict[str, np.ndarray]):
  import torch
  import transformers as tf
  model = tf.LlamaForCausalLM(tf.LlamaConfig(**config_kwargs)).float().eval()
  tied = config_kwargs['tie_word_embeddings']
  missing, unexpected = model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
  missing = [m for m in missing if not (tied and m == 'lm_head.weight')]
  if missing or unexpected:
    raise ValueError(f'HF state dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}.')
  if tied:
    model.tie_weights()
  model.generation_config.eos_token_id = None  # Exactly max_new_tokens tokens, as our engine without stop tokens.
  model.generation_config.pad_token_id = 0
  return model


def hf_llama(cfg: ModelConfig, variables: dict):
  """A transformers LlamaForCausalLM (fp32, eval mode) holding our vanilla Llama weights."""
  return _build(_hf_config_kwargs(cfg), llama_state_dict(cfg, variables['params']))


def _hf_generate(model, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
  """Greedy generate for one batch (left-padded when lengths differ); exactly `new_tokens` ids per prompt."""
  import torch
  width = max(len(p) for p in prompts)
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    mask[i, width - len(p):] = 1
  with torch.inference_mode():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         do_sample=False, num_beams=1)
  return out[:, width:].tolist()


def hf_pass(model, prompts: Sequence[Sequence[int]], new_tokens: int, batch: int) -> tuple[float, list[list[int]]]:
  """Seconds of one greedy HF generate pass over `prompts` in batches of `batch`, and its tokens."""
  start, tokens = time.perf_counter(), []
  for i in range(0, len(prompts), batch):
    tokens += _hf_generate(model, prompts[i:i + batch], new_tokens)
  return time.perf_counter() - start, tokens


def _hf_timings(config_kwargs: dict, state: dict, prompts: list[list[int]], new_tokens: int,
                batches: tuple[int, ...], threads: tuple[int, ...], repeats: int) -> list[dict]:
  """Runs in the anchor's own process (see hf_anchor_rows)."""
  import torch
  model = _build(config_kwargs, state)
  del state
  threads = tuple(dict.fromkeys(threads or (torch.get_num_threads(),)))
  out = []
  for t in threads:
    torch.set_num_threads(t)
    for b in batches:
      hf_pass(model, prompts, new_tokens, b)  # Warm-up (allocator, kernels).
      first, full = [], []
      for _ in range(repeats):
        first.append(hf_pass(model, prompts, 1, b)[0])
        seconds, tokens = hf_pass(model, prompts, new_tokens, b)
        full.append(seconds)
      first_s, full_s = statistics.median(first), statistics.median(full)
      total = len(prompts) * new_tokens
      out.append({'batch': b, 'threads': t, 'tokens': tokens, 'wall_s': full_s, 'first_token_s': first_s,
                  'tokens_per_s': total / full_s,
                  'decode_tokens_per_s': total / (full_s - first_s) if full_s > first_s else float('nan')})
      print(f'  HF anchor batch {b}, {t} threads: {out[-1]["decode_tokens_per_s"]:.1f} decode tok/s', flush=True)
  return out


def hf_anchor_rows(cfg: ModelConfig, variables: dict, prompts: Sequence[Sequence[int]], new_tokens: int,
                   batches: Sequence[int], threads: Sequence[int] = (), repeats: int = 3) -> list[dict]:
  """HF generate timings (greedy, our weights) at every (torch threads, batch): median over repeats after a
  warm-up, of the pass with `new_tokens` and of a 1-token pass (prefill + first token); decode tok/s = generated
  tokens / their difference. Runs in a fresh spawned process, so torch's OpenMP threads and XLA's thread pool
  never spin against each other (in one process they did: 2-thread HF fell ~10x)."""
  import multiprocessing
  state = llama_state_dict(cfg, variables['params'])
  with multiprocessing.get_context('spawn').Pool(1) as pool:
    return pool.apply(_hf_timings, (_hf_config_kwargs(cfg), state, [list(p) for p in prompts], new_tokens,
                                    tuple(batches), tuple(threads), repeats))


def _median_parallel_seconds(fn, sizes: int, threads: int, repeats: int) -> float:
  """Median seconds of fn(lo, hi) over `threads` disjoint slices of range(sizes) run concurrently (numpy releases
  the GIL for plain copies and dot products), after one warm-up."""
  bounds = np.linspace(0, sizes, threads + 1).astype(int)

  def run() -> None:
    workers = [threading.Thread(target=fn, args=(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for w in workers:
      w.start()
    for w in workers:
      w.join()

  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 7, threads: int = 1) -> float:
  """Memory bandwidth in bytes/s from a large numpy copy (read + write counted, as STREAM's copy): median of
  `repeats`. threads > 1 copies disjoint slices concurrently."""
  src = np.ones(nbytes // 8)
  dst = np.empty_like(src)
  seconds = _median_parallel_seconds(lambda a, b: np.copyto(dst[a:b], src[a:b]), src.size, threads, repeats)
  return 2 * src.nbytes / seconds


def read_bandwidth(nbytes: int = 1 << 28, repeats: int = 7, threads: int = 1) -> float:
  """Read-only memory bandwidth in bytes/s: a dot product of a large fp32 array with itself (each byte read once,
  as a decode step reads its weights): median of `repeats`. Higher than `copy_bandwidth` where writes cost more
  than reads, so the tighter bound for decoding."""
  x = np.ones(nbytes // 4, np.float32)
  return x.nbytes / _median_parallel_seconds(lambda a, b: np.dot(x[a:b], x[a:b]), x.size, threads, repeats)


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def decode_bytes_per_token(cfg: ModelConfig, rec: RecursionConfig, variables: dict, context: int) -> dict:
  """Bytes a batch-1 decode token must read at least, running every loop (no exit): each loop reads the shared
  block (and its loop's LoRA) and the head matrix once, the unique layers and final norm once, one embedding
  row, and the whole KV cache at `context` positions (the engine attends over its full buffer)."""
  params = variables['params']
  embedding = _nbytes(params['embedder']['embedding'])
  head = _nbytes(params['lm_head']) if 'lm_head' in params else embedding
  shared = _nbytes(traverse_util.unflatten_dict(
      {p: x for p, x in traverse_util.flatten_dict(params).items() if p[:len(LAYER_PATH)] == LAYER_PATH}))
  other = _nbytes(params) - shared - embedding - (head if 'lm_head' in params else 0)
  lora_per_loop = _nbytes(variables.get('lora', {})) // rec.loops
  row = embedding // cfg.vocab_size
  cache = _nbytes(jax.eval_shape(lambda: init_cache(cfg, rec, 1, context)))
  params_read = rec.loops * (shared + lora_per_loop + head) + other + row
  return {'param_bytes': params_read, 'kv_cache_bytes': cache, 'total_bytes': params_read + cache,
          'context': context}


__all__ = ['copy_bandwidth', 'decode_bytes_per_token', 'hf_anchor_rows', 'hf_llama', 'hf_pass', 'llama_state_dict',
           'read_bandwidth']
