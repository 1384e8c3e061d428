"""The variant grid of the reproduction study (experiments/repro_study.py): its resolved settings, and every
model it trains with the name the tables, claims and stage files know it by."""

from __future__ import annotations

import dataclasses


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
