r"""The conversion study on SmolLM2-135M: which conversion gives a recursive model that works before and after
cheap healing, measured per loop on four held-out corpora.

  python -m experiments.conversion_study --workdir=workdir/conversion_study

Grid (training-free): for R in --loops and each looping in --loopings (middle_cycle keeps --unique_layers
first and last layers unique; it needs (30 - 2u) divisible by R), plain recursive models (rank 0) for each
shared init in --inits, and relaxed models for each rank in --ranks x shared init x LoRA init in --lora_inits
('svd' weight space, 'whitened_svd' from the original model's calibration statistics, 'whitened_seq' sequential
calibration). Baselines at the non-embedding parameter count of --baseline_of: the reduced-size model (the
stepwise-chosen layers, run once) and the untied whitened low-rank compression of every projection.

Then --finetune variants (names as printed) get layer-wise healing (--heal_steps per depth position) and
--kd_steps of KD + early-exit uptraining on the training split, scored after each stage. Every stage is timed.
Writes results.json, results.md and conversion_study.png into --workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.convert import to_recursive
from rrt_jax.convert.calibration import CalibrationConfig, calibration_batches, collect_grams, convert
from rrt_jax.convert.low_rank import low_rank_compress, low_rank_param_count, rank_for_budget
from rrt_jax.data.pipeline import PipelineConfig, lm_dataset
from rrt_jax.data.tfds_builder import text_source
from rrt_jax.eval.perplexity import heldout_windows, per_loop_perplexity
from rrt_jax.model import count_params
from rrt_jax.pretrained.gguf import load_gguf
from rrt_jax.pretrained.tokenizer import make_tokenizer
from rrt_jax.train.healing import HealingConfig, heal
from rrt_jax.train.loop import uptrain_on_batches
from rrt_jax.utils.timing import machine_description

_WORKDIR = flags.DEFINE_string('workdir', 'workdir/conversion_study', 'Where results, tables and plots go.')
_LOOPS = flags.DEFINE_list('loops', ['2', '3'], 'Loop counts R.')
_LOOPINGS = flags.DEFINE_list('loopings', ['cycle', 'middle_cycle'], 'cycle | middle_cycle.')
_UNIQUE = flags.DEFINE_integer('unique_layers', 1, 'Unique first/last layers under middle_cycle.')
_MIDDLE_LOOPS = flags.DEFINE_list('middle_loops', ['2', '4'], 'Loop counts R for middle_cycle ((30 - 2u) / R).')
_INITS = flags.DEFINE_list('inits', ['stepwise', 'average'], 'Shared-layer inits.')
_RANKS = flags.DEFINE_list('ranks', ['0', '64', '128'], 'LoRA ranks (0 = plain recursive).')
_LORA_INITS = flags.DEFINE_list('lora_inits', ['svd', 'whitened_svd', 'whitened_seq'], 'LoRA inits.')
_ONLY = flags.DEFINE_list('only', [], 'Run only the variants whose name contains one of these strings.')
_BASELINE_OF = flags.DEFINE_string('baseline_of', 'R=3 cycle average r=64', 'Variant whose non-embedding size the '
                                   'baselines match ("" = no baselines).')
_CORPORA = flags.DEFINE_list('corpora', ['austen', 'brown', 'wikipedia', 'validation'], 'Held-out corpora.')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', 2048, 'Held-out tokens scored per corpus.')
_CALIB_TOKENS = flags.DEFINE_integer('calibration_tokens', 32_768, 'Calibration tokens (training split).')
_RIDGE = flags.DEFINE_float('ridge', 1e-3, 'Gram ridge, relative to the mean diagonal.')
_FINETUNE = flags.DEFINE_list('finetune', ['R=3 cycle average r=64 whitened_seq'],
                              'Variants that get healing + KD (names as printed).')
_HEAL_STEPS = flags.DEFINE_integer('heal_steps', 16, 'Healing Adam steps per depth position (0 = no healing).')
_HEAL_TOKENS = flags.DEFINE_integer('heal_tokens', 16_384, 'Healing text (training split, other windows).')
_HEAL_LR = flags.DEFINE_float('heal_lr', 1e-3, 'Healing learning rate.')
_KD_STEPS = flags.DEFINE_integer('kd_steps', 60, 'KD + early-exit uptraining steps after healing (0 = none).')
_KD_BATCH = flags.DEFINE_integer('kd_batch', 4, 'Sequences per KD step.')
_KD_SEQ = flags.DEFINE_integer('kd_seq_len', 256, 'KD sequence length.')
_KD_LR = flags.DEFINE_float('kd_lr', 3e-4, 'KD peak learning rate.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype of healing and KD (bfloat16 on accelerators).')


def variants(num_layers: int) -> list[tuple[str, RecursionConfig, str]]:
  """(name, RecursionConfig, LoRA init flag) of every converted model of the grid."""
  out = []
  for looping in _LOOPINGS.value:
    loops = _MIDDLE_LOOPS.value if looping == 'middle_cycle' else _LOOPS.value
    unique = _UNIQUE.value if looping == 'middle_cycle' else 0
    for r_loops in (int(x) for x in loops):
      base = RecursionConfig(loops=r_loops, looping=looping, unique_layers=unique)
      tag = f'R={r_loops} {looping}' + (f' u={unique}' if unique else '')
      for init in _INITS.value:
        for rank in (int(x) for x in _RANKS.value):
          if rank == 0:
            out.append((f'{tag} {init} r=0', base.replace(init=init), 'none'))
            continue
          for lora_init in _LORA_INITS.value:
            rec = base.replace(init=init, lora_rank=rank, lora_init='whitened_svd' if lora_init == 'whitened_seq'
                               else lora_init)
            out.append((f'{tag} {init} r={rank} {lora_init}', rec, lora_init))
  if _ONLY.value:
    out = [v for v in out if any(key in v[0] for key in _ONLY.value) or v[0] in _FINETUNE.value]
  return out


def kd_batches(tokenizer, max_seq_len: int) -> list[dict]:
  config = PipelineConfig(_KD_SEQ.value, _KD_BATCH.value, seed=7)
  it = iter(lm_dataset(text_source('train'), tokenizer, config, max_seq_len=max_seq_len))
  return [jax.tree.map(np.asarray, next(it)) for _ in range(_KD_STEPS.value)]


def evaluate(model: Decoder, variables: dict, windows: dict) -> dict:
  return {name: per_loop_perplexity(model, variables, w, batch_size=2) for name, w in windows.items()}


def _fmt(values: list[float]) -> str:
  return ' / '.join(f'{p:,.0f}' if p >= 1000 else f'{p:.1f}' for p in values)


def markdown(rows: list[dict], corpora: list[str]) -> str:
  head = ['model', 'stage', 'non-emb params'] + [f'{c} ppl (exit 1 → last)' for c in corpora] + ['stage s']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    for stage in row['stages']:
      cells = [row['model'], stage['stage'], f'{row["non_embedding_params"] / 1e6:.1f} M']
      cells += [_fmt(stage['perplexity'][c]) for c in corpora] + [f'{stage["seconds"]:.0f}']
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(rows: list[dict], corpus: str, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for row in rows:
    first = row['stages'][0]['perplexity'][corpus][-1]
    axes[0].scatter(row['non_embedding_params'] / 1e6, first, s=12)
    axes[0].annotate(row['model'], (row['non_embedding_params'] / 1e6, first), fontsize=5)
  axes[0].set(xlabel='non-embedding parameters (M)', ylabel=f'{corpus} ppl, last exit, training-free', yscale='log',
              title='Training-free conversions')
  for row in rows:
    if len(row['stages']) > 1:
      for stage, style in zip(row['stages'], ('o:', 's--', 'd-'), strict=False):
        curve = stage['perplexity'][corpus]
        axes[1].plot(range(1, len(curve) + 1), curve, style, label=f'{row["model"]} ({stage["stage"]})')
  axes[1].set(xlabel='exit after loop', ylabel=f'{corpus} perplexity', yscale='log', title='Healing and KD, per loop')
  axes[1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=130)


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  machine = machine_description()
  print(f'# conversion study on SmolLM2-135M, {machine}', flush=True)
  cfg, vanilla = load_gguf()
  tokenizer = make_tokenizer('smollm2')
  windows = {c: heldout_windows(tokenizer, c, _EVAL_TOKENS.value) for c in _CORPORA.value}
  calib = CalibrationConfig(tokens=_CALIB_TOKENS.value, ridge=_RIDGE.value)
  t0 = time.perf_counter()
  batches = calibration_batches(text_source('train'), tokenizer, calib, cfg.max_seq_len)
  stats = collect_grams(cfg, vanilla, batches, calib, cache_dir=os.path.join(_WORKDIR.value, 'calibration'))
  calibration_s = time.perf_counter() - t0
  print(f'[{calibration_s:6.0f}s] calibration statistics of {stats.tokens} tokens', flush=True)

  rows = [{'model': 'vanilla', 'non_embedding_params': count_params(cfg, RecursionConfig()).non_embedding,
           'stages': [{'stage': 'original', 'perplexity': evaluate(Decoder(cfg), vanilla, windows), 'seconds': 0.0}]}]
  built = {}
  for name, rec, lora_init in variants(cfg.num_layers):
    t0 = time.perf_counter()
    try:
      if lora_init == 'whitened_seq':
        variables = convert(vanilla, cfg, rec, batches, CalibrationConfig(tokens=_CALIB_TOKENS.value,
                                                                          ridge=_RIDGE.value, sequential=True))
      else:
        variables = to_recursive(vanilla, cfg, rec, calibration=stats if lora_init == 'whitened_svd' else None)
    except ValueError as e:  # E.g. a loop count that does not divide the middle layers.
      print(f'skipped {name}: {e}', flush=True)
      continue
    convert_s = time.perf_counter() - t0
    model = Decoder(cfg, rec)
    ppl = evaluate(model, variables, windows)
    rows.append({'model': name, 'non_embedding_params': count_params(cfg, rec).non_embedding,
                 'stages': [{'stage': 'converted', 'perplexity': ppl, 'seconds': convert_s}]})
    print(f'{name}: {rows[-1]["non_embedding_params"] / 1e6:.1f}M, ' +
          ', '.join(f'{c} {_fmt(p)}' for c, p in ppl.items()) + f' ({convert_s:.0f} s to convert)', flush=True)
    if name in _FINETUNE.value:
      built[name] = (model, variables, rows[-1])

  # The first converted variant whose name starts with --baseline_of sets the size (all its LoRA inits share it).
  baseline = next((r for r in rows[1:] if _BASELINE_OF.value and r['model'].startswith(_BASELINE_OF.value)), None)
  if baseline is not None:
    budget = baseline['non_embedding_params']
    loops = int(_BASELINE_OF.value.split('R=')[1].split()[0])
    reduced_rec = RecursionConfig(loops=loops, init='stepwise')
    small = cfg.replace(num_layers=reduced_rec.shared_layers(cfg.num_layers))
    t0 = time.perf_counter()
    reduced = to_recursive(vanilla, cfg, reduced_rec)
    rows.append({'model': f'baseline: reduced {small.num_layers} layers', 'non_embedding_params':
                 count_params(small, RecursionConfig()).non_embedding, 'stages': [
                     {'stage': 'converted', 'perplexity': evaluate(Decoder(small), reduced, windows),
                      'seconds': time.perf_counter() - t0}]})
    rank = rank_for_budget(cfg, budget)
    t0 = time.perf_counter()
    model, variables = low_rank_compress(vanilla, cfg, stats, rank)
    rows.append({'model': f'baseline: whitened low-rank r={rank}', 'non_embedding_params':
                 low_rank_param_count(cfg, rank), 'stages': [
                     {'stage': 'converted', 'perplexity': evaluate(model, variables, windows),
                      'seconds': time.perf_counter() - t0}]})
    for row in rows[-2:]:
      print(f'{row["model"]}: {row["non_embedding_params"] / 1e6:.1f}M, ' +
            ', '.join(f'{c} {_fmt(p)}' for c, p in row['stages'][0]['perplexity'].items()), flush=True)

  if built:
    heal_batches = calibration_batches(text_source('train'), tokenizer, CalibrationConfig(tokens=_HEAL_TOKENS.value),
                                       cfg.max_seq_len, seed=99)
    train_batches = kd_batches(tokenizer, cfg.max_seq_len) if _KD_STEPS.value else []
  for name, (model, variables, row) in built.items():
    if _HEAL_STEPS.value:
      t0 = time.perf_counter()
      variables, report = heal(vanilla, cfg, model.rec, variables, heal_batches,
                               HealingConfig(steps_per_layer=_HEAL_STEPS.value, lr=_HEAL_LR.value, dtype=_DTYPE.value))
      row['healing'] = dataclasses.asdict(report)
      row['stages'].append({'stage': f'healed ({_HEAL_STEPS.value} steps/layer)',
                            'perplexity': evaluate(model, variables, windows), 'seconds': time.perf_counter() - t0})
      print(f'{name} healed: ' + ', '.join(f'{c} {_fmt(p)}' for c, p in row['stages'][-1]['perplexity'].items()),
            flush=True)
    if train_batches:
      t0 = time.perf_counter()
      student = Decoder(model.cfg.replace(dtype=_DTYPE.value), model.rec)
      variables, losses = uptrain_on_batches(student, variables, Decoder(cfg), vanilla, train_batches,
                                            _KD_LR.value)
      row['kd_losses'] = losses
      tokens = _KD_STEPS.value * _KD_BATCH.value * _KD_SEQ.value
      row['stages'].append({'stage': f'+ KD {_KD_STEPS.value} steps ({tokens} tokens)',
                            'perplexity': evaluate(model, variables, windows), 'seconds': time.perf_counter() - t0})
      print(f'{name} + KD: ' + ', '.join(f'{c} {_fmt(p)}' for c, p in row['stages'][-1]['perplexity'].items()),
            flush=True)

  table = markdown(rows, list(windows))
  print('\n' + table, flush=True)
  with open(os.path.join(_WORKDIR.value, 'results.json'), 'w') as f:
    json.dump({'machine': machine, 'calibration_s': calibration_s, 'calibration_tokens': stats.tokens,
               'flags': {k: flags.FLAGS[k].value for k in (
                   'loops', 'loopings', 'unique_layers', 'middle_loops', 'inits', 'ranks', 'lora_inits', 'corpora',
                   'eval_tokens', 'calibration_tokens', 'ridge', 'finetune', 'heal_steps', 'heal_tokens', 'heal_lr',
                   'kd_steps', 'kd_batch', 'kd_seq_len', 'kd_lr', 'dtype')}, 'rows': rows}, f, indent=2)
  with open(os.path.join(_WORKDIR.value, 'results.md'), 'w') as f:
    f.write(table + '\n')
  plot(rows, list(windows)[0], os.path.join(_WORKDIR.value, 'conversion_study.png'))
  print(f'wrote {_WORKDIR.value}/results.json, results.md, conversion_study.png')


if __name__ == '__main__':
  app.run(main)
