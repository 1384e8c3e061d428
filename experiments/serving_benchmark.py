"""The serving benchmark: the same requests through the engine for several models and exit thresholds.

Vanilla + continuous sequence-wise batching (CSB) against recursive/relaxed models under CSB without exit and
continuous depth-wise batching (CDB) at every threshold, interleaved and repeated (median). Quality at each
threshold: teacher-forced early-exit perplexity on held-out text, and agreement of the generated tokens with the
same model's no-exit output. `select_thresholds` then picks, per model, the fastest threshold that keeps quality
(the headline is measured there, against vanilla + CSB of the same run); `anchor_rows` times HF transformers
and our vanilla engine at batch 1 and N side by side, `bandwidth_rows` sets the batch-1 decode time beside the
memory-bandwidth bound. Also times the stages the simulator needs (rrt_jax.serve.simulator). A plain module (no
flags) so that experiments/bench_serve.py and experiments/main.py can both drive it.

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
  block = jax.jit(lambda v, h, c, o: block_model.apply(v, h, positions_Bx1, c, o,
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


def _baselines(models: dict) -> dict[str, str]:
  """Each model's vanilla reference: the first one-loop model of the same dtype (else any one-loop model, else the
  first model), so a bf16 model is compared with bf16 vanilla."""
  vanillas = [n for n, (m, _) in models.items() if m.rec.loops == 1] or [next(iter(models))]
  dtype = lambda name: models[name][0].cfg.param_dtype  # noqa: E731
  return {name: next((v for v in vanillas if dtype(v) == dtype(name)), vanillas[0]) for name in models}


def benchmark(models: dict, requests: list[Request], windows, thresholds: list[float], slots: int, repeats: int,
              confidence_kind: str = 'max_prob') -> tuple[list[dict], dict]:
  """Serves `requests` with every model: one-loop (vanilla) models under CSB; the others under CSB and CDB at
  every threshold. Interleaved repeats, medians. Returns (rows, stage latencies per model). Each row's speedup
  and perplexity ratio are against its vanilla reference (`_baselines`: same dtype)."""
  thresholds = sorted(set(thresholds) | {1.0}, reverse=True)  # The no-exit output is the agreement reference.
  names = list(models)
  baselines = _baselines(models)
  looped = {name: models[name][0].rec.loops > 1 for name in names}
  runs = []
  for name in names:  # CSB and CDB at every threshold: early exit alone vs early exit + mixing loops.
    runs += ([(name, depthwise, t) for t in thresholds for depthwise in (False, True)] if looped[name]
             else [(name, False, 1.0)])
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

  no_exit_tokens = {name: [c.tokens for c in results[name, looped[name], 1.0][0][0]] for name in names}
  quality = {}
  for name, (model, variables) in models.items():
    model_thresholds = thresholds if looped[name] else [1.0]
    quality[name] = {q['threshold']: q for q in early_exit_perplexity(model, variables, windows, model_thresholds,
                                                                      confidence_kind)}
  rows = []
  for (name, depthwise, t), reps in results.items():
    completions, stats = reps[0]
    exits = np.array(stats.exit_loop_counts, float)
    model = models[name][0]
    rows.append({
        'model': name, 'batching': 'CDB' if depthwise else 'CSB', 'threshold': t,
        'dtype': model.cfg.param_dtype, 'vanilla': baselines[name],
        'non_embedding_params': count_params(model.cfg, model.rec).non_embedding,
        'decode_tokens_per_s': statistics.median(s.decode_tokens_per_s for _, s in reps),
        'tokens_per_s': statistics.median(s.tokens_per_s for _, s in reps),
        'steps': stats.steps, 'utilisation': stats.utilisation,
        'exit_loops': [int(loop + 1) for loop, n in enumerate(stats.exit_loop_counts) for _ in range(n)],
        'mean_exit_loop': float((exits * np.arange(1, len(exits) + 1)).sum() / exits.sum()),
        'early_exit_perplexity': quality[name][t]['perplexity'],
        'no_exit_perplexity': quality[name][1.0]['perplexity'],
        'perplexity_vs_vanilla': quality[name][t]['perplexity'] / quality[baselines[name]][1.0]['perplexity'],
        'agreement': agreement([c.tokens for c in completions], no_exit_tokens[name]),
        'tokens': [c.tokens for c in completions],
    })
  base = {r['model']: r['decode_tokens_per_s'] for r in rows if r['threshold'] >= 1 and r['batching'] == 'CSB'}
  for row in rows:
    row['speedup_vs_vanilla_csb'] = row['decode_tokens_per_s'] / base[row['vanilla']]
  latencies = {name: {f'batch_{n}': stage_latencies(model, variables, n, max_len) for n in (1, slots)}
               for name, (model, variables) in models.items()}
  return rows, latencies


def select_thresholds(rows: list[dict], min_agreement: float = 0.9, max_ppl_increase: float = 0.05) -> dict:
  """The matched-quality rule, per model: among its rows (every batching and threshold) whose generated tokens
  agree with the same model's no-exit output on >= min_agreement of tokens AND whose teacher-forced early-exit
  perplexity is at most (1 + max_ppl_increase) x its no-exit perplexity, the fastest (decode tokens/s; ties go
  to the higher threshold). No-exit rows always qualify, so when no early-exit threshold does the choice is the
  fastest no-exit row and `early_exit_qualified` is False (it is True when some threshold < 1 qualifies, even if
  a no-exit row is faster). A pure function of the rows' 'model', 'batching',
  'threshold', 'agreement', 'early_exit_perplexity' and 'decode_tokens_per_s'; other keys are carried along."""
  out = {}
  for name in dict.fromkeys(r['model'] for r in rows):
    sel = [r for r in rows if r['model'] == name]
    no_exit = [r['early_exit_perplexity'] for r in sel if r['threshold'] >= 1]
    if not no_exit:
      raise ValueError(f'{name} has no no-exit (threshold >= 1) row: the quality rule needs its reference.')
    reference = no_exit[0]
    passing = [r for r in sel if r['threshold'] >= 1 or (
        r['agreement'] >= min_agreement and r['early_exit_perplexity'] <= reference * (1 + max_ppl_increase))]
    best = max(passing, key=lambda r: (r['decode_tokens_per_s'], r['threshold']))
    out[name] = {
        'row': best, 'threshold': best['threshold'], 'batching': best['batching'],
        'decode_tokens_per_s': best['decode_tokens_per_s'],
        'speedup_vs_vanilla_csb': best.get('speedup_vs_vanilla_csb'),
        'agreement': best['agreement'], 'early_exit_perplexity': best['early_exit_perplexity'],
        'no_exit_perplexity': reference, 'perplexity_vs_no_exit': best['early_exit_perplexity'] / reference,
        'perplexity_vs_vanilla': best.get('perplexity_vs_vanilla'),
        'early_exit_qualified': any(r['threshold'] < 1 for r in passing),
        'early_exit_tried': any(r['threshold'] < 1 for r in sel),  # False for one-loop (vanilla) models.
        'qualifying_thresholds': sorted({r['threshold'] for r in passing if r['threshold'] < 1}, reverse=True),
        'rule': {'min_agreement': min_agreement, 'max_ppl_increase': max_ppl_increase}}
  return out


def selection_markdown(selection: dict) -> str:
  """The headline table: each model at its matched-quality threshold, and a line for each model whose early exit
  never met the rule."""
  rule = next(iter(selection.values()))['rule']
  lines = [f'Matched quality: agreement with the same model\'s no-exit output >= {rule["min_agreement"]:.0%} (the '
           'share of each request\'s tokens that match it before the first divergence, mean over requests) and '
           f'early-exit perplexity within {rule["max_ppl_increase"]:.0%} of its no-exit perplexity; the fastest '
           'qualifying row per model. × and ppl / vanilla are against the vanilla model of the same dtype (vanilla + '
           'CSB, no exit) in the same run.', '',
           '| model | threshold | batching | decode tok/s | × vanilla+CSB | agreement | early-exit ppl | '
           'ppl / no-exit | ppl / vanilla | no-exit ppl | thresholds that qualify |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for name, s in selection.items():
    speedup = '—' if s['speedup_vs_vanilla_csb'] is None else f'×{s["speedup_vs_vanilla_csb"]:.2f}'
    qualifying = ', '.join(f'{t:g}' for t in s['qualifying_thresholds']) or ('none' if s['early_exit_tried'] else '—')
    vs_vanilla = '—' if s['perplexity_vs_vanilla'] is None else f'{s["perplexity_vs_vanilla"]:.3g}'
    lines.append(f'| {name} | {"no exit" if s["threshold"] >= 1 else s["threshold"]} | {s["batching"]} | '
                 f'{s["decode_tokens_per_s"]:.1f} | {speedup} | {s["agreement"]:.2f} | '
                 f'{s["early_exit_perplexity"]:,.2f} | {s["perplexity_vs_no_exit"]:.3f} | {vs_vanilla} | '
                 f'{s["no_exit_perplexity"]:,.2f} | {qualifying} |')
  missed = [n for n, s in selection.items() if s['early_exit_tried'] and not s['early_exit_qualified']]
  if missed:
    lines += ['', 'No early-exit threshold met the rule for: ' + '; '.join(missed) + ' (their headline is no exit, '
              'threshold 1.0).']
  return '\n'.join(lines)


def precision_rows(rows: list[dict], pairs: dict[str, str]) -> list[dict]:
  """bf16 against fp32 for each (low-precision model -> fp32 model) pair, at every (batching, threshold) both
  ran: speed ratio, perplexity change and how far the low-precision greedy tokens agree with fp32's."""
  by_key = {(r['model'], r['batching'], r['threshold']): r for r in rows}
  out = []
  for low, full in pairs.items():
    for (name, batching, t), r in by_key.items():
      ref = by_key.get((full, batching, t))
      if name != low or ref is None:
        continue
      out.append({'model': full, 'dtype': r['dtype'], 'batching': batching, 'threshold': t,
                  'fp32_decode_tokens_per_s': ref['decode_tokens_per_s'],
                  'low_decode_tokens_per_s': r['decode_tokens_per_s'],
                  'speed_ratio': r['decode_tokens_per_s'] / ref['decode_tokens_per_s'],
                  'fp32_perplexity': ref['early_exit_perplexity'], 'low_perplexity': r['early_exit_perplexity'],
                  'perplexity_change': r['early_exit_perplexity'] / ref['early_exit_perplexity'] - 1,
                  'agreement_with_fp32': agreement(r['tokens'], ref['tokens'])})
  return out


def precision_markdown(prec: list[dict]) -> str:
  lines = ['| model | batching | threshold | fp32 decode tok/s | bf16 decode tok/s | bf16 / fp32 | fp32 ppl | '
           'bf16 ppl | ppl change | bf16 tokens agree with fp32 |', '|---|---|---|---|---|---|---|---|---|---|']
  for p in prec:
    lines.append(f'| {p["model"]} | {p["batching"]} | {"no exit" if p["threshold"] >= 1 else p["threshold"]} | '
                 f'{p["fp32_decode_tokens_per_s"]:.1f} | {p["low_decode_tokens_per_s"]:.1f} | '
                 f'×{p["speed_ratio"]:.2f} | '
                 f'{p["fp32_perplexity"]:,.2f} | {p["low_perplexity"]:,.2f} | {p["perplexity_change"]:+.2%} | '
                 f'{p["agreement_with_fp32"]:.2f} |')
  return '\n'.join(lines)


def engine_pass(engine: Engine, requests: list[Request]) -> dict:
  completions, stats = engine.run(requests)
  return {'decode_tokens_per_s': stats.decode_tokens_per_s, 'tokens_per_s': stats.tokens_per_s,
          'tokens': [c.tokens for c in completions]}


def anchor_rows(model: Decoder, variables: dict, requests: list[Request], batches: tuple[int, ...], repeats: int,
                hf_threads: tuple[int, ...] | None = ()) -> list[dict]:
  """Our vanilla engine (CSB, no exit) at each batch size (medians of repeats after a compile run), then HF
  transformers generate on the same weights, prompts and token count, greedy (hf_anchor.hf_anchor_rows: its own
  process, at each torch thread count in `hf_threads`, () = torch's default, None = skip HF). The engine's decode
  tok/s = generated tokens / (wall - prefill); HF's = generated tokens / (pass - 1-token pass)."""
  from experiments.hf_anchor import hf_anchor_rows
  max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
  new_tokens = {r.max_new_tokens for r in requests}
  if len(new_tokens) != 1:
    raise ValueError('The HF anchor generates one token count for every request.')
  (n,) = new_tokens
  out = []
  for b in batches:
    engine = Engine(model, variables, EngineConfig(slots=b, max_len=max_len, depthwise=False))
    runs = [engine_pass(engine, requests) for _ in range(repeats + 1)][1:]  # Run 0 compiles.
    print(f'  anchor: ours batch {b}: {statistics.median(g["decode_tokens_per_s"] for g in runs):.1f} decode tok/s',
          flush=True)
    out.append({'system': 'ours (rrt_jax Engine, vanilla, CSB)', 'batch': b, 'threads': None,
                'decode_tokens_per_s': statistics.median(g['decode_tokens_per_s'] for g in runs),
                'tokens_per_s': statistics.median(g['tokens_per_s'] for g in runs), 'agreement_with_ours': 1.0,
                'tokens': runs[0]['tokens']})
  if hf_threads is not None:
    ours = {o['batch']: o['tokens'] for o in out}
    for h in hf_anchor_rows(model.cfg, variables, [r.prompt for r in requests], n, batches, hf_threads, repeats):
      out.append({'system': f'HF transformers generate (PyTorch CPU, fp32, {h["threads"]} threads)',
                  **{k: h[k] for k in ('batch', 'threads', 'decode_tokens_per_s', 'tokens_per_s', 'tokens')},
                  'agreement_with_ours': agreement(h['tokens'], ours[h['batch']])})
  return out


def anchors_markdown(anchors: list[dict]) -> str:
  lines = ['| system | batch | decode tok/s | tok/s incl. prefill | greedy tokens agree with ours |',
           '|---|---|---|---|---|']
  for a in sorted(anchors, key=lambda a: a['batch']):  # Stable: ours first within each batch size.
    lines.append(f'| {a["system"]} | {a["batch"]} | {a["decode_tokens_per_s"]:.1f} | {a["tokens_per_s"]:.1f} | '
                 f'{a["agreement_with_ours"]:.2f} |')
  return '\n'.join(lines)


def bandwidth_rows(models: dict, latencies: dict, bandwidth_bytes_per_s: float, context: int) -> list[dict]:
  """Per model, a batch-1 decode token without exit: the bytes it must read (hf_anchor.decode_bytes_per_token)
  over the measured copy bandwidth, beside the time our stages take for it (embedding + R x (block + head))."""
  from experiments.hf_anchor import decode_bytes_per_token
  out = []
  for name, (model, variables) in models.items():
    need = decode_bytes_per_token(model.cfg, model.rec, variables, context)
    lat = latencies[name]['batch_1']
    measured = lat['embedding_s'] + model.rec.loops * (lat['block_s'] + lat['head_s'])
    bound = need['total_bytes'] / bandwidth_bytes_per_s
    out.append({'model': name, **need, 'bound_s': bound, 'measured_s': measured,
                'measured_over_bound': measured / bound})
  return out


def bandwidth_markdown(rows: list[dict], bandwidth: dict) -> str:
  lines = [f'Copy bandwidth (numpy, read + write, median): {bandwidth["single_thread"] / 1e9:.1f} GB/s on one '
           f'thread, {bandwidth["threads"] / 1e9:.1f} GB/s on {bandwidth["num_threads"]}; the bound uses the higher, '
           f'{bandwidth["used"] / 1e9:.1f} GB/s.', '',
           '| model | params read (MB) | KV cache read (MB) | context | bound (ms/token) | ours at batch 1 (ms/token, '
           'stages) | ours / bound |', '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["model"]} | {r["param_bytes"] / 1e6:.1f} | {r["kv_cache_bytes"] / 1e6:.1f} | {r["context"]} | '
                 f'{r["bound_s"] * 1e3:.2f} | {r["measured_s"] * 1e3:.2f} | ×{r["measured_over_bound"]:.2f} |')
  return '\n'.join(lines)


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
