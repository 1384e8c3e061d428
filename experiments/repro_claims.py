"""The paper's claims judged on the reproduction study's per-seed results: a pure judge of "A beats B" in units of
the seeds' pooled std (held / not held / not settled), and the list of claims (Bae et al., ICLR 2025) over the
study's variant grid."""

from __future__ import annotations

import math

import numpy as np

from experiments.repro_grid import NO_EARLY_EXIT, Settings, relaxed_name


def _finite(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def judge(claim: str, better, worse, non_inferiority_std: float | None = None, settled_std: float = 1.0,
          **context) -> dict:
  """A claim 'A is better than B' on per-seed values of a lower-is-better metric: `better` = A's, `worse` = B's.

  difference = mean(B) - mean(A) (> 0: the claim's direction); std = the pooled sample std over seeds,
  sqrt((var(A) + var(B)) / 2) with ddof=1; z = difference / std. Verdict: 'held' where z >= settled_std, 'not
  held' where z <= -settled_std, 'not settled' in between (a difference the seeds' spread can explain: 3 seeds
  cannot order the two); by the sign of the difference where z is undefined. With non_inferiority_std=k ("A is no
  worse than B"): held where difference >= -k * std (difference >= 0 when std is undefined), else not held.
  std and z are None where undefined (one seed; z also where std is 0).

  Every variant of a seed sees the same batches, so the seeds pair the two sides: paired_z = the mean of the
  per-seed differences over their sample std (None unless both sides have the same >= 2 seeds and the
  differences spread). The verdict does not use it; it says how much of the pooled spread is the shared data order."""
  a, b = np.asarray(better, np.float64), np.asarray(worse, np.float64)
  if a.size == 0 or b.size == 0:
    raise ValueError(f'{claim}: both sides need at least one value.')
  diff = float(b.mean() - a.mean())
  std = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if a.size > 1 and b.size > 1 else math.nan
  z = diff / std if std > 0 else math.nan
  paired_z = math.nan
  if a.size == b.size > 1:
    d = b - a
    paired_std = float(d.std(ddof=1))
    paired_z = float(d.mean()) / paired_std if paired_std > 1e-12 * max(1.0, abs(float(d.mean()))) else math.nan
  if non_inferiority_std is not None:
    verdict = 'held' if diff >= (-non_inferiority_std * std if math.isfinite(std) else 0.0) else 'not held'
  elif math.isfinite(z):
    verdict = 'held' if z >= settled_std else 'not held' if z <= -settled_std else 'not settled'
  else:
    verdict = 'held' if diff > 0 else 'not held'
  return {'claim': claim, **context, 'held': verdict == 'held', 'verdict': verdict,
          'better_mean': float(a.mean()), 'worse_mean': float(b.mean()), 'difference': diff, 'std': _finite(std),
          'z': _finite(z), 'paired_z': _finite(paired_z), 'n': [int(a.size), int(b.size)],
          'non_inferiority_std': non_inferiority_std, 'settled_std': settled_std}


def judge_best(claim: str, candidate: str, values: dict[str, list[float]], **context) -> dict:
  """'candidate is the best of values': judged against the runner-up (the lowest mean of the others)."""
  others = {k: v for k, v in values.items() if k != candidate}
  runner_up = min(others, key=lambda k: float(np.mean(others[k])))
  return judge(claim, values[candidate], others[runner_up], better_name=candidate, worse_name=runner_up,
               **context)


def format_claim(c: dict) -> str:
  units = '' if c['z'] is None else f' = {c["z"]:+.1f} std'
  if c.get('paired_z') is not None:
    units += f'; paired over seeds {c["paired_z"]:+.1f}'
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


def claims_text(claims: list[dict]) -> str:
  count = {v: sum(c['verdict'] == v for c in claims) for v in ('held', 'not held', 'not settled')}
  head = (f'Claims of the paper, judged on the last loop\'s bpb after uptraining (loop 1\'s for "makes loop 1 '
          f'usable"); the difference is in units of the pooled std over seeds, and a claim is settled where it '
          f'exceeds one std: of {len(claims)}, {count["held"]} held, {count["not held"]} not held (reversed), '
          f'{count["not settled"]} not settled (within the seeds\' spread).')
  return '\n'.join([head] + [format_claim(c) for c in claims])
