"""The paper's serving tables as data, and the simulation setting that reproduces its headline ratios.

Source: Bae et al., "Relaxed Recursive Transformers", ICLR 2025: Table K.1 (App. K: ms per token of the embedding,
one loop of the block, the head and the total, at batch 1 and at the memory-bound max batch; one A100 40GB,
prefix 512, decode 2048, dummy inputs) and the headline Gemma throughput table (vanilla none x1.00, CSB x1.41,
recursive B = 2 CDB + early exit x2.66; B is the paper's name for the loops, R in rrt_jax). The simulator itself
is generic and lives in rrt_jax.serve.simulator; experiments/simulate_cdb.py prints everything below.

The paper's exit policy and arrival settings are not stated; `PaperSetting` holds the simplest assumptions found
under which the ratios come out of the simulation (x1.43 and x2.68):
1. The paper's "none" is static batching, not one sequence at a time: its 1080 tok/s is 24x the 44 tok/s of a
   single stream at 22.6 ms/token, so it batches. One sequence at a time gives CSB x100 instead of x1.41.
2. An offline backlog: 1000 requests (9 x N_max) at t = 0, prompt 512 (K.1's setting; its cost is already in the
   per-token latencies), output lengths uniform in [768, 2048]. With every output 2048 tokens long static
   batching loses nothing to CSB (x1.00); the length spread is what CSB recovers, and mean / max = 0.69 of this
   range gives the paper's x1.41 (it is fitted: [1024, 2048] gives x1.33, [1, 2048] x1.84).
3. Costs: emb + stage + head, head on every row of every pass (the exit test needs the logits), KV fill free,
   no per-call overhead. Charging Total - (emb + stage + head) per CDB call caps CDB at x2.50 even if every
   token exits after loop 1, so the paper cannot have charged it per loop.
4. Exit: a token exits after loop 1 with probability 0.95, i.i.d. (mean 1.05 loops per token). This is forced:
   CDB over vanilla CSB is the ratio of per-token costs at the max batch, 0.199 / (0.100 * loops + 0.001) ms, so
   the paper's x1.88 needs about 1.05 loops per token. Ratio against the exit rate p: x1.41 (p = 0), x2.01
   (0.6), x2.34 (0.8), x2.56 (0.9), x2.68 (0.95), x2.81 (1).
With one shared exit rate the relaxed rows overshoot (r = 64..512: x2.23, x2.19, x2.16, x1.98 vs x2.00, x1.99,
x1.78, x1.59); matching them needs exit rates of 0.83, 0.85, 0.73, 0.70, which fall as the paper's accuracy of
those rows rises (54.0, 54.6, 55.2, 56.2): each relaxed model exits later. Absolute tokens/s are about 3x the
paper's for all three headline rows (a common factor that cancels in the ratios; its source is unknown).
BUILD_NOTES.md ("The paper's throughput table, simulated") records a run.
"""

from __future__ import annotations

import dataclasses

from rrt_jax.serve.simulator import (
  ExitTrace,
  RequestStream,
  SimConfig,
  SimResult,
  StageLatencies,
  exit_trace,
  simulate,
)

# ---- Table K.1 (ms per token, batch 1 / max batch; A100 40GB, prefix 512, decode 2048) ----------------------


@dataclasses.dataclass(frozen=True)
class PaperRow:
  model: str
  params_b: float  # Non-embedding parameters (billions).
  loops: int  # 1 = vanilla.
  rank: int  # LoRA rank (0 = none).
  lat: StageLatencies


def _row(model, params_b, loops, rank, n_max, total, emb, tr, head) -> PaperRow:
  return PaperRow(model, params_b, loops, rank, StageLatencies(
      n_max=n_max, emb_1=emb[0], emb_max=emb[1], stage_1=tr[0], stage_max=tr[1], head_1=head[0], head_max=head[1],
      total_1=total[0], total_max=total[1]))


# model, N-emb (B), loops, rank, max batch, Total, Emb, Transformer (one loop), Head.
TABLE_K1: tuple[PaperRow, ...] = (
    _row('gemma', 1.98, 1, 0, 111, (22.577, 0.207), (0.084, 0.001), (20.937, 0.188), (0.801, 0.010)),
    _row('gemma', 0.99, 2, 0, 123, (13.576, 0.118), (0.079, 0.001), (10.819, 0.091), (0.815, 0.009)),
    _row('gemma', 1.07, 2, 64, 117, (15.372, 0.140), (0.080, 0.001), (12.675, 0.112), (0.813, 0.009)),
    _row('gemma', 1.15, 2, 128, 115, (15.631, 0.141), (0.082, 0.001), (12.899, 0.113), (0.816, 0.010)),
    _row('gemma', 1.30, 2, 256, 111, (15.317, 0.143), (0.079, 0.001), (12.639, 0.115), (0.811, 0.010)),
    _row('gemma', 1.60, 2, 512, 103, (15.379, 0.158), (0.080, 0.001), (12.692, 0.127), (0.807, 0.011)),
    _row('gemma', 0.66, 3, 0, 131, (10.528, 0.087), (0.080, 0.001), (7.411, 0.058), (0.817, 0.010)),
    _row('gemma', 0.74, 3, 64, 123, (11.957, 0.105), (0.081, 0.001), (8.855, 0.075), (0.815, 0.009)),
    _row('gemma', 0.82, 3, 128, 121, (11.898, 0.103), (0.080, 0.001), (8.787, 0.074), (0.816, 0.009)),
    _row('gemma', 0.97, 3, 256, 117, (11.734, 0.106), (0.079, 0.001), (8.654, 0.076), (0.813, 0.009)),
    _row('gemma', 1.27, 3, 512, 107, (11.986, 0.125), (0.080, 0.001), (8.856, 0.090), (0.809, 0.010)),
    _row('tinyllama', 0.97, 1, 0, 1049, (23.898, 0.131), (0.080, 0.000), (22.909, 0.129), (0.189, 0.001)),
    _row('tinyllama', 0.48, 2, 0, 1121, (14.129, 0.070), (0.080, 0.000), (11.846, 0.064), (0.202, 0.001)),
    _row('tinyllama', 0.53, 2, 64, 1105, (14.897, 0.073), (0.080, 0.000), (12.627, 0.068), (0.202, 0.001)),
    _row('tinyllama', 0.58, 2, 128, 1089, (15.090, 0.074), (0.081, 0.000), (12.778, 0.069), (0.205, 0.001)),
    _row('tinyllama', 0.68, 2, 256, 1065, (14.962, 0.076), (0.081, 0.000), (12.659, 0.071), (0.201, 0.001)),
    _row('tinyllama', 0.86, 2, 512, 1017, (15.284, 0.080), (0.083, 0.000), (12.950, 0.075), (0.206, 0.001)),
    _row('pythia', 0.81, 1, 0, 229, (13.341, 0.176), (0.081, 0.000), (12.326, 0.171), (0.239, 0.002)),
    _row('pythia', 0.40, 2, 0, 241, (8.336, 0.121), (0.079, 0.000), (6.303, 0.086), (0.261, 0.002)),
    _row('pythia', 0.44, 2, 64, 233, (10.408, 0.133), (0.081, 0.000), (8.353, 0.097), (0.262, 0.002)),
    _row('pythia', 0.48, 2, 128, 221, (10.426, 0.137), (0.082, 0.000), (8.378, 0.101), (0.259, 0.002)),
    _row('pythia', 0.55, 2, 256, 205, (10.509, 0.151), (0.080, 0.000), (8.471, 0.115), (0.256, 0.002)),
    _row('pythia', 0.70, 2, 512, 165, (11.254, 0.177), (0.080, 0.001), (9.241, 0.139), (0.257, 0.002)),
)


def paper_row(model: str, loops: int, rank: int = 0) -> PaperRow:
  """The Table K.1 row of `model` ("gemma", "tinyllama", "pythia") with `loops` loops and LoRA `rank` (0: none)."""
  for row in TABLE_K1:
    if (row.model, row.loops, row.rank) == (model, loops, rank):
      return row
  raise KeyError(f'No Table K.1 row for {model} B={loops} r={rank}.')


# ---- The paper's headline table and the setting that reproduces it --------------------------------------------


@dataclasses.dataclass(frozen=True)
class PaperThroughput:
  """One row of the paper's headline Gemma throughput table (its CSB / CDB speedups, the abstract's 2-3x)."""
  params_b: float
  loops: int
  rank: int
  batching: str  # 'none' | 'csb' | 'cdb'
  early_exit: bool
  accuracy: float
  tokens_per_s: float
  ratio: float  # vs the vanilla model without batching.


PAPER_TABLE: tuple[PaperThroughput, ...] = (
    PaperThroughput(1.99, 1, 0, 'none', False, 57.3, 1080, 1.00),
    PaperThroughput(1.99, 1, 0, 'csb', False, 57.3, 1528, 1.41),
    PaperThroughput(0.99, 2, 0, 'cdb', True, 54.0, 2877, 2.66),
    PaperThroughput(1.07, 2, 64, 'cdb', True, 54.0, 2157, 2.00),
    PaperThroughput(1.15, 2, 128, 'cdb', True, 54.6, 2149, 1.99),
    PaperThroughput(1.30, 2, 256, 'cdb', True, 55.2, 1921, 1.78),
    PaperThroughput(1.60, 2, 512, 'cdb', True, 56.2, 1719, 1.59),
)


@dataclasses.dataclass(frozen=True)
class PaperSetting:
  """The assumptions under which the simulation reproduces PAPER_TABLE (see the module doc for why)."""
  stream: RequestStream = RequestStream(num_requests=1000, prompt_len=512, decode_len=2048, decode_len_min=768)
  sim: SimConfig = SimConfig(head_every_loop=True, count_overhead=False, kv_fill_rows=0.0)
  exit_rate: float = 0.95  # P(a token exits after loop 1), i.i.d. over tokens.
  baseline: str = 'static'  # What the paper's "none" row is taken to be.
  seed: int = 0  # Exit trace seed.


def run_policy(lat: StageLatencies, trace: ExitTrace, policy: str, setting: PaperSetting) -> SimResult:
  """`simulate` under the setting's stream and costs, with `policy` ('none' maps to the setting's baseline)."""
  policy = setting.baseline if policy == 'none' else policy
  return simulate(lat, trace, setting.stream, dataclasses.replace(setting.sim, policy=policy))


def reproduce_paper(setting: PaperSetting = PaperSetting(), exit_rate: float | None = None) -> list[dict]:
  """Simulates every row of PAPER_TABLE with Table K.1 latencies; ratios are vs our simulated "none" row."""
  rate = setting.exit_rate if exit_rate is None else exit_rate
  rows, base = [], None
  for row in PAPER_TABLE:
    k1 = paper_row('gemma', row.loops, row.rank)
    trace = exit_trace(row.loops, rate if row.early_exit else 0.0, setting.seed)
    res = run_policy(k1.lat, trace, row.batching, setting)
    base = res.tokens_per_s if base is None else base
    rows.append({'params_b': row.params_b, 'loops': row.loops, 'rank': row.rank, 'batching': row.batching,
                 'exit': row.early_exit, 'tokens_per_s': res.tokens_per_s, 'ratio': res.tokens_per_s / base,
                 'paper_tokens_per_s': row.tokens_per_s, 'paper_ratio': row.ratio, 'steps': res.steps,
                 'utilisation': res.utilisation, 'mean_loops': trace.mean_loops()})
  return rows


def exit_rate_for_ratio(lat: StageLatencies, loops: int, target_tokens_per_s: float, setting: PaperSetting,
                        iters: int = 8) -> float:
  """The exit rate at which CDB reaches `target_tokens_per_s` (bisection: throughput rises with the rate under
  the coupled draws of ExitTrace). Returns 0 or 1 when the target lies outside what rates in [0, 1] give."""
  tps = lambda p: run_policy(lat, exit_trace(loops, p, setting.seed), 'cdb', setting).tokens_per_s
  lo, hi = 0.0, 1.0
  if tps(lo) >= target_tokens_per_s:
    return lo
  if tps(hi) <= target_tokens_per_s:
    return hi
  for _ in range(iters):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if tps(mid) < target_tokens_per_s else (lo, mid)
  return (lo + hi) / 2
