"""Step-level throughput simulator for continuous depth-wise batching (CDB), the paper's own method of evaluation.

The paper (Bae et al., ICLR 2025, Sec. 3.3 and App. K) did not serve with CDB; it timed per-token latencies
(Table K.1) and simulated the schedule. This module does the same: it replays a request stream through a
scheduling policy, charging every engine step with a cost derived from measured stage latencies, and reports
tokens/s, steps and slot utilisation. Nothing is run on a model; the exit loop of every token comes from an
exit trace (sampled from measured exit loops, or drawn from per-loop exit probabilities, seeded). The paper's
tables and the setting that reproduces its headline ratios live in experiments/paper_tables.py.

Names: N_max slots (the max batch; a slot holds one sequence and its KV cache), R loops (the paper's B), loop
r = 1..R; rows are the tokens in one call of a component.

Cost model. Latencies are ms per token at batch 1 and at the memory-bound max batch N_max for the embedding,
one block stage (one loop of the shared block; for the vanilla model the whole transformer) and the head, plus
the total, as in Table K.1. The time of one call of a component on n rows is interpolated linearly between the
two measured points, t(1) = lat_1 and t(N_max) = N_max * lat_max, and extrapolated on the same line past N_max:
  t(n) = t(1) + slope * (n - 1),  slope = max(0, (N_max * lat_max - lat_1) / (N_max - 1)).
Why affine: a decode step is memory-bound, so its time is a fixed part (reading the weights once per step) plus
a part linear in the rows (each row reads its own KV cache and adds its own flops); two measurements fix both.
The slope is clamped at 0 because some rows of K.1 have N_max * lat_max < lat_1 (within measurement noise), and
a step must not get cheaper with more rows. `total - (emb + stage + head)` is charged as a per-call overhead
(sampling, launch; `count_overhead`). A component called on 0 rows costs nothing.

Policies:
- 'none': no batching, one sequence at a time, FIFO; each token runs its exit loop's stages at batch 1.
- 'static': static batching (the "no continuous batching" of the paper's Fig. 3a): up to N_max waiting requests
  form a batch that runs until its last sequence ends; finished sequences and exited tokens leave bubbles.
- 'csb': continuous sequence-wise batching (Orca): slots are synchronised per token; a token round runs stage
  passes until every running token has exited (exited tokens leave bubbles); new requests join at token
  boundaries.
- 'cdb': continuous depth-wise batching: every step runs the shared block once on all occupied slots, each at its
  own loop; an exited token frees its row immediately for the sequence's next token (the autoregressive
  constraint: token t+1 starts only after token t exits, so a sequence has one row in flight), and a finished
  sequence's slot goes to the next waiting request (FIFO) at the next step.
Embedding rows are tokens starting loop 1; head rows are all rows of every stage pass when `head_every_loop`
(the confidence needs the logits after each loop), else only the exiting rows. Engine calls: one per stage pass
for 'cdb' (its whole point is that a call is one loop), one per token round for the others (their loops of a
token can run inside one call); the overhead is charged per call. KV fill of exited tokens
(`kv_fill_rows`): a token that exits after loop r < R still needs the K/V of loops r+1..R for later tokens;
propagating its exit state through those layers' K/V projections costs `kv_fill_rows` extra block rows per
skipped loop, added to the batch of the step in which it exits (default 0: free, i.e. fused/overlapped).
Prefill: K.1 averages (prefill 512 + decode 2048) time over the 2048 output tokens, so the per-token latencies
already include the prefill share; `prefill_rows_per_token` (default 0) adds an explicit prefill pass of
prompt_len * that many block rows when a request is admitted, for latencies that exclude prefill.
"""
from __future__ import annotations

import dataclasses

import numpy as np

POLICIES = ('none', 'static', 'csb', 'cdb')


@dataclasses.dataclass(frozen=True)
class StageLatencies:
  """Milliseconds per token at batch 1 (`_1`) and at the max batch `n_max` (`_max`), as in Table K.1.

  `stage` is one pass of the shared block (one loop); for a vanilla model, the whole transformer. `total_*`
  (optional) is the measured total; its excess over emb + stage + head is a per-call overhead.
  """
  n_max: int
  emb_1: float
  emb_max: float
  stage_1: float
  stage_max: float
  head_1: float
  head_max: float
  total_1: float | None = None
  total_max: float | None = None

  def __post_init__(self):
    if self.n_max < 1:
      raise ValueError(f'n_max must be >= 1, got {self.n_max}.')

  def call_ms(self, component: str, rows: float) -> float:
    """Time of one call of `component` ('emb', 'stage', 'head', 'overhead') on `rows` rows (0 rows: free)."""
    if rows <= 0:
      return 0.0
    if component == 'overhead':
      if self.total_1 is None or self.total_max is None:
        return 0.0
      lat_1 = max(0.0, self.total_1 - self.emb_1 - self.stage_1 - self.head_1)
      lat_max = max(0.0, self.total_max - self.emb_max - self.stage_max - self.head_max)
    else:
      lat_1, lat_max = getattr(self, f'{component}_1'), getattr(self, f'{component}_max')
    slope = max(0.0, (self.n_max * lat_max - lat_1) / (self.n_max - 1)) if self.n_max > 1 else 0.0
    return lat_1 + slope * (rows - 1)

  def scaled(self, factor: float) -> StageLatencies:
    """The same latencies with every time multiplied by `factor` (e.g. a 2-stage split of one model)."""
    times = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != 'n_max'}
    return dataclasses.replace(self, **{k: None if v is None else v * factor for k, v in times.items()})


@dataclasses.dataclass(frozen=True)
class ExitTrace:
  """Where tokens exit. `samples`: measured exit loops (1..loops) resampled i.i.d.; else `exit_probs[r-1]` is
  the probability that a token still running after loop r exits there (r = 1..loops-1; loop `loops` always
  exits). Empty `exit_probs` and `samples`: no early exit."""
  loops: int = 1
  exit_probs: tuple[float, ...] = ()
  samples: tuple[int, ...] = ()
  seed: int = 0

  def __post_init__(self):
    if self.loops < 1:
      raise ValueError(f'loops must be >= 1, got {self.loops}.')
    if len(self.exit_probs) > max(self.loops - 1, 0):
      raise ValueError(f'{len(self.exit_probs)} exit probabilities for {self.loops} loops (at most loops - 1).')
    if any(not 0.0 <= p <= 1.0 for p in self.exit_probs):
      raise ValueError(f'exit probabilities must be in [0, 1], got {self.exit_probs}.')
    if any(not 1 <= s <= self.loops for s in self.samples):
      raise ValueError(f'exit loops must be in 1..{self.loops}.')

  def loop_probs(self) -> np.ndarray:
    """Unconditional probability of exiting at each loop 1..loops."""
    if self.samples:
      return np.bincount(np.asarray(self.samples), minlength=self.loops + 1)[1:] / len(self.samples)
    probs, alive = np.zeros(self.loops), 1.0
    for b, p in enumerate(self.exit_probs):
      probs[b], alive = alive * p, alive * (1 - p)
    probs[-1] += alive
    return probs

  def mean_loops(self) -> float:
    return float(np.dot(np.arange(1, self.loops + 1), self.loop_probs()))

  def draw(self, n: int) -> np.ndarray:
    """n exit loops (int32, 1-based), seeded. Inverse-CDF of one uniform per token, so that with the same seed
    raising an exit probability can only move a token's exit earlier (runs at different rates are coupled)."""
    rng = np.random.default_rng(self.seed)
    if self.samples:
      return rng.choice(np.asarray(self.samples, np.int32), size=n)
    cdf = np.cumsum(self.loop_probs())
    return (np.minimum(np.searchsorted(cdf, rng.random(n), side='right'), self.loops - 1) + 1).astype(np.int32)


def exit_trace(loops: int, exit_rate: float, seed: int = 0) -> ExitTrace:
  """A still-running token exits after each loop before the last with probability `exit_rate`."""
  return ExitTrace(loops=loops, exit_probs=(exit_rate,) * (loops - 1), seed=seed)


@dataclasses.dataclass(frozen=True)
class RequestStream:
  """`num_requests` requests of `prompt_len` prompt tokens and `decode_len` output tokens (uniform in
  [decode_len_min, decode_len] when decode_len_min is set). Arrivals: all at t = 0 when `arrival_rate` is None,
  else a Poisson process of `arrival_rate` requests per second."""
  num_requests: int = 500
  prompt_len: int = 512
  decode_len: int = 2048
  decode_len_min: int | None = None
  arrival_rate: float | None = None
  seed: int = 0

  def sample(self) -> tuple[np.ndarray, np.ndarray]:
    """(arrival times in ms, decode lengths), seeded, arrivals sorted."""
    rng = np.random.default_rng(self.seed)
    n = self.num_requests
    if self.decode_len_min is None:
      lengths = np.full(n, self.decode_len, np.int64)
    else:
      lengths = rng.integers(self.decode_len_min, self.decode_len + 1, size=n)
    if self.arrival_rate is None:
      arrivals = np.zeros(n)
    else:
      arrivals = np.cumsum(rng.exponential(1000.0 / self.arrival_rate, size=n))
    return arrivals, lengths


@dataclasses.dataclass(frozen=True)
class SimConfig:
  policy: str = 'cdb'
  head_every_loop: bool = True  # Head on every row of every stage pass (the exit test needs logits).
  count_overhead: bool = True  # Charge total - (emb + stage + head) once per engine call.
  kv_fill_rows: float = 0.0  # Extra block rows per skipped loop of an exited token (KV propagation).
  prefill_rows_per_token: float = 0.0  # Explicit prefill (0: K.1 latencies already include it).

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f'Unknown policy {self.policy!r}: choose one of {POLICIES}.')


@dataclasses.dataclass(frozen=True)
class SimResult:
  tokens: int  # Generated tokens.
  time_ms: float  # From the first arrival to the last token.
  steps: int  # Stage passes (block calls).
  calls: int  # Engine calls (the overhead is charged per call).
  busy_row_steps: int  # Sum over stage passes of rows doing useful work.
  slot_steps: int  # Sum over stage passes of N_max.
  tokens_per_request: tuple[int, ...]
  mean_latency_ms: float  # Arrival to last token, averaged over requests.

  @property
  def tokens_per_s(self) -> float:
    return 1000.0 * self.tokens / self.time_ms if self.time_ms > 0 else 0.0

  @property
  def utilisation(self) -> float:
    """Fraction of the N_max batch rows that did useful work, over all stage passes."""
    return self.busy_row_steps / self.slot_steps if self.slot_steps else 0.0


def _pass_ms(lat: StageLatencies, cfg: SimConfig, rows: int, exits: int, new: int, fill_rows: float) -> float:
  """One stage pass on `rows` rows, `exits` of which exit and `new` of which start a token."""
  head_rows = rows if cfg.head_every_loop else exits
  return (lat.call_ms('stage', rows + fill_rows) + lat.call_ms('head', head_rows) + lat.call_ms('emb', new))


def _overhead_ms(lat: StageLatencies, cfg: SimConfig, rows: int) -> float:
  return lat.call_ms('overhead', rows) if cfg.count_overhead else 0.0


def _prefill_ms(lat: StageLatencies, cfg: SimConfig, prompt_len: int, loops: int, admitted: int) -> float:
  if cfg.prefill_rows_per_token <= 0 or admitted == 0:
    return 0.0
  return loops * lat.call_ms('stage', admitted * prompt_len * cfg.prefill_rows_per_token)


def simulate(lat: StageLatencies, trace: ExitTrace, stream: RequestStream, cfg: SimConfig) -> SimResult:
  """Replays `stream` under `cfg.policy`; the exit loop of token t of request r is the same for every policy."""
  arrivals, lengths = stream.sample()
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  exits = trace.draw(int(offsets[-1]))
  run = {'none': _run_none, 'static': _run_rounds, 'csb': _run_rounds, 'cdb': _run_cdb}[cfg.policy]
  return run(lat, trace.loops, stream.prompt_len, cfg, arrivals, lengths, offsets, exits)


def _result(tokens_done, finish, arrivals, steps, calls, busy, n_max) -> SimResult:
  return SimResult(tokens=int(tokens_done.sum()), time_ms=float(finish.max() - arrivals.min()), steps=steps,
                   calls=calls, busy_row_steps=int(busy), slot_steps=steps * n_max,
                   tokens_per_request=tuple(int(x) for x in tokens_done),
                   mean_latency_ms=float(np.mean(finish - arrivals)))


def _run_none(lat, loops, prompt_len, cfg, arrivals, lengths, offsets, exits) -> SimResult:
  """One sequence at a time: a token is one call of L_t stage passes at batch 1 (vectorised per request)."""
  token_ms = np.zeros(loops + 1)  # Cost of a token exiting at loop r: r passes at batch 1, one call.
  for exit_loop in range(1, loops + 1):
    fill = cfg.kv_fill_rows * (loops - exit_loop)
    token_ms[exit_loop] = _overhead_ms(lat, cfg, 1) + sum(
        _pass_ms(lat, cfg, 1, int(b == exit_loop), int(b == 1), fill * (b == exit_loop))
        for b in range(1, exit_loop + 1))
  n = len(lengths)
  finish, clock, steps = np.zeros(n), 0.0, 0
  for r in range(n):
    tok = exits[offsets[r]:offsets[r + 1]]
    clock = max(clock, arrivals[r]) + _prefill_ms(lat, cfg, prompt_len, loops, 1) + token_ms[tok].sum()
    finish[r] = clock
    steps += int(tok.sum())
  return _result(lengths.copy(), finish, arrivals, steps, int(lengths.sum()), steps, lat.n_max)


def _run_rounds(lat, loops, prompt_len, cfg, arrivals, lengths, offsets, exits) -> SimResult:
  """'csb' and 'static': synchronised token rounds; a round runs passes until its slowest token exits."""
  n, n_max, joins = len(lengths), lat.n_max, cfg.policy == 'csb'
  slot_req = np.full(n_max, -1)
  done = np.zeros(n, np.int64)
  finish = np.zeros(n)
  clock, nxt, steps, calls, busy = 0.0, 0, 0, 0, 0
  while nxt < n or (slot_req >= 0).any():
    occupied = slot_req >= 0
    if joins or not occupied.any():  # CSB refills at every token boundary, static only when the batch is empty.
      if not occupied.any() and nxt < n:
        clock = max(clock, arrivals[nxt])
      free = np.flatnonzero(~occupied)
      admitted = 0
      while admitted < len(free) and nxt < n and arrivals[nxt] <= clock:
        slot_req[free[admitted]] = nxt
        nxt, admitted = nxt + 1, admitted + 1
      clock += _prefill_ms(lat, cfg, prompt_len, loops, admitted)
    live = slot_req >= 0
    live[live] = done[slot_req[live]] < lengths[slot_req[live]]  # Static: finished sequences are bubbles.
    reqs = slot_req[live]
    tok_exit = exits[offsets[reqs] + done[reqs]]
    for b in range(1, int(tok_exit.max()) + 1):
      rows = int((tok_exit >= b).sum())
      n_exit = int((tok_exit == b).sum())
      fill = cfg.kv_fill_rows * n_exit * (loops - b)
      clock += _pass_ms(lat, cfg, rows, n_exit, rows if b == 1 else 0, fill)
      steps, busy = steps + 1, busy + rows
    clock += _overhead_ms(lat, cfg, len(reqs))
    calls += 1
    done[reqs] += 1
    ended = reqs[done[reqs] == lengths[reqs]]
    finish[ended] = clock
    if joins:
      slot_req[np.isin(slot_req, ended)] = -1
    elif (done[slot_req[slot_req >= 0]] == lengths[slot_req[slot_req >= 0]]).all():
      slot_req[:] = -1
  return _result(done, finish, arrivals, steps, calls, busy, n_max)


def _run_cdb(lat, loops, prompt_len, cfg, arrivals, lengths, offsets, exits) -> SimResult:
  """Every step: one pass of the shared block over all occupied slots, each at its own loop."""
  n, n_max = len(lengths), lat.n_max
  slot_req = np.full(n_max, -1)
  slot_loop = np.zeros(n_max, np.int64)  # Loops already run by the slot's current token.
  slot_exit = np.zeros(n_max, np.int64)  # Exit loop of the slot's current token.
  done = np.zeros(n, np.int64)
  finish = np.zeros(n)
  clock, nxt, steps, busy = 0.0, 0, 0, 0
  while nxt < n or (slot_req >= 0).any():
    occupied = slot_req >= 0
    if not occupied.any() and nxt < n:
      clock = max(clock, arrivals[nxt])
    free = np.flatnonzero(~occupied)
    admitted = 0
    while admitted < len(free) and nxt < n and arrivals[nxt] <= clock:
      s = free[admitted]
      slot_req[s], slot_loop[s], slot_exit[s] = nxt, 0, exits[offsets[nxt]]
      nxt, admitted = nxt + 1, admitted + 1
    clock += _prefill_ms(lat, cfg, prompt_len, loops, admitted)
    live = np.flatnonzero(slot_req >= 0)
    new = int((slot_loop[live] == 0).sum())
    slot_loop[live] += 1
    exiting = live[slot_loop[live] == slot_exit[live]]
    fill = cfg.kv_fill_rows * float((loops - slot_exit[exiting]).sum())
    rows = len(live)
    clock += _pass_ms(lat, cfg, rows, len(exiting), new, fill) + _overhead_ms(lat, cfg, rows)
    steps, busy = steps + 1, busy + rows
    reqs = slot_req[exiting]
    done[reqs] += 1
    ended = done[reqs] == lengths[reqs]
    finish[reqs[ended]] = clock
    slot_req[exiting[ended]] = -1
    cont = exiting[~ended]
    slot_loop[cont] = 0
    slot_exit[cont] = exits[offsets[slot_req[cont]] + done[slot_req[cont]]]
  return _result(done, finish, arrivals, steps, steps, busy, n_max)
