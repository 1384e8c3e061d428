"""The serving benchmark: the same requests through the engine for several models and exit thresholds.

Vanilla + continuous sequence-wise batching (CSB) against recursive/relaxed models under CSB without exit and
continuous depth-wise batching (CDB) at every threshold, interleaved and repeated (median). Quality at each
threshold: teacher-forced early-exit perplexity on held-out text, and agreement of the generated tokens with the
same model's no-exit output. Also times the stages the simulator needs (rrt_jax.serve.simulator). A plain module
(no flags) so that experiments/bench_serve.py and experiments/main.py can both drive it.

Shapes: B batch (decode rows), D width, R loops, T cache length.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

from rrt_jax.eval.perplexity import early_exit_perplexity
from rrt_jax.model import Decoder, count_params, init_cache, multi_lora_variables, one_loop
from rrt_jax.serve.engine import Engine, EngineConfig, Request
from rrt_jax.serve.generate import ExitConfig
from rrt_jax.utils.timing import median_seconds


def stage_latencies(model: Decoder, variables: dict, batch: int, cache_len: int) -> dict:
  """Median seconds of the embedding, one pass of the (shared) block and the head for `batch` decode tokens."""
  cfg, rec = model.cfg, model.rec
  block_model = one_loop(model)
  tokens_Bx1 = jnp.zeros((batch, 1), jnp.int32)
  positions_Bx1 = jnp.full((batch, 1), cache_len - 1, jnp.int32)
  cache = init_cache(block_model.cfg, block_model.rec, batch, cache_len)  # T = cache_len.
  block_vars = multi_lora_variables(variables)  # Every loop's LoRA: rows at different loops share one pass.
  onehot_BxR = jax.nn.one_hot(jnp.arange(batch) % rec.loops, rec.loops) if 'lora' in block_vars else None
  h_Bx1xD = jnp.zeros((batch, 1, cfg.d_model), jnp.dtype(cfg.dtype))
  embed = jax.jit(lambda v, t: model.apply(v, t, method=Decoder.embed))
  block = jax.jit(lambda v, h, c, o: block_model.apply(v, h, positions_Bx1, c, None, o,
                                                       method=Decoder.decode_stack)[0])
  head = jax.jit(lambda v, h: model.apply(v, h, method=Decoder.logits))
  return {'embedding_s': median_seconds(embed, variables, tokens_Bx1),
          'block_s': median_seconds(block, block_vars, h_Bx1xD, cache, onehot_BxR),
          'head_s': median_seconds(head, variables, h_Bx1xD)}


def simulator_latencies(measured: dict, max_batch: int) -> dict:
  """Our stage timings as rrt_jax.serve.simulator.StageLatencies fields: ms per token, as in the paper's
  Table K.1."""
  out = {'n_max': max_batch}
  for stage, key in (('emb', 'embedding_s'), ('stage', 'block_s'), ('head', 'head_s')):
    out[f'{stage}_1'] = measured['batch_1'][key] * 1e3
    out[f'{stage}_max'] = measured[f'batch_{max_batch}'][key] * 1e3 / max_batch
  return out


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
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
  """Serves `requests` with every model: the first (vanilla) under CSB; the others under CSB and CDB at every
  threshold. Interleaved repeats, medians. Returns (rows, stage latencies per model)."""
  thresholds = sorted(set(thresholds) | {1.0}, reverse=True)  # The no-exit output is the agreement reference.
  names = list(models)
  runs = [(names[0], False, 1.0)]
  for name in names[1:]:  # CSB and CDB at every threshold: early exit alone vs early exit + mixing loops.
    runs += [(name, depthwise, t) for t in thresholds for depthwise in (False, True)]
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
        'agreement': agreement([c.tokens for c in completions], no_exit_tokens[name]),
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
