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
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.checkpoint import load_training_checkpoint
from rrt_jax.convert import to_recursive
from rrt_jax.convert.gguf import load_gguf, load_tokenizer
from rrt_jax.data import austen
from rrt_jax.eval.perplexity import early_exit_perplexity, sliding_windows
from rrt_jax.model import count_params, init_cache
from rrt_jax.serve.engine import Engine, EngineConfig, Request, multi_lora
from rrt_jax.serve.generate import ExitConfig, Generator
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


def _median_time(fn, repeats: int = 5) -> float:
  jax.block_until_ready(fn())  # Compile.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def stage_latencies(model: Decoder, variables: dict, batch: int, cache_len: int) -> dict:
  """Median seconds of the embedding, one pass of the (shared) block and the head for `batch` decode tokens."""
  cfg, rec = model.cfg, model.rec
  one_loop = Generator(model).one_loop
  tokens = jnp.zeros((batch, 1), jnp.int32)
  positions = jnp.full((batch, 1), cache_len - 1, jnp.int32)
  cache = init_cache(one_loop.cfg, one_loop.rec, batch, cache_len)
  step_vars = {'params': variables['params']}
  onehot = None
  if 'lora' in variables:
    step_vars['lora'] = multi_lora(variables['lora'])
    onehot = jax.nn.one_hot(jnp.arange(batch) % rec.loops, rec.loops)
  h = jnp.zeros((batch, 1, cfg.d_model), jnp.dtype(cfg.dtype))
  embed = jax.jit(lambda v, t: model.apply(v, t, method=Decoder.embed))
  block = jax.jit(lambda v, h, c, o: one_loop.apply(v, h, positions, c, None, o, method=Decoder.decode_stack)[0])
  head = jax.jit(lambda v, h: model.apply(v, h, method=Decoder.logits))
  return {'embedding_s': _median_time(lambda: embed(variables, tokens)),
          'block_s': _median_time(lambda: block(step_vars, h, cache, onehot)),
          'head_s': _median_time(lambda: head(variables, h))}


def simulator_latencies(measured: dict, max_batch: int) -> dict:
  """Our stage timings as rrt_jax.serve.simulator.StageLatencies fields: ms per token, as in Table K.1."""
  out = {'n_max': max_batch}
  for stage, key in (('emb', 'embedding_s'), ('stage', 'block_s'), ('head', 'head_s')):
    out[f'{stage}_1'] = measured['batch_1'][key] * 1e3
    out[f'{stage}_max'] = measured[f'batch_{max_batch}'][key] * 1e3 / max_batch
  return out


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
  """Mean fraction of each request's tokens that match the no-exit output before the first divergence."""
  fractions = []
  for got, ref in zip(tokens, reference, strict=True):
    same = 0
    while same < min(len(got), len(ref)) and got[same] == ref[same]:
      same += 1
    fractions.append(same / max(len(ref), 1))
  return float(np.mean(fractions))


def plot_throughput(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for model_name in dict.fromkeys(r['model'] for r in rows):
    sel = [r for r in rows if r['model'] == model_name]
    for ax, key, label in ((axes[0], 'early_exit_perplexity', 'early-exit perplexity (held-out)'),
                           (axes[1], 'agreement', 'agreement with no-exit output')):
      ax.plot([r[key] for r in sel], [r['decode_tokens_per_s'] for r in sel], 'o-', label=model_name)
      for r in sel:
        ax.annotate(f'{r["threshold"]:g}' if r['threshold'] < 1 else 'no exit', (r[key], r['decode_tokens_per_s']),
                    fontsize=7)
      ax.set_xlabel(label)
  axes[0].set_xscale('log')
  axes[0].set_ylabel('decode tokens/s')
  axes[0].legend(fontsize=7)
  fig.suptitle('Serving throughput vs quality (thresholds annotated)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def benchmark(models: dict, requests: list[Request], windows, thresholds: list[float], slots: int, repeats: int,
              confidence_kind: str = 'max_prob') -> tuple[list[dict], dict]:
  """Serves `requests` with every model: the first (vanilla) under CSB; the others under CSB without exit and
  CDB at every threshold. Interleaved repeats, medians. Returns (rows, stage latencies per model)."""
  thresholds = sorted(set(thresholds) | {1.0}, reverse=True)  # The no-exit output is the agreement reference.
  names = list(models)
  runs = [(names[0], False, 1.0)]
  for name in names[1:]:
    runs.append((name, False, 1.0))
    runs += [(name, True, t) for t in thresholds]
  max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
  engines = {}
  for name, depthwise, t in runs:
    model, variables = models[name]
    exit_cfg = ExitConfig(threshold=t, confidence=confidence_kind)
    engines[name, depthwise, t] = Engine(model, variables, EngineConfig(slots=slots, max_len=max_len,
                                                                        depthwise=depthwise, exit=exit_cfg))
  results = {key: [] for key in engines}
  for repeat in range(repeats + 1):  # Repeat 0 compiles and is discarded.
    for key, engine in engines.items():
      completions, stats = engine.run(requests)
      print(f'  repeat {repeat} {key[0]} {"CDB" if key[1] else "CSB"} thr={key[2]}: '
            f'{stats.decode_tokens_per_s:.1f} decode tok/s ({stats.tokens_per_s:.1f} with prefill), '
            f'{stats.steps} steps, utilisation {stats.utilisation:.2f}', flush=True)
      if repeat:
        results[key].append((completions, stats))

  no_exit_tokens = {name: [c.tokens for c in results[name, name != names[0], 1.0][0][0]] for name in names}
  quality = {}
  for name, (model, variables) in models.items():
    model_thresholds = thresholds if name != names[0] else [1.0]
    quality[name] = {q['threshold']: q for q in early_exit_perplexity(model, variables, windows, model_thresholds,
                                                                      confidence_kind)}
  rows = []
  for (name, depthwise, t), reps in results.items():
    completions, stats = reps[0]
    exits = np.array(stats.exit_loop_counts, float)
    model = models[name][0]
    rows.append({
        'model': name, 'batching': 'CDB' if depthwise else 'CSB', 'threshold': t,
        'non_embedding_params': count_params(model.cfg, model.rec).non_embedding,
        'decode_tokens_per_s': statistics.median(s.decode_tokens_per_s for _, s in reps),
        'tokens_per_s': statistics.median(s.tokens_per_s for _, s in reps),
        'steps': stats.steps, 'utilisation': stats.utilisation,
        'exit_loops': [int(loop + 1) for loop, n in enumerate(stats.exit_loop_counts) for _ in range(n)],
        'mean_exit_loop': float((exits * np.arange(1, len(exits) + 1)).sum() / exits.sum()),
        'early_exit_perplexity': quality[name][t]['perplexity'],
        'agreement': _agreement([c.tokens for c in completions], no_exit_tokens[name]),
    })
  base = rows[0]['decode_tokens_per_s']
  for row in rows:
    row['speedup_vs_vanilla_csb'] = row['decode_tokens_per_s'] / base
  latencies = {name: {f'batch_{n}': stage_latencies(model, variables, n, max_len) for n in (1, slots)}
               for name, (model, variables) in models.items()}
  return rows, latencies


def markdown(rows: list[dict], latencies: dict, slots: int) -> str:
  lines = ['| model | batching | threshold | decode tok/s | × vanilla+CSB | tok/s incl. prefill | mean exit loop | '
           'utilisation | early-exit ppl | agreement |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["model"]} | {r["batching"]} | {"no exit" if r["threshold"] >= 1 else r["threshold"]} | '
                 f'{r["decode_tokens_per_s"]:.1f} | ×{r["speedup_vs_vanilla_csb"]:.2f} | {r["tokens_per_s"]:.1f} | '
                 f'{r["mean_exit_loop"]:.2f} | {r["utilisation"]:.2f} | {r["early_exit_perplexity"]:.2f} | '
                 f'{r["agreement"]:.2f} |')
  lines += ['', f'| model | stage | batch 1 (ms) | batch {slots} (ms) |', '|---|---|---|---|']
  for name, lat in latencies.items():
    for stage in ('embedding_s', 'block_s', 'head_s'):
      lines.append(f'| {name} | {stage[:-2]} | {lat["batch_1"][stage] * 1e3:.2f} | '
                   f'{lat[f"batch_{slots}"][stage] * 1e3:.2f} |')
  return '\n'.join(lines)


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
