r"""The paper's study reproduced end to end on a model we pretrain ourselves: pretrain a small vanilla Llama from
scratch on the byte-level training split, convert it to recursive and relaxed models, uptrain every variant with
the same token budget over several data-order seeds, and judge the paper's claims in units of the seeds' spread.

  python -m experiments.repro_study --workdir=workdir/repro_study          # the study (~1.8 h, 2 idle cores)
  python -m experiments.repro_study --tiny --workdir=/tmp/repro_tiny       # the plumbing (< 1 min)

Stages (each writes its result into --workdir and is skipped, with a '[skip]' line, when that result exists; a
result made with other flags than this run's is an error, not silently reused; the JSON is written last):
  1. pretrain/             rrt_jax.train.loop.train on a 'random' --preset (loops=1, CE only, the byte tokenizer),
                           so Orbax checkpoints and resume come from the trainer; then pretrain/pretrained.msgpack
                           (the final variables) and pretrain/loss_curve.json + pretrain_loss.png.
  2. converted/<v>.*       every variant's initial variables (.msgpack) and sizes (.json): recursive (no LoRA) at
                           each B in --loops x --inits; relaxed (B = --relaxed_loops, Average) at --ranks x
                           --lora_inits ('svd', 'whitened_svd' calibrated on --calibration_tokens of training text
                           by rrt_jax.convert.calibration.convert, 'zero'), plus --relaxed_other_inits with SVD at
                           --init_rank; per B a reduced-size model (the L/B stepwise-chosen layers run once) and a
                           model of the same shape from random init ('scratch'); the --no_early_exit_of variant again
                           (sharing its conversion), to be uptrained with early_exit='none'.
  3. uptrained/<v>/seed<s>.* every non-vanilla variant x --seeds: --uptrain_steps of --batch x --seq_len tokens (the
                           same batches for every variant of a seed; the seed orders the data), CE + forward KL from
                           the pretrained model, aggressive early-exit weights (rrt_jax.train.loop.uptrain_on_batches;
                           the ablation: the same recipe with early_exit='none', see `uptrain`). Scratch models get the
                           same recipe and tokens: the only difference is the init. Variables (.msgpack) + losses.
  4. eval/<v>/<stage>.json  per-loop perplexity and bits per byte (log2 ppl: each byte is one token; the few
                           document-end tokens count too) on the first --eval_tokens of each of --corpora, in windows
                           of --seq_len (rrt_jax.eval.perplexity), for the converted and every uptrained model.
Then (always, from the stage files): results.json, results.md (mean ± std over seeds, the claims), and the plots
per_loop_bpb.png (per-loop bars with error bars), uptraining_curves.png, pretrain_loss.png.

The claims (Bae et al., ICLR 2025) are judged on the last loop's bits per byte after uptraining, on each corpus,
by `judge`: held when the claimed-better side's mean is lower ("keeps the last loop's quality": no more than one
pooled std worse), with the difference in units of the pooled std over seeds.

Time estimate of the defaults (2 idle x86 cores, jax 0.10 CPU, float32), from step times measured on this
project's 2-core machine on 2026-12-02 in a quiet moment (load average 1.5 including the measurement; at load 5
the same steps take 1.3-2x longer): each jitted step timed over 3 steps after compiling, wall seconds:
  pretrain   1000 steps x 8 x 256 tokens (2.05 M tokens), repro_7m, 1.60 s / step           27 min
  uptrain    19 variants x 3 seeds x 40 steps x 8 x 256 tokens (82 k tokens, 4 % of pretraining);
             per step (KD teacher forward included): recursive 2.15 s, relaxed r=32 2.46 s (r=8 ~2.25),
             reduced / scratch 0.74 s (4 layers; ~0.95 s for 6): 37.2 s per step of all 19, x 120       74 min
  eval       77 models (19 converted, 57 uptrained, the teacher) x 2 corpora x 8,192 tokens, 1.1 s
             per corpus once compiled, plus ~1 s tracing per model                                    4 min
  overhead   ~8 distinct compiles of 4-8 s (the persistent compilation cache in <workdir>/jax_cache serves
             every other variant and seed of the same shapes), ~1.5 s tracing per uptraining run,
             conversions 1-3 s each (whitened SVD with its calibration 6 s), data, plots                 ~4 min
  total ~1.8 h. Wall time is linear in --pretrain_steps and --uptrain_steps (the knobs). Under load the step
  times inflate, and so does numpy's SVD in the conversions (OpenBLAS threads spin): 30-150 s per relaxed
  conversion were seen at load 5. pretrain/loss_curve.json records the run's median step time (also printed by
  --pretrain_only) and every stage's JSON its seconds, to size a run on another machine.
A 2-minute check of pretraining (30 steps, warmup 5, at load 5): training loss 5.91 -> ~3.0 nats per byte (the
unigram level) in 30 steps, median 4.05 s per step wall (under that load).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import numpy as np
from absl import app, flags


def define_flags() -> None:
  """The study's flags (defined by the script only: importing this module defines none)."""
  f = flags
  f.DEFINE_string('workdir', 'workdir/repro_study', 'Where every stage, table and plot goes.')
  f.DEFINE_bool('tiny', False, 'The tiny model, a few steps per stage, few variants, 2 seeds (< 1 min); flags '
                'given explicitly still win.')
  f.DEFINE_string('preset', 'repro_7m', 'Architecture of the pretrained model (rrt_jax.presets).')
  f.DEFINE_integer('pretrain_steps', 1000, 'Pretraining steps.')
  f.DEFINE_integer('pretrain_batch', 8, 'Sequences per pretraining step.')
  f.DEFINE_float('pretrain_lr', 2e-3, 'Peak pretraining learning rate.')
  f.DEFINE_integer('pretrain_warmup', 50, 'Pretraining warmup steps.')
  f.DEFINE_bool('pretrain_only', False, 'Stop after the pretraining stage (e.g. to time it).')
  f.DEFINE_integer('seq_len', 256, 'Sequence length of pretraining, uptraining and eval windows.')
  f.DEFINE_integer('uptrain_steps', 40, 'Uptraining steps per variant and seed.')
  f.DEFINE_integer('batch', 8, 'Sequences per uptraining step.')
  f.DEFINE_float('uptrain_lr', 5e-4, 'Peak uptraining learning rate.')
  f.DEFINE_integer('eval_tokens', 8192, 'Held-out tokens (bytes) scored per corpus.')
  f.DEFINE_integer('eval_batch', 8, 'Windows per perplexity batch.')
  f.DEFINE_bool('eval_converted', True, 'Also score every variant straight after conversion.')
  f.DEFINE_list('corpora', ['validation', 'austen'], 'Held-out corpora (TFDS splits).')
  f.DEFINE_integer('calibration_tokens', 16_384, 'Calibration tokens (training split) of whitened SVD.')
  f.DEFINE_list('loops', ['2', '3'], 'B of the recursive models and the baselines.')
  f.DEFINE_list('inits', ['stepwise', 'average', 'lower'], 'Looping inits of the recursive models.')
  f.DEFINE_integer('relaxed_loops', 3, 'B of the relaxed models.')
  f.DEFINE_list('ranks', ['8', '32'], 'LoRA ranks of the relaxed (Average) models.')
  f.DEFINE_list('lora_inits', ['svd', 'whitened_svd', 'zero'], 'LoRA inits of the relaxed models.')
  f.DEFINE_list('relaxed_other_inits', ['stepwise', 'lower'], 'Looping inits also relaxed with SVD LoRA at '
                '--init_rank (for "Average + SVD is the best init with LoRA").')
  f.DEFINE_integer('init_rank', 0, 'Rank of the --relaxed_other_inits variants (0: the first of --ranks).')
  f.DEFINE_list('baselines', ['reduced', 'scratch'], 'Same-size baselines per B.')
  f.DEFINE_string('no_early_exit_of', 'auto', "Variant also uptrained with early_exit='none' ('auto': the relaxed "
                  'Average+SVD model at the first rank; "" = none).')
  f.DEFINE_list('seeds', ['0', '1', '2'], 'Data-order seeds of uptraining.')
  f.DEFINE_list('only', [], 'Run only the variants whose name contains one of these strings.')


TINY = dict(preset='tiny_llama', pretrain_steps=8, pretrain_batch=8, pretrain_lr=3e-3, pretrain_warmup=2,
            seq_len=64, uptrain_steps=2, batch=4, eval_tokens=256, eval_batch=4, eval_converted=False,
            calibration_tokens=512,
            loops=['2'], inits=['stepwise', 'average'], relaxed_loops=2, ranks=['2'],
            lora_inits=['svd', 'whitened_svd'], relaxed_other_inits=[], init_rank=0,
            baselines=['reduced', 'scratch'], no_early_exit_of='auto', seeds=['0', '1'])
DATA_SEED_OFFSET = 1000  # Uptraining data order `seed` is pipeline seed 1000 + seed (pretraining used 0).


@dataclasses.dataclass(frozen=True)
class Settings:
  """The resolved flags (--tiny's values for flags not given explicitly)."""

  workdir: str
  tiny: bool
  preset: str
  pretrain_steps: int
  pretrain_batch: int
  pretrain_lr: float
  pretrain_warmup: int
  seq_len: int
  uptrain_steps: int
  batch: int
  uptrain_lr: float
  eval_tokens: int
  eval_batch: int
  eval_converted: bool
  corpora: tuple[str, ...]
  calibration_tokens: int
  loops: tuple[int, ...]
  inits: tuple[str, ...]
  relaxed_loops: int
  ranks: tuple[int, ...]
  lora_inits: tuple[str, ...]
  relaxed_other_inits: tuple[str, ...]
  init_rank: int
  baselines: tuple[str, ...]
  no_early_exit_of: str
  seeds: tuple[int, ...]
  only: tuple[str, ...]


def settings() -> Settings:
  def value(name):
    if flags.FLAGS.tiny and name in TINY and not flags.FLAGS[name].present:
      return TINY[name]
    return flags.FLAGS[name].value

  ints = lambda name: tuple(int(x) for x in value(name))  # noqa: E731
  s = Settings(**{f.name: value(f.name) for f in dataclasses.fields(Settings)})
  return dataclasses.replace(s, corpora=tuple(s.corpora), loops=ints('loops'), inits=tuple(s.inits),
                             ranks=ints('ranks'), lora_inits=tuple(s.lora_inits),
                             relaxed_other_inits=tuple(s.relaxed_other_inits), baselines=tuple(s.baselines),
                             seeds=ints('seeds'), only=tuple(s.only),
                             init_rank=s.init_rank or ints('ranks')[0])


# ---------------------------------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
  """One model of the study. group: recursive | relaxed | reduced | scratch | no_early_exit; loops: its B (the
  reduced-size and scratch models: the B whose shared size they match, run once)."""

  name: str
  group: str
  loops: int
  init: str = 'stepwise'
  lora_init: str = ''
  rank: int = 0
  early_exit: str = 'aggressive'

  @property
  def slug(self) -> str:
    keep = (c if c.isalnum() or c in '.=' else '_' for c in self.name.replace('+', '_'))
    return ''.join(keep).replace('__', '_').strip('_')

  @property
  def one_loop(self) -> bool:
    return self.group in ('reduced', 'scratch')

  @property
  def conversion(self) -> dict:
    """What the initial variables depend on (the no-early-exit ablation shares its base variant's)."""
    kind = self.group if self.one_loop else 'recursive'
    return {'kind': kind, 'loops': self.loops, 'init': self.init, 'lora_init': self.lora_init, 'rank': self.rank}

  @property
  def conversion_slug(self) -> str:
    return dataclasses.replace(self, name=self.name.removesuffix(NO_EARLY_EXIT)).slug


NO_EARLY_EXIT = ', no early-exit loss'  # The name suffix of the ablation uptrained with early_exit='none'.


def relaxed_name(b: int, init: str, lora_init: str, rank: int) -> str:
  return f'relaxed B={b} {init}+{lora_init} r={rank}'


def variants(s: Settings, num_layers: int) -> list[Variant]:
  """Every model of the study but the pretrained one, in table order."""
  bad = sorted({b for b in (*s.loops, s.relaxed_loops) if b < 2 or num_layers % b})
  if bad:
    raise ValueError(f'--loops / --relaxed_loops {bad}: B must be >= 2 and divide the {num_layers} layers of '
                     f'--preset={s.preset}.')
  out = []
  for b in s.loops:
    out += [Variant(f'recursive B={b} {init}', 'recursive', b, init) for init in s.inits]
  b = s.relaxed_loops
  for rank in s.ranks:
    out += [Variant(relaxed_name(b, 'average', li, rank), 'relaxed', b, 'average', li, rank) for li in s.lora_inits]
  others = [i for i in s.relaxed_other_inits if i != 'average']
  if others and s.init_rank not in s.ranks:  # (Average + SVD at that rank too: the claim compares with it.)
    others = ['average', *others]
  out += [Variant(relaxed_name(b, init, 'svd', s.init_rank), 'relaxed', b, init, 'svd', s.init_rank)
          for init in others]
  for b in s.loops:
    k = num_layers // b
    if 'reduced' in s.baselines:
      out.append(Variant(f'reduced B={b} ({k} layers, stepwise)', 'reduced', b))
    if 'scratch' in s.baselines:
      out.append(Variant(f'scratch B={b} ({k} layers, random init)', 'scratch', b))
  of = relaxed_name(s.relaxed_loops, 'average', 'svd', s.ranks[0]) if s.no_early_exit_of == 'auto' else \
      s.no_early_exit_of
  base = next((v for v in out if v.name == of), None)
  if of and base is None:
    raise ValueError(f'--no_early_exit_of={of!r} names no variant of the study: choose one of '
                     f'{[v.name for v in out]}.')
  if base is not None:
    out.append(dataclasses.replace(base, name=base.name + NO_EARLY_EXIT, group='no_early_exit',
                                   early_exit='none'))
  if s.only:
    out = [v for v in out if any(key in v.name for key in s.only)]
  return out


# ---------------------------------------------------------------------------------------------- stage results


def _normal(x):
  """JSON-normal form (tuples -> lists, ...), so recorded and current inputs compare equal."""
  return json.loads(json.dumps(x))


def _write_json(path: str, data: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def save_variables(path: str, variables: dict) -> None:
  from flax import serialization
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
  os.replace(tmp, path)


def load_variables(path: str) -> dict:
  from flax import serialization
  with open(path, 'rb') as f:
    return serialization.msgpack_restore(f.read())


class Stages:
  """Runs a stage unless its JSON result exists (then checks it was made with the same inputs)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.ran, self.skipped = 0, 0

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def run(self, label: str, path: str, inputs: dict, fn) -> dict:
    inputs = _normal(inputs)
    if os.path.exists(path):
      result = _read_json(path)
      if result.get('inputs') != inputs:
        recorded = result.get('inputs', {})
        diff = {k: (recorded.get(k), inputs.get(k)) for k in sorted({*recorded, *inputs})
                if recorded.get(k) != inputs.get(k)}
        raise ValueError(f'{path} was made with other settings than this run (recorded, now): {diff}. Use another '
                         '--workdir, or delete the stale results to recompute them.')
      self.skipped += 1
      print(f'[skip] {label}: have {os.path.relpath(path, self.workdir)}', flush=True)
      return result
    print(f'[run] {label}', flush=True)
    t0 = time.perf_counter()
    result = fn()
    result = _normal({**result, 'inputs': inputs, 'seconds': time.perf_counter() - t0})
    _write_json(path, result)
    self.ran += 1
    print(f'[done] {label} ({result["seconds"]:.1f} s)', flush=True)
    return result


# ---------------------------------------------------------------------------------------------- claim judging


def _finite(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def judge(claim: str, better, worse, non_inferiority_std: float | None = None, **context) -> dict:
  """A claim 'A is better than B' on per-seed values of a lower-is-better metric: `better` = A's, `worse` = B's.

  difference = mean(B) - mean(A) (> 0: the claim's direction); std = the pooled sample std over seeds,
  sqrt((var(A) + var(B)) / 2) with ddof=1; z = difference / std. held: difference > 0; with
  non_inferiority_std=k ("A is no worse than B"): difference >= -k * std (difference >= 0 when std is undefined).
  std and z are None where undefined (one seed; z also where std is 0)."""
  a, b = np.asarray(better, np.float64), np.asarray(worse, np.float64)
  if a.size == 0 or b.size == 0:
    raise ValueError(f'{claim}: both sides need at least one value.')
  diff = float(b.mean() - a.mean())
  std = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if a.size > 1 and b.size > 1 else math.nan
  z = diff / std if std > 0 else math.nan
  if non_inferiority_std is None:
    held = diff > 0
  else:
    held = diff >= (-non_inferiority_std * std if math.isfinite(std) else 0.0)
  return {'claim': claim, **context, 'held': bool(held), 'verdict': 'held' if held else 'not held',
          'better_mean': float(a.mean()), 'worse_mean': float(b.mean()), 'difference': diff, 'std': _finite(std),
          'z': _finite(z), 'n': [int(a.size), int(b.size)], 'non_inferiority_std': non_inferiority_std}


def judge_best(claim: str, candidate: str, values: dict[str, list[float]], **context) -> dict:
  """'candidate is the best of values': judged against the runner-up (the lowest mean of the others)."""
  others = {k: v for k, v in values.items() if k != candidate}
  runner_up = min(others, key=lambda k: float(np.mean(others[k])))
  return judge(claim, values[candidate], others[runner_up], better_name=candidate, worse_name=runner_up,
               **context)


def format_claim(c: dict) -> str:
  units = '' if c['z'] is None else f' = {c["z"]:+.1f} std'
  rule = f', held if within {c["non_inferiority_std"]:g} std' if c['non_inferiority_std'] is not None else ''
  return (f'- {c["claim"]} [{c["corpus"]}]: **{c["verdict"].upper()}** ({c["better_name"]} {c["better_mean"]:.4f} '
          f'vs {c["worse_name"]} {c["worse_mean"]:.4f} bpb; difference {c["difference"]:+.4f}{units}{rule})')


def paper_claims(per_seed, s: Settings, corpora: tuple[str, ...]) -> list[dict]:
  """Every paper claim whose variants are in the study. per_seed(name, corpus, loop) -> per-seed bpb or None."""
  out = []

  def add(fn, corpus, *args, **kwargs):
    out.append(fn(*args, corpus=corpus, **kwargs))

  for corpus in corpora:
    last = lambda name: per_seed(name, corpus, -1)  # noqa: E731,B023
    for b in s.loops:
      inits = {f'recursive B={b} {i}': last(f'recursive B={b} {i}') for i in s.inits}
      inits = {k: v for k, v in inits.items() if v}
      if f'recursive B={b} stepwise' in inits and len(inits) > 1:
        add(judge_best, corpus, f'Stepwise is the best looping init without LoRA (B={b})',
            f'recursive B={b} stepwise', inits)
    rb, r0 = s.relaxed_loops, s.init_rank
    with_lora = {relaxed_name(rb, i, 'svd', r0): last(relaxed_name(rb, i, 'svd', r0))
                 for i in ('average', *s.relaxed_other_inits)}
    with_lora = {k: v for k, v in with_lora.items() if v}
    if relaxed_name(rb, 'average', 'svd', r0) in with_lora and len(with_lora) > 1:
      add(judge_best, corpus, f'Average + SVD is the best looping init with LoRA (B={rb}, r={r0})',
          relaxed_name(rb, 'average', 'svd', r0), with_lora)
    for rank in s.ranks:
      svd, zero = relaxed_name(rb, 'average', 'svd', rank), relaxed_name(rb, 'average', 'zero', rank)
      if last(svd) and last(zero):
        add(judge, corpus, f'SVD LoRA init beats zero init (B={rb}, r={rank})', last(svd), last(zero),
            better_name=svd, worse_name=zero)
      plain = f'recursive B={rb} average'
      if last(svd) and last(plain):
        add(judge, corpus, f'Relaxation (Average + SVD, r={rank}) improves on the plain Average recursive model',
            last(svd), last(plain), better_name=svd, worse_name=plain)
    ranks = sorted(s.ranks)
    for lora_init in s.lora_inits:
      for lo, hi in zip(ranks, ranks[1:], strict=False):
        lo_name, hi_name = relaxed_name(rb, 'average', lora_init, lo), relaxed_name(rb, 'average', lora_init, hi)
        if last(lo_name) and last(hi_name):
          add(judge, corpus, f'A higher rank is better: rank trades parameters for quality ({lora_init}, r={lo} '
              f'-> {hi})', last(hi_name), last(lo_name), better_name=hi_name, worse_name=lo_name)
    for b in s.loops:
      rec = f'recursive B={b} stepwise'
      for group, what in (('reduced', 'the reduced-size model'), ('scratch', 'the same-size model from scratch')):
        base = next((n for n in per_seed.names if n.startswith(f'{group} B={b} ')), None)
        if base and last(rec) and last(base):
          add(judge, corpus, f'Recursive (Stepwise, B={b}) beats {what} at equal parameters', last(rec),
              last(base), better_name=rec, worse_name=base)
    for name in per_seed.names:
      if not name.endswith(NO_EARLY_EXIT):
        continue
      agg = name.removesuffix(NO_EARLY_EXIT)
      if per_seed(agg, corpus, 0) and per_seed(name, corpus, 0):
        add(judge, corpus, 'The aggressive early-exit loss makes loop 1 usable (loop-1 bpb)', per_seed(agg, corpus, 0),
            per_seed(name, corpus, 0), better_name=agg, worse_name=name)
        add(judge, corpus, "The aggressive early-exit loss keeps the last loop's quality (last-loop bpb)",
            last(agg), last(name), non_inferiority_std=1.0, better_name=agg, worse_name=name)
  return out


# ---------------------------------------------------------------------------------------------------- the study


def pretrain_config(s: Settings):
  from experiments.configs.base import base_config
  c = base_config()
  c.model.source = 'random'
  c.model.preset = s.preset
  c.data.tokenizer = 'bytes'
  c.data.split = 'train'
  c.data.seq_len = s.seq_len
  c.data.global_batch = s.pretrain_batch
  c.recursion.loops = 1
  c.recursion.init = 'stepwise'
  c.recursion.lora_rank = None
  c.loss.kd_weight = 0.0
  c.loss.early_exit = 'none'
  c.train.steps = s.pretrain_steps
  c.train.lr = s.pretrain_lr
  c.train.warmup_steps = s.pretrain_warmup
  c.checkpoint.every_steps = max(50, s.pretrain_steps // 10)  # (And at the end.)
  c.checkpoint.keep = 2
  c.log_every = max(1, min(10, s.pretrain_steps // 20))
  return c


def pretrain(s: Settings, directory: str) -> dict:
  """Stage 1 (resumes from the trainer's checkpoints when interrupted)."""
  from rrt_jax.train.checkpointing import load_training_checkpoint
  from rrt_jax.train.loop import train
  t0 = time.perf_counter()
  train(pretrain_config(s), directory)
  train_s = time.perf_counter() - t0
  _, variables, step = load_training_checkpoint(directory)
  save_variables(os.path.join(directory, 'pretrained.msgpack'), variables)
  rows = []
  with open(os.path.join(directory, 'metrics.jsonl')) as f:
    for line in f:
      rows.append(json.loads(line))
  tokens_per_step = s.pretrain_batch * s.seq_len
  timed = [r['tokens_per_s'] for r in rows if r.get('tokens_per_s')]
  return {'step': step, 'train_seconds_this_run': train_s, 'tokens_per_step': tokens_per_step,
          'curve': {'step': [r['step'] for r in rows], 'loss': [r['loss'] for r in rows],
                    'lr': [r.get('lr') for r in rows]},
          'median_step_seconds': tokens_per_step / float(np.median(timed)) if timed else None}


def param_counts(cfg, v: Variant) -> dict:
  from rrt_jax.model import count_params
  count = count_params(model_config(cfg, v), recursion(v))
  return {'non_embedding_params': count.non_embedding, 'lora_params': count.lora, 'embedding_params':
          count.embedding}


def model_config(cfg, v: Variant):
  return cfg.replace(num_layers=cfg.num_layers // v.loops) if v.one_loop else cfg


def recursion(v: Variant):
  from rrt_jax import RecursionConfig
  if v.one_loop:
    return RecursionConfig()
  return RecursionConfig(loops=v.loops, init=v.init, lora_rank=v.rank or None, lora_init=v.lora_init or 'svd')


def convert_variant(v: Variant, cfg, vanilla: dict, calibration) -> dict:
  """The variant's initial variables: a library conversion, or a random init for the scratch models."""
  from rrt_jax import RecursionConfig
  from rrt_jax.convert import to_recursive
  from rrt_jax.convert.calibration import convert
  from rrt_jax.model import init_variables
  if v.group == 'scratch':
    return init_variables(model_config(cfg, v), RecursionConfig(), jax.random.key(0))
  if v.group == 'reduced':  # The stepwise-chosen L/B layers: the Stepwise recursive model's shared layers, run once.
    return to_recursive(vanilla, cfg, RecursionConfig(loops=v.loops, init='stepwise'))
  rec = recursion(v)
  if rec.has_lora and v.lora_init == 'whitened_svd':
    batches, config, cache = calibration()
    return convert(vanilla, cfg, rec, batches, config, cache_dir=cache, progress=False)
  return convert(vanilla, cfg, rec, progress=False)


def uptrain(v: Variant, student, variables: dict, teacher, teacher_variables: dict, batches: list[dict],
            lr: float) -> tuple[dict, list[float]]:
  """rrt_jax.train.loop.uptrain_on_batches with the variant's early-exit weights."""
  from rrt_jax.train.loop import uptrain_on_batches
  return uptrain_on_batches(student, variables, teacher, teacher_variables, batches, lr, v.early_exit)


def evaluate(model, variables: dict, windows: dict, batch_size: int) -> dict:
  from rrt_jax.eval.perplexity import per_loop_perplexity
  out = {}
  for corpus, w in windows.items():
    ppl = per_loop_perplexity(model, variables, w, batch_size=batch_size)
    out[corpus] = {'ppl': ppl, 'bpb': [math.log2(p) for p in ppl], 'tokens': w.num_tokens}
  return out


class Study:
  """Lazily loaded inputs (a rerun that skips every stage loads no model and compiles nothing)."""

  def __init__(self, s: Settings):
    self.s = s
    self.stages = Stages(s.workdir)
    self.pretrain_dir = self.stages.path('pretrain')

  @functools.cached_property
  def tokenizer(self):
    from rrt_jax.data.tokenizer import make_tokenizer
    return make_tokenizer('bytes')

  @functools.cached_property
  def cfg(self):
    from rrt_jax.checkpoint import read_configs
    return read_configs(self.pretrain_dir, 'holds no pretraining run')[0]

  @functools.cached_property
  def vanilla(self) -> dict:  # On the device once (the teacher of every uptraining step).
    return jax.tree.map(jax.numpy.asarray, load_variables(os.path.join(self.pretrain_dir, 'pretrained.msgpack')))

  @functools.cached_property
  def windows(self) -> dict:
    from rrt_jax.eval.perplexity import heldout_windows
    return {c: heldout_windows(self.tokenizer, c, self.s.eval_tokens, window=self.s.seq_len) for c in self.s.corpora}

  @functools.cache  # noqa: B019  (one Study per process)
  def calibration(self):
    from rrt_jax.convert.calibration import CalibrationConfig, calibration_batches
    from rrt_jax.data.tfds_builder import text_source
    config = CalibrationConfig(tokens=self.s.calibration_tokens, seq_len=self.s.seq_len, batch_size=4)
    batches = calibration_batches(text_source('train'), self.tokenizer, config, self.cfg.max_seq_len)
    return batches, config, self.stages.path('calibration')

  @functools.cache  # noqa: B019
  def batches(self, seed: int) -> list[dict]:
    from rrt_jax.data.pipeline import PipelineConfig, lm_dataset
    from rrt_jax.data.tfds_builder import text_source
    config = PipelineConfig(self.s.seq_len, self.s.batch, seed=DATA_SEED_OFFSET + seed)
    it = iter(lm_dataset(text_source('train'), self.tokenizer, config, max_seq_len=self.cfg.max_seq_len,
                         vocab_size=self.cfg.vocab_size))
    return [jax.tree.map(np.asarray, next(it)) for _ in range(self.s.uptrain_steps)]

  def pretrain_inputs(self) -> dict:
    s = self.s
    return {'preset': s.preset, 'steps': s.pretrain_steps, 'batch': s.pretrain_batch, 'lr': s.pretrain_lr,
            'warmup': s.pretrain_warmup, 'seq_len': s.seq_len}

  def eval_inputs(self) -> dict:
    return {'eval_tokens': self.s.eval_tokens, 'corpora': self.s.corpora, 'seq_len': self.s.seq_len}

  def run(self) -> dict:
    from rrt_jax import Decoder
    s, st = self.s, self.stages
    pre = st.run('pretrain', st.path('pretrain', 'loss_curve.json'), self.pretrain_inputs(),
                 lambda: pretrain(s, self.pretrain_dir))
    plot_pretrain(pre, st.path('pretrain_loss.png'))
    if flags.FLAGS.pretrain_only:
      return {'pretrain': pre}
    vanilla_eval = st.run('eval vanilla', st.path('eval', 'vanilla', 'pretrained.json'),
                          {'pretrain': self.pretrain_inputs(), **self.eval_inputs()},
                          lambda: evaluate(Decoder(self.cfg), self.vanilla, self.windows, s.eval_batch))
    rows = []
    for v in variants(s, self.cfg.num_layers):
      rows.append(self.run_variant(v))
    return {'pretrain': pre, 'vanilla': vanilla_eval, 'rows': rows}

  def run_variant(self, v: Variant) -> dict:
    from rrt_jax import Decoder
    s, st = self.s, self.stages
    spec = dataclasses.asdict(v)
    calib = {'calibration_tokens': s.calibration_tokens} if v.lora_init == 'whitened_svd' else {}
    conv_inputs = {'pretrain': self.pretrain_inputs(), 'conversion': v.conversion, **calib}
    conv_path = st.path('converted', v.conversion_slug + '.msgpack')

    def convert_stage():
      variables = convert_variant(v, self.cfg, self.vanilla, self.calibration)
      save_variables(conv_path, variables)
      return param_counts(self.cfg, v)

    row = {'model': v.name, 'group': v.group, 'spec': spec,
           **st.run(f'convert {v.name}', st.path('converted', v.conversion_slug + '.json'), conv_inputs,
                    convert_stage)}
    model = lambda: Decoder(model_config(self.cfg, v), recursion(v))  # noqa: E731
    if s.eval_converted:
      row['converted'] = st.run(f'eval {v.name} (converted)', st.path('eval', v.conversion_slug, 'converted.json'),
                                {**conv_inputs, **self.eval_inputs()},
                                lambda: evaluate(model(), load_variables(conv_path), self.windows, s.eval_batch))
    row['seeds'] = {}
    for seed in s.seeds:
      up_inputs = {**conv_inputs, 'seed': seed, 'steps': s.uptrain_steps, 'batch': s.batch, 'lr': s.uptrain_lr,
                   'seq_len': s.seq_len, 'early_exit': v.early_exit}
      up_path = st.path('uptrained', v.slug, f'seed{seed}.msgpack')

      def uptrain_stage(seed=seed, up_path=up_path):
        variables, losses = uptrain(v, model(), load_variables(conv_path), Decoder(self.cfg), self.vanilla,
                                    self.batches(seed), s.uptrain_lr)
        save_variables(up_path, variables)
        return {'losses': losses, 'tokens': s.uptrain_steps * s.batch * s.seq_len}

      trained = st.run(f'uptrain {v.name} seed {seed}', st.path('uptrained', v.slug, f'seed{seed}.json'),
                       up_inputs, uptrain_stage)
      scores = st.run(f'eval {v.name} seed {seed}', st.path('eval', v.slug, f'seed{seed}.json'),
                      {**up_inputs, **self.eval_inputs()},
                      lambda up_path=up_path: evaluate(model(), load_variables(up_path), self.windows,
                                                       s.eval_batch))
      row['seeds'][str(seed)] = {'losses': trained['losses'], 'uptrain_seconds': trained['seconds'],
                                 'eval': {c: scores[c] for c in s.corpora}}
    row['summary'] = summarize(row, s.corpora)
    return row


def summarize(row: dict, corpora) -> dict:
  """Mean and std (ddof=1; 0 with one seed) over seeds of every loop's bpb and ppl, per corpus."""
  out = {}
  for corpus in corpora:
    out[corpus] = {}
    for metric in ('bpb', 'ppl'):
      values = np.asarray([r['eval'][corpus][metric] for r in row['seeds'].values()], np.float64)  # [seeds, loops]
      out[corpus][metric + '_mean'] = values.mean(0).tolist()
      out[corpus][metric + '_std'] = (values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])).tolist()
  return out


class PerSeed:
  """per_seed(name, corpus, loop) -> the per-seed bpb of that loop after uptraining (None if absent)."""

  def __init__(self, rows: list[dict]):
    self.rows = {r['model']: r for r in rows}
    self.names = list(self.rows)

  def __call__(self, name: str, corpus: str, loop: int) -> list[float] | None:
    row = self.rows.get(name)
    if row is None or not row['seeds']:
      return None
    return [r['eval'][corpus]['bpb'][loop] for _, r in sorted(row['seeds'].items(), key=lambda kv: int(kv[0]))]


# ---------------------------------------------------------------------------------------------- tables, plots


def _pm(mean: list[float], std: list[float], digits: int = 3) -> str:
  return ' / '.join(f'{m:.{digits}f}±{d:.{digits}f}' for m, d in zip(mean, std, strict=True))


def markdown(results: dict, corpora) -> str:
  head = ['model', 'non-emb params (LoRA)']
  for c in corpora:
    head += [f'{c} bpb converted (last loop)', f'{c} bpb per loop, uptrained', f'{c} ppl per loop, uptrained']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  pre = results['vanilla']
  cells = ['vanilla (pretrained teacher)', f'{results["vanilla_params"] / 1e6:.2f} M']
  for c in corpora:
    cells += ['—', f'{pre[c]["bpb"][0]:.3f}', f'{pre[c]["ppl"][0]:.2f}']
  lines.append('| ' + ' | '.join(cells) + ' |')
  for row in results['rows']:
    lora = f' ({row["lora_params"] / 1e6:.2f} M)' if row['lora_params'] else ''
    cells = [row['model'], f'{row["non_embedding_params"] / 1e6:.2f} M{lora}']
    for c in corpora:
      sm = row['summary'][c]
      converted = f'{row["converted"][c]["bpb"][-1]:.3f}' if 'converted' in row else '—'
      cells += [converted, _pm(sm['bpb_mean'], sm['bpb_std']),
                _pm(sm['ppl_mean'], sm['ppl_std'], 2)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def setup_line(results: dict, s: Settings) -> str:
  pre = results['pretrain']
  pre_tokens = pre['step'] * pre['tokens_per_step']
  up_tokens = s.uptrain_steps * s.batch * s.seq_len
  step_s = f', {pre["median_step_seconds"]:.2f} s / step' if pre['median_step_seconds'] else ''
  final = pre['curve']['loss'][-1] / math.log(2) if pre['curve']['loss'] else float('nan')
  return (f'Pretrained --preset={s.preset} ({results["vanilla_params"] / 1e6:.2f} M non-embedding) from scratch: '
          f'{pre["step"]} steps x {pre["tokens_per_step"]} bytes = {pre_tokens:,} tokens{step_s}, final '
          f'training loss {final:.3f} bits/byte. Uptraining per variant and seed: {s.uptrain_steps} steps x '
          f'{s.batch} x {s.seq_len} = {up_tokens:,} tokens ({up_tokens / max(pre_tokens, 1):.1%} of '
          f'pretraining), CE + KD from the pretrained model, aggressive early-exit weights, seeds {list(s.seeds)}. '
          f'Cells: bits per byte (bpb) and perplexity after every loop, mean ± std over seeds; first '
          f'{s.eval_tokens} bytes of each corpus in windows of {s.seq_len}.')


def claims_text(claims: list[dict]) -> str:
  held = sum(c['held'] for c in claims)
  head = (f'Claims of the paper, judged on the last loop\'s bpb after uptraining (loop 1\'s for "makes loop 1 '
          f'usable"); the difference is in units of the pooled std over seeds: {held} of {len(claims)} held.')
  return '\n'.join([head] + [format_claim(c) for c in claims])


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_pretrain(pre: dict, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  curve = pre['curve']
  ax.plot(curve['step'], [loss / math.log(2) for loss in curve['loss']])
  ax.set(xlabel='step', ylabel='training loss (bits per byte)', title=f'Pretraining ({pre["tokens_per_step"]} '
         'tokens / step)')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_per_loop(results: dict, corpora, path: str) -> None:
  plt = _pyplot()
  rows = results['rows']
  max_loops = max([len(r['summary'][corpora[0]]['bpb_mean']) for r in rows] + [1])
  fig, axes = plt.subplots(len(corpora), 1, figsize=(max(8, 0.75 * len(rows) + 2), 4.5 * len(corpora)),
                           squeeze=False)
  width = 0.8 / max_loops
  for ax, corpus in zip(axes[:, 0], corpora, strict=True):
    for loop in range(max_loops):
      xs, ys, es = [], [], []
      for i, r in enumerate(rows):
        sm = r['summary'][corpus]
        if loop < len(sm['bpb_mean']):
          xs.append(i + (loop - (max_loops - 1) / 2) * width)
          ys.append(sm['bpb_mean'][loop])
          es.append(sm['bpb_std'][loop])
      ax.bar(xs, ys, width, yerr=es, capsize=2, label=f'exit after loop {loop + 1}')
    ax.axhline(results['vanilla'][corpus]['bpb'][0], color='k', ls='--', lw=1, label='pretrained vanilla')
    ax.set_xticks(range(len(rows)), [r['model'] for r in rows], rotation=60, ha='right', fontsize=7)
    ax.set(ylabel=f'{corpus} bits per byte', title=f'{corpus}: per-loop bpb after uptraining (mean ± std over '
           'seeds)')
    means = [m for r in rows for m in r['summary'][corpus]['bpb_mean']] + [results['vanilla'][corpus]['bpb'][0]]
    low, high = min(means), max(means)
    ax.set_ylim(max(0.0, low - 0.15 * (high - low) - 0.05), high + 0.1 * (high - low) + 0.05)  # (Not from 0.)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_uptraining(results: dict, path: str) -> None:
  """Training loss per uptraining step, mean ± std over seeds, one panel per group (the no-early-exit ablation
  dotted next to the relaxed models; its loss weights the exits differently, so compare its slope, not level)."""
  plt = _pyplot()
  panels = {'recursive': ('recursive',), 'relaxed': ('relaxed', 'no_early_exit'),
            'baselines (reduced, scratch)': ('reduced', 'scratch')}
  panels = {k: g for k, g in panels.items() if any(r['group'] in g for r in results['rows'])}
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  for ax, (title, groups) in zip(axes[0], panels.items(), strict=True):
    for r in results['rows']:
      if r['group'] not in groups:
        continue
      losses = np.asarray([x['losses'] for x in r['seeds'].values()])  # [seeds, steps]
      mean, std = losses.mean(0), losses.std(0)
      steps = np.arange(1, losses.shape[1] + 1)
      ax.plot(steps, mean, label=r['model'], ls=':' if r['group'] == 'no_early_exit' else '-')
      ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel='uptraining step', ylabel='loss (CE + KD, exit-weighted)', title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  s = settings()
  os.makedirs(s.workdir, exist_ok=True)
  if s.tiny:  # (Before the backend starts.) A few steps each: compile time is all that counts, so compile fast.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0 '
                               '--xla_llvm_disable_expensive_passes=true').strip()
  # Every variant and seed of the same shapes compiles its step and eval functions once.
  jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(s.workdir), 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from rrt_jax.model import count_params
  from rrt_jax.utils.timing import machine_description
  print(f'# repro study{" (tiny)" if s.tiny else ""}: {machine_description()}', flush=True)
  t0 = time.perf_counter()
  study = Study(s)
  results = study.run()
  if flags.FLAGS.pretrain_only:
    pre = results['pretrain']
    print(f'pretrained to step {pre["step"]}: loss {pre["curve"]["loss"][0]:.3f} -> {pre["curve"]["loss"][-1]:.3f} '
          f'nats/byte; median step {pre["median_step_seconds"]} s', flush=True)
    return
  from rrt_jax import RecursionConfig
  results['vanilla_params'] = count_params(study.cfg, RecursionConfig()).non_embedding
  results['settings'] = _normal(dataclasses.asdict(s))
  results['claims'] = paper_claims(PerSeed(results['rows']), s, s.corpora)
  report = '\n\n'.join([setup_line(results, s), markdown(results, s.corpora), claims_text(results['claims'])])
  print('\n' + report, flush=True)
  _write_json(study.stages.path('results.json'), results)
  with open(study.stages.path('results.md'), 'w') as f:
    f.write(report + '\n')
  plot_per_loop(results, s.corpora, study.stages.path('per_loop_bpb.png'))
  plot_uptraining(results, study.stages.path('uptraining_curves.png'))
  print(f'stages: {study.stages.ran} run, {study.stages.skipped} skipped; {time.perf_counter() - t0:.1f} s. '
        f'Wrote {s.workdir}/results.json, results.md, per_loop_bpb.png, uptraining_curves.png, pretrain_loss.png',
        flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
