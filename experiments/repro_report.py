"""The reproduction study's report: per-seed summaries, the markdown table and setup line, and the plots."""

from __future__ import annotations

import math

import numpy as np

from experiments.repro_grid import Settings


def pretrain_window(logged_steps: int) -> int:
  """Logged pretraining steps averaged for the curve and its end: a tenth (one logged step is one batch)."""
  return max(1, logged_steps // 10)


def uptrain_window(steps: int) -> int:
  """Uptraining steps averaged for the plotted curves and their flatness: an eighth."""
  return max(1, steps // 8)


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
  losses = pre['curve']['loss']
  last = losses[-pretrain_window(len(losses)):]
  final = float(np.mean(last)) / math.log(2) if losses else float('nan')
  return (f'Pretrained --preset={s.preset} ({results["vanilla_params"] / 1e6:.2f} M non-embedding) from scratch: '
          f'{pre["step"]} steps x {pre["tokens_per_step"]} bytes = {pre_tokens:,} tokens{step_s}, final '
          f'training loss {final:.3f} bits/byte (mean of the last {len(last)} logged steps). Uptraining per '
          f'variant and seed: {s.uptrain_steps} steps x '
          f'{s.batch} x {s.seq_len} = {up_tokens:,} tokens ({up_tokens / max(pre_tokens, 1):.1%} of '
          f'pretraining), CE + KD from the pretrained model, aggressive early-exit weights, seeds {list(s.seeds)}. '
          f'Cells: bits per byte (bpb) and perplexity after every loop, mean ± std over seeds; first '
          f'{s.eval_tokens} bytes of each corpus in windows of {s.seq_len}.')


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_pretrain(pre: dict, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  curve = pre['curve']
  bits = np.asarray(curve['loss'], np.float64) / math.log(2)
  window = pretrain_window(len(bits))
  ax.plot(curve['step'], bits, alpha=0.35, label='logged step (one batch)')
  ax.plot(curve['step'], trailing_mean(bits, window), lw=2, label=f'trailing mean of {window} logged steps')
  ax.legend(fontsize=8)
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


def trailing_mean(x_SxT: np.ndarray, window: int) -> np.ndarray:
  """Mean of the last `window` steps (fewer at the start) along the last axis: one batch's loss says more about
  the batch than the model, so flattening shows in a window's mean."""
  c = np.cumsum(x_SxT, axis=-1)
  lagged = np.concatenate([np.zeros_like(c[..., :window]), c[..., :-window]], axis=-1)[..., :c.shape[-1]]
  return (c - lagged) / np.minimum(np.arange(1, c.shape[-1] + 1), window)


def late_drop_share(losses_SxT: np.ndarray) -> float:
  """How far from flat a loss curve ends: the share of its drop (trailing mean over an eighth of the steps, mean
  over seeds; first full window to the end) made in the last quarter of the steps. ~0: flattened; 0.25: still
  falling as fast as on average; nan where the curve did not fall or is too short to tell."""
  losses_SxT = np.asarray(losses_SxT, np.float64)
  steps = losses_SxT.shape[-1]
  window = uptrain_window(steps)
  if steps < 8:
    return math.nan
  smooth = trailing_mean(losses_SxT, window).mean(0)
  total = smooth[window - 1] - smooth[-1]
  return float((smooth[steps - steps // 4 - 1] - smooth[-1]) / total) if total > 0 else math.nan


def flatness_text(results: dict) -> str:
  """One line on whether the uptraining curves flattened (late_drop_share per variant)."""
  share = {r['model']: late_drop_share([x['losses'] for x in r['seeds'].values()]) for r in results['rows']}
  share = {k: v for k, v in share.items() if math.isfinite(v)}
  if not share:
    return 'Uptraining curves: too short to judge their flattening.'
  steepest = sorted(share, key=share.get, reverse=True)[:3]
  return (f'Uptraining curves (trailing mean over an eighth of the steps): the last quarter of the steps made a '
          f'median {np.median(list(share.values())):.0%} of the loss drop (0: flat; 25%: falling at the average '
          f'rate); steepest at the end: ' + ', '.join(f'{k} {share[k]:.0%}' for k in steepest) + '.')


def plot_uptraining(results: dict, path: str) -> None:
  """Training loss per uptraining step, a trailing mean over an eighth of the steps, mean ± std over seeds, one
  panel per group (the no-early-exit ablation dotted next to the relaxed models; its loss weights the exits
  differently, so compare its slope, not level)."""
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
      window = uptrain_window(losses.shape[1])
      smooth = trailing_mean(losses, window)
      mean, std = smooth.mean(0), smooth.std(0)
      steps = np.arange(1, losses.shape[1] + 1)
      ax.plot(steps, mean, label=r['model'], ls=':' if r['group'] == 'no_early_exit' else '-')
      ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel='uptraining step', ylabel=f'loss (CE + KD, exit-weighted), mean of {window} steps', title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
