r"""The paper's study reproduced end to end on a model we pretrain ourselves: pretrain a small vanilla Llama from
scratch on the byte-level training split, convert it to recursive and relaxed models, uptrain every variant with
the same token budget over several data-order seeds, and judge the paper's claims in units of the seeds' spread.

  python -m experiments.repro_study --workdir=workdir/repro_study          # the study (1 h 40 min measured, 2 cores)
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

The variant grid is experiments/repro_grid.py, the claims and their judge experiments/repro_claims.py, the table
and plots experiments/repro_report.py; this file holds the flags, the stages and the run.

The claims (Bae et al., ICLR 2025) are judged on the last loop's bits per byte after uptraining, on each corpus,
by `judge`, in units of the pooled std over seeds: held beyond +1 std, not held beyond -1 std, not settled in
between ("keeps the last loop's quality": held when no more than one pooled std worse).

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
  total ~1.8 h estimated; the run of 2026-12-02 took 6,009 s (1 h 40 min; BUILD_NOTES). Wall time is linear
  in --pretrain_steps and --uptrain_steps (the knobs). Under load the step
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

from experiments.repro_claims import PerSeed, claims_text, paper_claims
from experiments.repro_grid import Settings, Variant, variants
from experiments.repro_report import (
    flatness_text,
    markdown,
    plot_per_loop,
    plot_pretrain,
    plot_uptraining,
    setup_line,
    summarize,
)


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


# ---------------------------------------------------------------------------------------------- stage results


def json_normal(x):
  """JSON-normal form (tuples -> lists, ...), so recorded and current inputs compare equal."""
  return json.loads(json.dumps(x))


def write_json(path: str, data: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str) -> dict:
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
    inputs = json_normal(inputs)
    if os.path.exists(path):
      result = read_json(path)
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
    result = json_normal({**result, 'inputs': inputs, 'seconds': time.perf_counter() - t0})
    write_json(path, result)
    self.ran += 1
    print(f'[done] {label} ({result["seconds"]:.1f} s)', flush=True)
    return result


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


def pretrain(s: Settings, directory: str, config=None) -> dict:
  """Stage 1 (resumes from the trainer's checkpoints when interrupted). config: the training config (default
  `pretrain_config(s)`; experiments/small_world.py passes its own tokenizer's)."""
  from rrt_jax.checkpoint import load_training_checkpoint
  from rrt_jax.train.loop import train
  t0 = time.perf_counter()
  train(config or pretrain_config(s), directory)
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
    from rrt_jax.pretrained.tokenizer import make_tokenizer
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


def main(argv):
  del argv
  from rrt_jax.utils.xla_cpu import prefer_ynn_dots
  prefer_ynn_dots()  # Before the backend starts.
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
  results['settings'] = json_normal(dataclasses.asdict(s))
  results['claims'] = paper_claims(PerSeed(results['rows']), s, s.corpora)
  report = '\n\n'.join([setup_line(results, s), markdown(results, s.corpora), flatness_text(results),
                       claims_text(results['claims'])])
  print('\n' + report, flush=True)
  write_json(study.stages.path('results.json'), results)
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
