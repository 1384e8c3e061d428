"""The small world's report (experiments/small_world.py): per-seed summaries, the issue's goals judged, the
markdown table and the plots. Pure functions of the stage results, so a finished workdir can be re-reported."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from experiments.repro_claims import judge
from experiments.repro_report import trailing_mean, uptrain_window

if TYPE_CHECKING:
  from experiments.small_world_settings import Settings


def summarize(row: dict, corpora) -> dict:
  """Mean and std (ddof=1; 0 with one seed) over seeds of every loop's perplexity, per corpus."""
  out = {}
  for corpus in corpora:
    values = np.asarray([r['eval'][corpus]['ppl'] for r in row['seeds'].values()], np.float64)  # [seeds, loops]
    out[corpus] = {'ppl_mean': values.mean(0).tolist(),
                   'ppl_std': (values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])).tolist()}
  return out


def last_loop(row: dict, corpus: str) -> list[float]:
  return [r['eval'][corpus]['ppl'][-1] for _, r in sorted(row['seeds'].items(), key=lambda kv: int(kv[0]))]


GOAL_PPL_RATIO = 1.15  # Students within 1.15x of the teacher's perplexity.
GOAL_CDB = 1.5  # CDB >= 1.5x vanilla + CSB at matched quality.
GOAL_SPECULATION = 1.3  # Self-speculation >= 1.3x at batch 1.


def goals(results: dict, s: Settings) -> list[dict]:
  """Each goal of the issue: {'goal', 'held', 'detail'}."""
  out = []
  pre = results['pretrain']
  tpp = pre['chinchilla']['tokens_per_param']
  out.append({'goal': 'teacher trained compute-optimally (10-20 tokens per non-embedding parameter)',
              'held': 10 <= tpp <= 20, 'detail': f'{tpp:.1f} tokens per parameter'})
  flat = pre['flatness']
  out.append({'goal': f'teacher curve flat (last quarter < {s.flat_share:.0%} of the drop)', 'held': flat['flat'],
              'detail': f'last quarter made {_pct(flat["late_drop_share"])} of the drop'})
  for row in results['rows']:
    flat = row['flatness']
    out.append({'goal': f'{row["model"]}: uptraining curve flat', 'held': flat['flat'],
                'detail': f'last quarter made {_pct(flat["late_drop_share"])} of the drop (mean over seeds)'})
  baselines = [r for r in results['rows'] if r['group'] in ('reduced', 'low_rank')]
  for corpus in s.corpora:
    teacher = results['teacher'][corpus]['ppl'][-1]
    for row in results['rows']:
      if row['group'] not in ('relaxed', 'middle'):
        continue
      ratio = float(np.mean(last_loop(row, corpus))) / teacher
      out.append({'goal': f'{row["model"]} within {GOAL_PPL_RATIO}x of the teacher\'s perplexity [{corpus}]',
                  'held': ratio <= GOAL_PPL_RATIO, 'detail': f'{ratio:.3f}x (teacher {teacher:.2f})'})
      for base in baselines:
        c = judge(f'{row["model"]} beats {base["model"]}', last_loop(row, corpus), last_loop(base, corpus),
                  corpus=corpus, better_name=row['model'], worse_name=base['model'])
        out.append({'goal': f'{row["model"]} beats {base["model"]} beyond the seeds\' std [{corpus}]',
                    'held': c['held'], 'detail': f'{c["better_mean"]:.3f} vs {c["worse_mean"]:.3f}, '
                    f'z = {_f(c["z"], "+.1f")} ({c["verdict"]})', 'judge': c})
  for name, sel in results['serving']['selection'].items():
    if not sel['early_exit_tried']:
      continue
    speedup = sel['speedup_vs_vanilla_csb']
    out.append({'goal': f'{name}: {sel["batching"]} >= {GOAL_CDB}x vanilla + CSB at matched quality',
                'held': bool(sel['early_exit_qualified'] and speedup >= GOAL_CDB),
                'detail': f'{speedup:.2f}x at threshold {sel["threshold"]} (agreement {sel["agreement"]:.0%}, '
                f'perplexity {sel["perplexity_vs_no_exit"]:.3f}x no exit)'})
  for name, rows in results['speculation']['models'].items():
    best = max((r for r in rows if r['batch'] == 1 and r['draft_len'] and r['exact']),
               key=lambda r: r['speedup_vs_generate'], default=None)
    out.append({'goal': f'{name}: self-speculation >= {GOAL_SPECULATION}x at batch 1 (lossless)',
                'held': bool(best and best['speedup_vs_generate'] >= GOAL_SPECULATION),
                'detail': 'no exact row' if best is None else
                f'{best["speedup_vs_generate"]:.2f}x generate ({best["speedup_vs_greedy_on_device"]:.2f}x on-device '
                f'greedy) with {best["draft_len"]} drafts, acceptance {best["acceptance_rate"]:.0%}'})
  return out


def _f(x, fmt: str) -> str:
  return 'n/a' if x is None else format(x, fmt)


def _pct(x) -> str:
  return 'n/a' if x is None else f'{x:.1%}'


def markdown(results: dict, s: Settings) -> str:
  from experiments.speculative_bench import markdown as speculation_table
  pre, tok = results['pretrain'], results['tokenizer']
  ch = pre['chinchilla']
  head = (f'Teacher: {s.preset}, {ch["non_embedding_params"] / 1e6:.2f} M non-embedding parameters '
          f'({ch["embedding_params"] / 1e6:.2f} M embedding), {ch["tokens"] / 1e6:.2f} M tokens '
          f'({ch["tokens_per_param"]:.1f} per parameter, {ch["train_flops"]:.2e} FLOPs), BPE of '
          f'{tok["vocab_size"]} tokens ({tok["bytes_per_token"]:.2f} bytes per token on validation); median '
          f'pretraining step {_f(pre.get("median_step_seconds"), ".2f")} s. Students: {s.uptrain_steps} steps x '
          f'{s.batch} x {s.seq_len} tokens of KD + early-exit uptraining, seeds {list(s.seeds)}.')
  cols = ['model', 'non-emb params'] + [f'{c} ppl per loop (mean ± std)' for c in s.corpora] + ['flat']
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  teacher = [' / '.join(f'{p:.2f}' for p in results['teacher'][c]['ppl']) for c in s.corpora]
  lines.append(f'| teacher | {ch["non_embedding_params"] / 1e6:.3f} M | ' + ' | '.join(teacher) +
               f' | {_pct(pre["flatness"]["late_drop_share"])} |')
  for row in results['rows']:
    cells = [' / '.join(f'{m:.2f}±{d:.2f}' for m, d in zip(row['summary'][c]['ppl_mean'], row['summary'][c]['ppl_std'],
                                                         strict=True)) for c in s.corpora]
    lines.append(f'| {row["model"]} | {row["non_embedding_params"] / 1e6:.3f} M | ' + ' | '.join(cells) +
                 f' | {_pct(row["flatness"]["late_drop_share"])} |')
  table = '\n'.join(lines)
  spec = '\n\n'.join(f'**{name}**\n\n' + speculation_table(rows)
                     for name, rows in results['speculation']['models'].items())
  goal_lines = '\n'.join(f'- {g["goal"]}: **{"HELD" if g["held"] else "NOT HELD"}** ({g["detail"]})'
                         for g in results['goals'])
  return '\n\n'.join([
      head, '## Per-loop held-out perplexity (per BPE token)\n\n"flat": the share of the loss drop made in the last '
      'quarter of the steps (trailing mean; mean over seeds for students).\n\n' + table,
      '## Serving at matched quality (CDB with early exit vs vanilla teacher + CSB, '
      f'{s.serve_slots} slots)\n\n' + results['serving']['markdown'],
      '## Self-speculative decoding (loop 1 drafts, the full depth verifies)\n\n' + spec,
      '## Goals\n\n' + goal_lines])


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_pretrain(pre: dict, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  loss = np.asarray(pre['curve']['loss'], np.float64)
  ax.plot(pre['curve']['step'], loss, alpha=0.35, label='logged step')
  window = uptrain_window(len(loss))
  ax.plot(pre['curve']['step'], trailing_mean(loss, window), lw=2, label=f'trailing mean of {window}')
  ax.set(xlabel='step', ylabel='training loss (nats per token)', title='Teacher pretraining')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_per_loop(results: dict, corpora, path: str) -> None:
  plt = _pyplot()
  rows = results['rows']
  fig, axes = plt.subplots(len(corpora), 1, figsize=(max(7, 1.2 * len(rows) + 2), 4 * len(corpora)), squeeze=False)
  for ax, corpus in zip(axes[:, 0], corpora, strict=True):
    for i, r in enumerate(rows):
      mean, std = r['summary'][corpus]['ppl_mean'], r['summary'][corpus]['ppl_std']
      width = 0.8 / len(mean)
      xs = [i + (k - (len(mean) - 1) / 2) * width for k in range(len(mean))]
      ax.bar(xs, mean, width, yerr=std, capsize=2, color=[f'C{k}' for k in range(len(mean))])
    ax.axhline(results['teacher'][corpus]['ppl'][-1], color='k', ls='--', lw=1, label='teacher')
    ax.axhline(results['teacher'][corpus]['ppl'][-1] * GOAL_PPL_RATIO, color='r', ls=':', lw=1,
               label=f'{GOAL_PPL_RATIO}x teacher')
    ax.set_xticks(range(len(rows)), [r['model'] for r in rows], rotation=30, ha='right', fontsize=7)
    ax.set(ylabel=f'{corpus} perplexity', title=f'{corpus}: per-loop perplexity (bars: loop 1, 2, ...; mean ± std)')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_uptraining(results: dict, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results['rows']:
    losses = np.asarray([x['losses'] for x in r['seeds'].values()], np.float64)
    smooth = trailing_mean(losses, uptrain_window(losses.shape[1]))
    steps = np.arange(1, losses.shape[1] + 1)
    ax.plot(steps, smooth.mean(0), label=r['model'])
    ax.fill_between(steps, smooth.mean(0) - smooth.std(0), smooth.mean(0) + smooth.std(0), alpha=0.2)
  ax.set(xlabel='uptraining step', ylabel='loss (CE + KD, exit-weighted), trailing mean', title='Students')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
