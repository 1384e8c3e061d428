r"""Input pipeline throughput against the training step's consumption, and SmolLM2 load/eval figures.

  python -m experiments.bench_data --batches=50 --eval_tokens=8192

Prints, in one run on this machine: the GGUF load time; tokens/s of the grain pipeline (train split,
SmolLM2 tokenizer, packing) with its worker count; tokens/s consumed by a jitted SmolLM2-135M train step
(vanilla and relaxed B=3, same batch shape); and the vanilla model's perplexity on each held-out corpus.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import optax
from absl import app, flags

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.convert import to_recursive
from rrt_jax.data.pipeline import PipelineConfig, lm_dataset
from rrt_jax.data.tfds_builder import text_source
from rrt_jax.eval.perplexity import Windows, per_loop_perplexity, sliding_windows
from rrt_jax.pretrained.gguf import load_gguf
from rrt_jax.pretrained.tokenizer import make_tokenizer
from rrt_jax.train.simple_step import train_step_fn
from rrt_jax.utils.timing import compile_seconds, machine_description, median_seconds

_BATCHES = flags.DEFINE_integer('batches', 50, 'Pipeline batches to time.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Sequences per batch.')
_SEQ = flags.DEFINE_integer('seq', 512, 'Tokens per sequence.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'grain worker processes.')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', 8192, 'Scored tokens per held-out corpus.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')


def corpus_windows(split: str, tokenizer, tokens: int, window: int) -> Windows:
  """Windows over the corpus's documents in order (each document windowed on its own) until `tokens`."""
  source, parts, total = text_source(split), [], 0
  for i in range(len(source)):
    ids = tokenizer.encode(source[i]['text'].decode()).ids
    if len(ids) < 2:
      continue
    w = sliding_windows(ids[:tokens - total + 1], window)
    parts.append(w)
    total += w.num_tokens
    if total >= tokens:
      break
  return Windows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ('inputs', 'targets', 'mask')))


def main(argv):
  del argv
  results = {'machine': machine_description()}
  print(f'# {results["machine"]}', flush=True)
  start = time.perf_counter()
  cfg, vanilla = load_gguf()
  results['gguf_load_s'] = time.perf_counter() - start
  tokenizer = make_tokenizer('smollm2')
  print(f'GGUF load (dequantize + place): {results["gguf_load_s"]:.1f} s', flush=True)

  pipe = lm_dataset(text_source('train'), tokenizer, PipelineConfig(_SEQ.value, _BATCH.value,
                                                                    worker_count=_WORKERS.value),
                    max_seq_len=cfg.max_seq_len)
  it = iter(pipe)
  next(it)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  seconds = time.perf_counter() - start
  results['pipeline_tokens_per_s'] = _BATCHES.value * _BATCH.value * _SEQ.value / seconds
  print(f'pipeline: {results["pipeline_tokens_per_s"]:,.0f} tokens/s ({_WORKERS.value} workers)', flush=True)

  tokens = jax.numpy.asarray(next(it)['inputs'])
  for name, rec in (('vanilla', RecursionConfig()), ('relaxed B=3 r=64', RecursionConfig(3, init='average',
                                                                                          lora_rank=64))):
    variables = vanilla if rec.loops == 1 else to_recursive(vanilla, cfg, rec)
    optimizer = optax.adamw(1e-5)
    opt_state = optimizer.init(variables)
    _, step = compile_seconds(train_step_fn(Decoder(cfg, rec), optimizer), variables, opt_state, tokens)
    step_s = median_seconds(step, variables, opt_state, tokens, repeats=3)
    rate = tokens.shape[0] * (tokens.shape[1] - 1) / step_s
    results[f'train_step_tokens_per_s[{name}]'] = rate
    print(f'train step {name}: {step_s:.2f} s -> {rate:,.0f} tokens/s consumed; pipeline / step = '
          f'{results["pipeline_tokens_per_s"] / rate:,.0f}x', flush=True)
    del variables, opt_state

  for split in ('austen', 'brown', 'wikipedia', 'validation'):
    windows = corpus_windows(split, tokenizer, _EVAL_TOKENS.value, 512)
    (ppl,) = per_loop_perplexity(Decoder(cfg), vanilla, windows, batch_size=2)
    results[f'perplexity[{split}]'] = ppl
    print(f'SmolLM2-135M perplexity on {split}: {ppl:.2f} ({windows.num_tokens} tokens, window 512)', flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main)
