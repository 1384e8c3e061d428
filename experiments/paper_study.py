r"""The paper's study at small scale, on SmolLM2-135M (30 layers): looping inits, relaxation ranks, SVD vs zero
LoRA init, and a reduced-size baseline, each scored straight after conversion and after the same KD budget.

  python -m experiments.paper_study --workdir=workdir/paper_study

Variants: vanilla; Recursive with B in --loops for each init in --inits; a reduced-size model (the stepwise-chosen
30/B layers, run once) per B; Relaxed (B = --relaxed_loops, Average init) with SVD LoRA at each rank in --ranks
('full' = exact) and zero-init LoRA at --zero_rank. Scores: perplexity at every loop's exit on each held-out
corpus (Austen, Brown, Wikipedia leads) and few-shot accuracy at the last exit. Uptraining: every non-vanilla
variant gets the same --uptrain_steps of KD from the original model (CE + forward KL, aggressive early-exit
weights) on the same batches of the Debian-docs training split. Writes results.json, results.md, and plots of
perplexity vs non-embedding parameters and per-loop curves into --workdir. Budgets scale by flag: the defaults
fit a 2-core CPU; raise --uptrain_steps, --batch, --eval_tokens and --fewshot_limit on a GPU.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.convert import to_recursive
from rrt_jax.data.pipeline import PipelineConfig, lm_dataset
from rrt_jax.data.tfds_builder import text_source
from rrt_jax.eval.perplexity import heldout_windows, per_loop_perplexity
from rrt_jax.model import count_params
from rrt_jax.pretrained.gguf import load_gguf
from rrt_jax.pretrained.tokenizer import make_tokenizer
from rrt_jax.train.loop import uptrain_on_batches
from rrt_jax.utils.timing import machine_description

_WORKDIR = flags.DEFINE_string('workdir', 'workdir/paper_study', 'Where results, tables and plots go.')
_LOOPS = flags.DEFINE_list('loops', ['2', '3'], 'Loop counts B of the recursive models (must divide 30).')
_INITS = flags.DEFINE_list('inits', ['stepwise', 'average', 'lower'], 'Looping inits of the recursive models.')
_RELAXED_LOOPS = flags.DEFINE_integer('relaxed_loops', 3, 'B of the relaxed models.')
_RANKS = flags.DEFINE_list('ranks', ['8', '32', '128', 'full'], 'SVD LoRA ranks of the relaxed models.')
_ZERO_RANK = flags.DEFINE_integer('zero_rank', 32, 'Rank of the zero-init LoRA variant (0 = skip it).')
_UPTRAIN_STEPS = flags.DEFINE_integer('uptrain_steps', 4, 'KD uptraining steps per variant (0 = conversion only).')
_BATCH = flags.DEFINE_integer('batch', 4, 'Sequences per uptraining step.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Uptraining sequence length.')
_LR = flags.DEFINE_float('lr', 3e-4, 'Peak learning rate.')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', 1024, 'Held-out tokens scored per corpus.')
_CORPORA = flags.DEFINE_list('corpora', ['austen', 'brown', 'wikipedia'], 'Held-out corpora (TFDS splits).')
_FEWSHOT_LIMIT = flags.DEFINE_integer('fewshot_limit', 10, 'Items per few-shot task (0 = skip few-shot).')
_NUM_SHOTS = flags.DEFINE_integer('num_shots', 0, 'Shots per few-shot prompt.')
_ONLY = flags.DEFINE_list('only', [], 'Run only the variants whose name contains one of these strings.')


def variants(num_layers: int) -> list[tuple[str, object]]:
  """(name, RecursionConfig) or (name, ('reduced', B)) for every model of the study."""
  out = [('vanilla', RecursionConfig())]
  for b in (int(x) for x in _LOOPS.value):
    out += [(f'recursive B={b} {init}', RecursionConfig(loops=b, init=init)) for init in _INITS.value]
    out.append((f'reduced {num_layers // b} layers (stepwise, = B={b} size)', ('reduced', b)))
  b = _RELAXED_LOOPS.value
  for r in _RANKS.value:
    rank = 10**6 if r == 'full' else int(r)
    out.append((f'relaxed B={b} average+SVD r={r}', RecursionConfig(loops=b, init='average', lora_rank=rank)))
  if _ZERO_RANK.value:
    out.append((f'relaxed B={b} average+zero-init r={_ZERO_RANK.value}',
                RecursionConfig(loops=b, init='average', lora_rank=_ZERO_RANK.value, lora_init='zero')))
  if _ONLY.value:
    out = [v for v in out if any(key in v[0] for key in _ONLY.value)]
  return out


def build(cfg, vanilla: dict, spec) -> tuple[Decoder, dict]:
  if isinstance(spec, tuple):  # Reduced size: the stepwise-chosen layers, run once.
    rec = RecursionConfig(loops=spec[1], init='stepwise')
    small = cfg.replace(num_layers=rec.shared_layers(cfg.num_layers))
    return Decoder(small, RecursionConfig()), to_recursive(vanilla, cfg, rec)
  return Decoder(cfg, spec), to_recursive(vanilla, cfg, spec)


def uptraining_batches(tokenizer, max_seq_len: int) -> list[dict]:
  """The same batches for every variant: the same budget on the same tokens."""
  config = PipelineConfig(_SEQ_LEN.value, _BATCH.value, seed=0)
  it = iter(lm_dataset(text_source('train'), tokenizer, config, max_seq_len=max_seq_len))
  return [jax.tree.map(np.asarray, next(it)) for _ in range(_UPTRAIN_STEPS.value)]


def fewshot_suite(tokenizer) -> dict | None:
  """The few-shot tasks, loaded once; 'run' scores a model on all of them (metrics at every loop's exit)."""
  if not _FEWSHOT_LIMIT.value:
    return None
  from rrt_jax.eval import fewshot
  tasks = [fewshot.load_task(name) for name in fewshot.DEFAULT_TASKS]
  metric = {t.name: 'acc_norm' if t.kind == fewshot.MULTIPLE_CHOICE else 'exact_match' for t in tasks}
  names = [f'{t.name} {metric[t.name]}' for t in tasks]

  def run(model: Decoder, variables: dict) -> dict:
    results = fewshot.evaluate_tasks(model, variables, tokenizer, tasks, _NUM_SHOTS.value, _FEWSHOT_LIMIT.value,
                                     progress=False)
    out = {f'{name} {metric[name]}': r.per_loop[-1][metric[name]] for name, r in results.items()}
    out['per_loop'] = {name: r.per_loop for name, r in results.items()}
    return out

  return {'tasks': names, 'run': run}


def evaluate(model: Decoder, variables: dict, windows: dict, fewshot: dict | None) -> dict:
  """Per-loop perplexity on every corpus, and few-shot metrics when `fewshot` is given."""
  out = {'perplexity': {name: per_loop_perplexity(model, variables, w, batch_size=2) for name, w in windows.items()}}
  if fewshot is not None:
    out['fewshot'] = fewshot['run'](model, variables)
  return out


def markdown(rows: list[dict], corpora: list[str], tasks: list[str]) -> str:
  head = ['model', 'non-emb params'] + [f'{c} ppl (per loop)' for c in corpora] + tasks
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    for stage in ('converted', 'uptrained'):
      res = row.get(stage)
      if res is None:
        continue
      cells = [f'{row["model"]} ({stage})', f'{row["non_embedding_params"] / 1e6:.1f} M']
      cells += [' / '.join(f'{p:.1f}' for p in res['perplexity'][c]) for c in corpora]
      cells += [f'{res["fewshot"][t]:.3f}' if 'fewshot' in res else '—' for t in tasks]
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(rows: list[dict], corpus: str, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for stage, marker in (('converted', 'o'), ('uptrained', 's')):
    pts = [(r['non_embedding_params'] / 1e6, r[stage]['perplexity'][corpus][-1], r['model']) for r in rows
           if r.get(stage)]
    axes[0].scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=stage)
    for x, y, name in pts:
      axes[0].annotate(name, (x, y), fontsize=6)
  axes[0].set(xlabel='non-embedding parameters (M)', ylabel=f'{corpus} perplexity (last exit)', yscale='log',
              title='Perplexity vs size')
  axes[0].legend()
  for r in rows:
    res = r.get('uptrained') or r['converted']
    curve = res['perplexity'][corpus]
    axes[1].plot(range(1, len(curve) + 1), curve, 'o-', label=r['model'])
  axes[1].set(xlabel='exit after loop', ylabel=f'{corpus} perplexity', yscale='log',
              title='Per-loop perplexity (after uptraining when run)')
  axes[1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  machine = machine_description()
  print(f'# paper study on SmolLM2-135M, {machine}', flush=True)
  cfg, vanilla = load_gguf()
  tokenizer = make_tokenizer('smollm2')
  windows = {corpus: heldout_windows(tokenizer, corpus, _EVAL_TOKENS.value) for corpus in _CORPORA.value}
  fewshot = fewshot_suite(tokenizer)
  batches = uptraining_batches(tokenizer, cfg.max_seq_len) if _UPTRAIN_STEPS.value else []
  teacher = Decoder(cfg)
  rows = []
  for name, spec in variants(cfg.num_layers):
    t0 = time.perf_counter()
    model, variables = build(cfg, vanilla, spec)
    row = {'model': name, 'loops': model.rec.loops, 'lora_rank': model.rec.lora_rank,
           'non_embedding_params': count_params(model.cfg, model.rec).non_embedding,
           # Few-shot once per variant (the slow part on CPU): after uptraining when there is uptraining.
           'converted': evaluate(model, variables, windows, fewshot if name == 'vanilla' or not batches else None)}
    if name != 'vanilla' and batches:
      variables, losses = uptrain_on_batches(model, variables, teacher, vanilla, batches, _LR.value)
      row['uptrain_losses'] = losses
      row['uptrained'] = evaluate(model, variables, windows, fewshot)
    row['seconds'] = time.perf_counter() - t0
    rows.append(row)
    last = row.get('uptrained') or row['converted']
    print(f'{name}: {row["non_embedding_params"] / 1e6:.1f}M non-emb, '
          + ', '.join(f'{c} ppl {last["perplexity"][c][-1]:.1f}' for c in windows)
          + f' ({row["seconds"]:.0f} s)', flush=True)
    del variables
  tasks = fewshot['tasks'] if fewshot else []
  table = markdown(rows, list(windows), tasks)
  findings = compare_with_paper(rows, list(windows)[0])
  print('\n' + table + '\n\n' + findings, flush=True)
  with open(os.path.join(_WORKDIR.value, 'results.json'), 'w') as f:
    json.dump({'machine': machine, 'flags': {k: flags.FLAGS[k].value for k in (
        'loops', 'inits', 'relaxed_loops', 'ranks', 'zero_rank', 'uptrain_steps', 'batch', 'seq_len', 'lr',
        'eval_tokens', 'corpora', 'fewshot_limit', 'num_shots')}, 'rows': rows}, f, indent=2)
  with open(os.path.join(_WORKDIR.value, 'results.md'), 'w') as f:
    f.write(table + '\n\n' + findings + '\n')
  plot(rows, list(windows)[0], os.path.join(_WORKDIR.value, 'paper_study.png'))
  print(f'wrote {_WORKDIR.value}/results.json, results.md, paper_study.png')


def compare_with_paper(rows: list[dict], corpus: str) -> str:
  """The paper's findings (Bae et al., ICLR 2025: Fig. 4, App. F.1, Fig. G.2), checked on the last-exit perplexity
  of `corpus` (after uptraining when run, else after conversion)."""
  ppl = {r['model']: (r.get('uptrained') or r['converted'])['perplexity'][corpus][-1] for r in rows}
  lines = [f'Findings vs the paper (last-exit {corpus} perplexity, lower is better):']

  def check(claim: str, holds: bool, detail: str) -> None:
    lines.append(f'- {claim}: {"HELD" if holds else "DID NOT HOLD"} ({detail})')

  for b in _LOOPS.value:
    inits = {i: ppl[f'recursive B={b} {i}'] for i in _INITS.value if f'recursive B={b} {i}' in ppl}
    if len(inits) > 1:
      best = min(inits, key=inits.get)
      check(f'Stepwise is the best init for plain recursive, B={b}', best == 'stepwise',
            ', '.join(f'{k} {v:.1f}' for k, v in inits.items()))
    reduced = [k for k in ppl if k.startswith('reduced') and f'B={b} size' in k]
    if reduced and f'recursive B={b} stepwise' in ppl:
      check(f'Recursive (B={b}, stepwise) beats the reduced-size model of the same size',
            ppl[f'recursive B={b} stepwise'] < ppl[reduced[0]],
            f'{ppl[f"recursive B={b} stepwise"]:.1f} vs {ppl[reduced[0]]:.1f}')
  b = _RELAXED_LOOPS.value
  svd = {r: ppl.get(f'relaxed B={b} average+SVD r={r}') for r in _RANKS.value}
  svd = {k: v for k, v in svd.items() if v is not None}
  zero = ppl.get(f'relaxed B={b} average+zero-init r={_ZERO_RANK.value}')
  if zero is not None and str(_ZERO_RANK.value) in svd:
    check(f'SVD beats zero-init LoRA at r={_ZERO_RANK.value}', svd[str(_ZERO_RANK.value)] < zero,
          f'{svd[str(_ZERO_RANK.value)]:.1f} vs {zero:.1f}')
  if len(svd) > 1:
    values = list(svd.values())
    check('Higher rank gives lower perplexity (rank trades parameters for quality)',
          all(x >= y for x, y in itertools.pairwise(values)), ', '.join(f'r={k} {v:.1f}' for k, v in svd.items()))
  plain = ppl.get(f'recursive B={b} average')
  if plain is not None and svd:
    best_rank = min(svd, key=svd.get)
    check(f'Relaxation (Average+SVD) improves on plain Average recursive, B={b}', svd[best_rank] < plain,
          f'best r={best_rank} {svd[best_rank]:.1f} vs {plain:.1f}')
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main)
