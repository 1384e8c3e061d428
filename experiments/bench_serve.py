r"""Serving throughput, measured for real and at matched quality: vanilla + continuous sequence-wise batching (CSB)
against Recursive and Relaxed Recursive SmolLM2 (converted, and uptrained from training workdirs) + continuous
depth-wise batching (CDB) with early exit, in one run.

  python -m experiments.bench_serve --workdir=workdir/bench_serve --workdirs=workdir/main/uptrain --bf16

Every variant serves the same requests (prompts cut from held-out Austen text, --prompt_len tokens each,
--decode_len greedy tokens) through rrt_jax.serve.engine with --slots slots; variants are interleaved and
repeated (--repeats) and the median is reported. Quality at each of --thresholds: teacher-forced early-exit
perplexity on held-out text, and agreement of the generated tokens with the same model's no-exit output.

Headline (serving_benchmark.select_thresholds): per model the fastest threshold whose tokens agree with its
no-exit output on >= --min_agreement of tokens and whose early-exit perplexity is within --max_ppl_increase of
its no-exit perplexity, against vanilla + CSB of the same run (if none qualifies: no exit). --bf16 adds every
model cast to bfloat16 (parameters and KV cache; rrt_jax.serve.precision) with its speed and perplexity against
fp32. Anchors in the same run: HF transformers generate (PyTorch CPU, the same weights) and our vanilla engine at
batch 1 and --slots, and the memory-bandwidth bound of a batch-1 decode token. Also the stage timings the
paper's simulator needs, written as simulator_latencies.json for experiments/simulate_cdb.py.

--tiny runs the same pipeline on a random tiny Llama with random token prompts (a smoke test: no model file,
no corpus).
"""

from __future__ import annotations

import json
import os
import shlex
import sys

import jax
import numpy as np
from absl import app, flags

from experiments import serving_benchmark as sb
from experiments.hf_anchor import copy_bandwidth
from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.checkpoint import load_training_checkpoint
from rrt_jax.convert import to_recursive
from rrt_jax.eval.perplexity import sliding_windows
from rrt_jax.model import init_variables
from rrt_jax.serve.engine import Request
from rrt_jax.serve.precision import cast_for_serving
from rrt_jax.utils.timing import machine_description
from rrt_jax.utils.xla_cpu import prefer_ynn_dots

_WORKDIR = flags.DEFINE_string('workdir', 'workdir/bench_serve', 'Where results, tables and plots go.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 512, 'Prompt tokens per request (the paper: 512).')
_DECODE_LEN = flags.DEFINE_integer('decode_len', 32, 'Generated tokens per request.')
_REQUESTS = flags.DEFINE_integer('requests', 8, 'Requests per run (all arrive at once unless --arrival_rate).')
_ARRIVAL_RATE = flags.DEFINE_float('arrival_rate', 0.0, 'Poisson arrivals per second (0 = all at time 0).')
_SLOTS = flags.DEFINE_integer('slots', 4, 'Engine slots (max batch); the anchors run at batch 1 and this.')
_LOOPS = flags.DEFINE_integer('loops', 3, 'Loops B of the converted recursive models.')
_RANKS = flags.DEFINE_list('ranks', ['64'], 'LoRA ranks of the converted relaxed models (Average + SVD); '
                           'empty = none.')
_WORKDIRS = flags.DEFINE_list('workdirs', [], 'Training workdirs of uptrained recursive/relaxed models to serve '
                              'beside the converted ones (e.g. workdir/main/uptrain); the latest checkpoint of each.')
_THRESHOLDS = flags.DEFINE_list('thresholds', ['1.0', '0.95', '0.9', '0.8', '0.7', '0.5', '0.3'],
                                'Exit thresholds swept (1.0 = no exit, always included).')
_CONFIDENCE = flags.DEFINE_enum('confidence', 'max_prob', ['max_prob', 'margin', 'saturation'], 'Exit confidence.')
_MIN_AGREEMENT = flags.DEFINE_float('min_agreement', 0.9, 'Matched quality: least agreement with the no-exit output.')
_MAX_PPL_INCREASE = flags.DEFINE_float('max_ppl_increase', 0.05, 'Matched quality: most early-exit perplexity '
                                       'increase over no exit (0.05 = 5 %).')
_BF16 = flags.DEFINE_bool('bf16', False, 'Also serve every model in bfloat16 (parameters and KV cache).')
_ANCHORS = flags.DEFINE_bool('anchors', True, 'Time HF transformers generate and our vanilla engine at batch 1 and '
                             '--slots.')
_HF_THREADS = flags.DEFINE_list('hf_threads', ['1', str(os.cpu_count())], 'torch thread counts the HF anchor runs '
                                'at, each reported (on a busy machine 1 thread can be the fastest).')
_BANDWIDTH_MB = flags.DEFINE_integer('bandwidth_mb', 512, 'Array size of the copy-bandwidth measurement (MB).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repeats; the median is reported.')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', 2048, 'Held-out tokens for the early-exit perplexity.')
_TINY = flags.DEFINE_bool('tiny', False, 'Smoke mode: a random tiny Llama and random token ids.')

_FLAG_NAMES = ('prompt_len', 'decode_len', 'requests', 'arrival_rate', 'slots', 'loops', 'ranks', 'workdirs',
               'thresholds', 'confidence', 'min_agreement', 'max_ppl_increase', 'bf16', 'anchors', 'hf_threads',
               'bandwidth_mb', 'repeats', 'eval_tokens', 'tiny')


def _requests(ids: list[int]) -> list[Request]:
  rng = np.random.default_rng(0)
  starts = rng.integers(0, len(ids) - _PROMPT_LEN.value, _REQUESTS.value)
  arrivals = (np.cumsum(rng.exponential(1 / _ARRIVAL_RATE.value, _REQUESTS.value)) if _ARRIVAL_RATE.value
              else np.zeros(_REQUESTS.value))
  return [Request(ids[s:s + _PROMPT_LEN.value], _DECODE_LEN.value, float(a)) for s, a in zip(starts, arrivals,
                                                                                              strict=True)]


def _vanilla_and_text():
  """(cfg, vanilla variables, request source ids, held-out ids, description)."""
  if _TINY.value:
    cfg = presets.TINY_LLAMA
    rng = np.random.default_rng(1)
    random_ids = lambda n: rng.integers(3, cfg.vocab_size, n).tolist()  # noqa: E731
    return (cfg, init_variables(cfg, RecursionConfig(), jax.random.key(0)),
            random_ids(max(4 * _PROMPT_LEN.value, 1024)), random_ids(_EVAL_TOKENS.value + 1), 'tiny random Llama')
  from rrt_jax.data import austen
  from rrt_jax.pretrained.gguf import load_gguf, load_tokenizer
  cfg, vanilla = load_gguf()
  tokenizer = load_tokenizer()
  books, _ = austen.novels()
  return (cfg, vanilla, tokenizer.encode(books['Emma']).ids,
          tokenizer.encode(books['Pride And Prejudice']).ids[:_EVAL_TOKENS.value + 1], 'SmolLM2-135M')


def _models(cfg, vanilla) -> tuple[dict, dict, list[str]]:
  """(models, {bf16 name: fp32 name}, skipped workdirs with the reason). Every model is served in fp32 (an
  uptrained one may have trained in bf16 compute) unless it is a --bf16 copy."""
  b = _LOOPS.value
  models = {'vanilla': (Decoder(cfg), vanilla)}
  rec = RecursionConfig(loops=b, init='stepwise')
  models[f'recursive B={b}'] = (Decoder(cfg, rec), to_recursive(vanilla, cfg, rec))
  for r in _RANKS.value:
    rec = RecursionConfig(loops=b, init='average', lora_rank=int(r))
    models[f'relaxed B={b} r={r}'] = (Decoder(cfg, rec), to_recursive(vanilla, cfg, rec))
  skipped = []
  for workdir in _WORKDIRS.value:
    model, variables, step = load_training_checkpoint(workdir)
    rec = model.rec
    if rec.unique_layers:
      skipped.append(f'{workdir}: unique_layers={rec.unique_layers} (middle_cycle), which the engine cannot schedule')
      continue
    if model.cfg.vocab_size != cfg.vocab_size:
      skipped.append(f'{workdir}: vocabulary {model.cfg.vocab_size}, not the benchmark tokenizer\'s {cfg.vocab_size}')
      continue
    kind = f'relaxed B={rec.loops} r={rec.lora_rank}' if rec.lora_rank else f'recursive B={rec.loops}'
    models[f'{kind} uptrained {step} steps ({workdir})'] = (model, variables)
  models = {name: cast_for_serving(m, v, 'float32') for name, (m, v) in models.items()}
  pairs = {}
  if _BF16.value:
    for name in list(models):
      pairs[f'{name} [bf16]'] = name
      models[f'{name} [bf16]'] = cast_for_serving(*models[name], 'bfloat16')
  return models, pairs, skipped


def main(argv):
  del argv
  prefer_ynn_dots()  # Before the backend starts (rrt_jax.utils.xla_cpu).
  os.makedirs(_WORKDIR.value, exist_ok=True)
  machine = machine_description()
  command = shlex.join(['python', '-m', 'experiments.bench_serve'] + sys.argv[1:])
  print(f'# serving benchmark on {machine}\n# {command}', flush=True)
  cfg, vanilla, ids, heldout, what = _vanilla_and_text()
  requests = _requests(ids)
  windows = sliding_windows(heldout, min(512, cfg.max_seq_len))
  thresholds = [float(t) for t in _THRESHOLDS.value]
  models, pairs, skipped = _models(cfg, vanilla)
  for note in skipped:
    print(f'skipped {note}', flush=True)

  rows, latencies = sb.benchmark(models, requests, windows, thresholds, _SLOTS.value, _REPEATS.value,
                              _CONFIDENCE.value)
  selection = sb.select_thresholds(rows, _MIN_AGREEMENT.value, _MAX_PPL_INCREASE.value)
  precision = sb.precision_rows(rows, pairs)
  anchors = []
  if _ANCHORS.value:
    anchors = sb.anchor_rows(*models['vanilla'], requests, tuple(dict.fromkeys((1, _SLOTS.value))), _REPEATS.value,
                             tuple(int(t) for t in _HF_THREADS.value))
  nbytes = _BANDWIDTH_MB.value * 2**20
  bandwidth = {'single_thread': copy_bandwidth(nbytes), 'threads': copy_bandwidth(nbytes, threads=os.cpu_count()),
               'num_threads': os.cpu_count(), 'array_bytes': nbytes}
  bandwidth['used'] = max(bandwidth['single_thread'], bandwidth['threads'])
  context = max(len(r.prompt) + r.max_new_tokens for r in requests)
  bound = sb.bandwidth_rows(models, latencies, bandwidth['used'], context)

  recursive_name = f'recursive B={_LOOPS.value}'
  exit_trace = next(r['exit_loops'] for r in rows if r['model'] == recursive_name
                    and r['threshold'] == min(thresholds + [1.0]))
  sections = [f'Serving {what} on {machine}: {_REQUESTS.value} requests, prompt {_PROMPT_LEN.value}, decode '
              f'{_DECODE_LEN.value}, {_SLOTS.value} slots, median of {_REPEATS.value} interleaved runs after a '
              f'compile run.\n\nCommand: `{command}`',
              '## Throughput at matched quality (headline)\n\n' + sb.selection_markdown(selection),
              '## Every row\n\n' + sb.markdown(rows, latencies, _SLOTS.value)]
  if precision:
    sections.append('## bf16 against fp32 (parameters and KV cache in bfloat16)\n\n'
                    + sb.precision_markdown(precision))
  if anchors:
    sections.append('## Anchors: HF transformers and our vanilla engine, same weights, prompts and token count\n\n'
                    + sb.anchors_markdown(anchors))
  sections.append('## Memory-bandwidth bound of a batch-1 decode token (no exit)\n\n'
                  + sb.bandwidth_markdown(bound, bandwidth))
  if skipped:
    sections.append('Skipped workdirs: ' + '; '.join(skipped))
  table = '\n\n'.join(sections)
  print('\n' + table, flush=True)
  with open(os.path.join(_WORKDIR.value, 'results.json'), 'w') as f:
    json.dump({'machine': machine, 'command': command, 'model': what,
               'flags': {k: flags.FLAGS[k].value for k in _FLAG_NAMES}, 'rows': rows,
               'selection': {n: {k: v for k, v in s.items() if k != 'row'} for n, s in selection.items()},
               'bf16_vs_fp32': precision, 'anchors': anchors, 'bandwidth': bandwidth, 'bandwidth_bound': bound,
               'skipped': skipped, 'stage_latencies_s': latencies}, f, indent=2)
  with open(os.path.join(_WORKDIR.value, 'results.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(_WORKDIR.value, 'simulator_latencies.json'), 'w') as f:
    json.dump({'machine': machine, 'vanilla': sb.simulator_latencies(latencies['vanilla'], _SLOTS.value),
               'recursive': sb.simulator_latencies(latencies[recursive_name], _SLOTS.value),
               'recursive_model': recursive_name, 'exit_loops': exit_trace, 'loops': _LOOPS.value}, f, indent=2)
  sb.plot_throughput(rows, os.path.join(_WORKDIR.value, 'throughput_vs_quality.png'))
  print(f'wrote {_WORKDIR.value}/results.json, results.md, simulator_latencies.json, throughput_vs_quality.png')


if __name__ == '__main__':
  app.run(main)
