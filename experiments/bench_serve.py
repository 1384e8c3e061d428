r"""Serving throughput, measured for real: vanilla + continuous sequence-wise batching (CSB) against Recursive and
Relaxed Recursive SmolLM2 + continuous depth-wise batching (CDB) with early exit, in one run.

  python -m experiments.bench_serve --workdir=workdir/bench_serve

Every variant serves the same requests (prompts cut from held-out Austen text, --prompt_len tokens each,
--decode_len greedy tokens) through rrt_jax.serve.engine with --slots slots; variants are interleaved and
repeated (--repeats) and the median is reported. Quality at each threshold: teacher-forced early-exit
perplexity on held-out text, and agreement of the generated tokens with the same model's no-exit output.
It also times the stages the paper's simulator needs (embedding, one block pass, head; batch 1 and --slots),
written as simulator_latencies.json for experiments/simulate_cdb.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from experiments.serving_benchmark import benchmark, markdown, plot_throughput, simulator_latencies
from rrt_jax import Decoder, RecursionConfig
from rrt_jax.convert import to_recursive
from rrt_jax.convert.gguf import load_gguf, load_tokenizer
from rrt_jax.data import austen
from rrt_jax.eval.perplexity import sliding_windows
from rrt_jax.serve.engine import Request
from rrt_jax.train.checkpointing import load_training_checkpoint
from rrt_jax.utils.timing import machine_description

_WORKDIR = flags.DEFINE_string('workdir', 'workdir/bench_serve', 'Where results, tables and plots go.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 512, 'Prompt tokens per request (the paper: 512).')
_DECODE_LEN = flags.DEFINE_integer('decode_len', 32, 'Generated tokens per request.')
_REQUESTS = flags.DEFINE_integer('requests', 8, 'Requests per run (all arrive at once unless --arrival_rate).')
_ARRIVAL_RATE = flags.DEFINE_float('arrival_rate', 0.0, 'Poisson arrivals per second (0 = all at time 0).')
_SLOTS = flags.DEFINE_integer('slots', 4, 'Engine slots (max batch).')
_LOOPS = flags.DEFINE_integer('loops', 3, 'Loops B of the recursive models.')
_RANKS = flags.DEFINE_list('ranks', ['64'], 'LoRA ranks of the relaxed models (Average + SVD).')
_THRESHOLDS = flags.DEFINE_list('thresholds', ['1.0', '0.9', '0.7', '0.5'], 'Exit thresholds (1.0 = no exit).')
_CONFIDENCE = flags.DEFINE_enum('confidence', 'max_prob', ['max_prob', 'margin', 'saturation'], 'Exit confidence.')
_RELAXED_WORKDIR = flags.DEFINE_string('relaxed_workdir', None,
                                       'Training workdir of an uptrained relaxed model to serve instead of the '
                                       'freshly converted ones (e.g. workdir/main/uptrain).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repeats; the median is reported.')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', 2048, 'Held-out tokens for the early-exit perplexity.')


def _requests(ids: list[int]) -> list[Request]:
  rng = np.random.default_rng(0)
  starts = rng.integers(0, len(ids) - _PROMPT_LEN.value, _REQUESTS.value)
  arrivals = (np.cumsum(rng.exponential(1 / _ARRIVAL_RATE.value, _REQUESTS.value)) if _ARRIVAL_RATE.value
              else np.zeros(_REQUESTS.value))
  return [Request(ids[s:s + _PROMPT_LEN.value], _DECODE_LEN.value, float(a)) for s, a in zip(starts, arrivals,
                                                                                              strict=True)]


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  machine = machine_description()
  print(f'# serving benchmark on {machine}', flush=True)
  cfg, vanilla = load_gguf()
  tokenizer = load_tokenizer()
  books, _ = austen.novels()
  ids = tokenizer.encode(books['Emma']).ids
  requests = _requests(ids)
  windows = sliding_windows(tokenizer.encode(books['Pride And Prejudice']).ids[:_EVAL_TOKENS.value + 1], 512)
  thresholds = [float(t) for t in _THRESHOLDS.value]
  b = _LOOPS.value

  models = {'vanilla': (Decoder(cfg), vanilla)}
  rec = RecursionConfig(loops=b, init='stepwise')
  models[f'recursive B={b}'] = (Decoder(cfg, rec), to_recursive(vanilla, cfg, rec))
  if _RELAXED_WORKDIR.value:
    model, variables, step = load_training_checkpoint(_RELAXED_WORKDIR.value)
    models[f'relaxed B={model.rec.loops} r={model.rec.lora_rank} (uptrained {step} steps)'] = (model, variables)
  else:
    for r in _RANKS.value:
      rec = RecursionConfig(loops=b, init='average', lora_rank=int(r))
      models[f'relaxed B={b} r={r}'] = (Decoder(cfg, rec), to_recursive(vanilla, cfg, rec))

  rows, latencies = benchmark(models, requests, windows, thresholds, _SLOTS.value, _REPEATS.value,
                              _CONFIDENCE.value)
  recursive_name = list(models)[1]
  exit_trace = next(r['exit_loops'] for r in rows if r['model'] == recursive_name
                    and r['threshold'] == min(thresholds))
  table = (f'Serving SmolLM2-135M on {machine}: {_REQUESTS.value} requests, prompt {_PROMPT_LEN.value}, '
           f'decode {_DECODE_LEN.value}, {_SLOTS.value} slots, median of {_REPEATS.value}.\n\n'
           + markdown(rows, latencies, _SLOTS.value))
  print('\n' + table, flush=True)
  with open(os.path.join(_WORKDIR.value, 'results.json'), 'w') as f:
    json.dump({'machine': machine, 'flags': {k: flags.FLAGS[k].value for k in (
        'prompt_len', 'decode_len', 'requests', 'arrival_rate', 'slots', 'loops', 'ranks', 'thresholds',
        'confidence', 'repeats')}, 'rows': rows, 'stage_latencies_s': latencies}, f, indent=2)
  with open(os.path.join(_WORKDIR.value, 'results.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(_WORKDIR.value, 'simulator_latencies.json'), 'w') as f:
    json.dump({'machine': machine, 'vanilla': simulator_latencies(latencies['vanilla'], _SLOTS.value),
               'recursive': simulator_latencies(latencies[recursive_name], _SLOTS.value),
               'recursive_model': recursive_name, 'exit_loops': exit_trace, 'loops': b}, f, indent=2)
  plot_throughput(rows, os.path.join(_WORKDIR.value, 'throughput_vs_quality.png'))
  print(f'wrote {_WORKDIR.value}/results.json, results.md, simulator_latencies.json, throughput_vs_quality.png')


if __name__ == '__main__':
  app.run(main)
