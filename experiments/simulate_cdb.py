r"""Throughput of continuous depth-wise batching, simulated as in the paper (rrt_jax.serve.simulator with the
paper's tables of experiments/paper_tables.py).

  python -m experiments.simulate_cdb --workdir=workdir/simulate_cdb
  python -m experiments.simulate_cdb --workdir=/tmp/sim --latencies=measured.json --nopaper

Paper part: simulates the paper's headline Gemma table from its Table K.1 latencies under the assumptions of
`PaperSetting` and prints ours vs the paper's ratios as markdown, the ratio against the exit rate for every B = 2
row, the exit rate each relaxed row would need to match the paper, and the alternative readings that do not
reproduce it. Measured part (--latencies): the same comparison with our own stage latencies and exit trace,
a JSON file {"vanilla": {StageLatencies fields}, "recursive": {...}, "exit_loops": [1, 2, ...], "loops": B}
("loops" defaults to max(exit_loops)). Writes simulate_cdb.json and simulate_cdb.png into --workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from experiments.paper_tables import (
  PAPER_TABLE,
  PaperSetting,
  exit_rate_for_ratio,
  paper_row,
  reproduce_paper,
  run_policy,
)
from rrt_jax.serve.simulator import ExitTrace, RequestStream, SimConfig, StageLatencies, exit_trace

_WORKDIR = flags.DEFINE_string('workdir', 'workdir/simulate_cdb', 'Where the JSON and the plot go.')
_LATENCIES = flags.DEFINE_string('latencies', '', 'JSON of our measured stage latencies and exit loops.')
_PAPER = flags.DEFINE_bool('paper', True, 'Simulate the paper table from Table K.1.')
_IMPLIED = flags.DEFINE_bool('implied', True, 'Solve for the exit rate each paper CDB row needs (slow part).')
_EXIT_RATES = flags.DEFINE_list('exit_rates', ['0', '0.2', '0.4', '0.6', '0.8', '0.9', '0.95', '1'],
                                'Exit rates of the sweep.')
_EXIT_RATE = flags.DEFINE_float('exit_rate', PaperSetting.exit_rate, 'P(exit after loop 1) for the paper table.')
_NUM_REQUESTS = flags.DEFINE_integer('num_requests', PaperSetting.stream.num_requests, 'Requests in the stream.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', PaperSetting.stream.prompt_len, 'Prompt tokens per request.')
_DECODE_LEN = flags.DEFINE_integer('decode_len', PaperSetting.stream.decode_len, 'Max output tokens per request.')
_DECODE_LEN_MIN = flags.DEFINE_integer('decode_len_min', PaperSetting.stream.decode_len_min,
                                       'Output lengths are uniform in [this, decode_len] (-1: all decode_len).')
_ARRIVAL_RATE = flags.DEFINE_float('arrival_rate', 0.0, 'Poisson requests/s (0: all arrive at once).')
_BASELINE = flags.DEFINE_enum('baseline', PaperSetting.baseline, ['none', 'static'], 'What the paper\'s "none" is.')
_HEAD_EVERY_LOOP = flags.DEFINE_bool('head_every_loop', PaperSetting.sim.head_every_loop, 'Head on every pass.')
_COUNT_OVERHEAD = flags.DEFINE_bool('count_overhead', PaperSetting.sim.count_overhead,
                                    'Charge total - (emb + stage + head) per engine call.')
_KV_FILL_ROWS = flags.DEFINE_float('kv_fill_rows', PaperSetting.sim.kv_fill_rows,
                                   'Block rows per skipped loop of an exited token (KV propagation).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the request stream and the exit trace.')


def setting_from_flags() -> PaperSetting:
  stream = RequestStream(num_requests=_NUM_REQUESTS.value, prompt_len=_PROMPT_LEN.value,
                         decode_len=_DECODE_LEN.value,
                         decode_len_min=None if _DECODE_LEN_MIN.value < 0 else _DECODE_LEN_MIN.value,
                         arrival_rate=_ARRIVAL_RATE.value or None, seed=_SEED.value)
  costs = SimConfig(head_every_loop=_HEAD_EVERY_LOOP.value, count_overhead=_COUNT_OVERHEAD.value,
                  kv_fill_rows=_KV_FILL_ROWS.value)
  return PaperSetting(stream=stream, sim=costs, exit_rate=_EXIT_RATE.value, baseline=_BASELINE.value, seed=_SEED.value)


def row_name(params_b: float, loops: int, rank: int) -> str:
  return 'vanilla' if loops == 1 else f'B={loops}' + (f' r={rank}' if rank else '')


def paper_part(setting: PaperSetting, rates: list[float]) -> dict:
  rows = reproduce_paper(setting)
  print(f'\n## Paper headline table (Gemma, Table K.1 latencies), exit rate {setting.exit_rate}, '
        f'"none" = {setting.baseline}\n')
  print('| N-emb | model | batching | exit | ours tok/s | ours ratio | paper tok/s | paper ratio | util. | steps |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['params_b']:.2f}B | {row_name(r['params_b'], r['loops'], r['rank'])} | {r['batching']} | "
          f"{'yes' if r['exit'] else 'no'} | {r['tokens_per_s']:.0f} | x{r['ratio']:.2f} | "
          f"{r['paper_tokens_per_s']:.0f} | x{r['paper_ratio']:.2f} | {r['utilisation']:.2f} | {r['steps']} |")

  # Sweep: CDB of every B = 2 row against the vanilla baseline, as the exit rate moves.
  vanilla = paper_row('gemma', 1).lat
  base = run_policy(vanilla, exit_trace(1, 0.0), 'none', setting).tokens_per_s
  csb = run_policy(vanilla, exit_trace(1, 0.0), 'csb', setting).tokens_per_s
  cdb_rows = [r for r in PAPER_TABLE if r.batching == 'cdb']
  sweep = {row_name(r.params_b, r.loops, r.rank): [
      run_policy(paper_row('gemma', r.loops, r.rank).lat, exit_trace(r.loops, p, setting.seed), 'cdb',
                 setting).tokens_per_s / base for p in rates] for r in cdb_rows}
  print(f'\n## CDB throughput / vanilla "none" against the exit rate (vanilla CSB: x{csb / base:.2f})\n')
  print('| model | ' + ' | '.join(f'p={p:g}' for p in rates) + ' | paper |')
  print('|---|' + '---|' * (len(rates) + 1))
  for r in cdb_rows:
    name = row_name(r.params_b, r.loops, r.rank)
    print(f'| {name} | ' + ' | '.join(f'x{x:.2f}' for x in sweep[name]) + f' | x{r.ratio:.2f} |')

  implied = {}
  if _IMPLIED.value:
    print('\n## Exit rate each CDB row needs to match the paper (bisection)\n')
    print('| model | paper ratio | paper acc. | exit rate needed | mean loops |')
    print('|---|---|---|---|---|')
    for r in cdb_rows:
      p = exit_rate_for_ratio(paper_row('gemma', r.loops, r.rank).lat, r.loops, r.ratio * base, setting)
      implied[row_name(r.params_b, r.loops, r.rank)] = p
      print(f'| {row_name(r.params_b, r.loops, r.rank)} | x{r.ratio:.2f} | {r.accuracy} | {p:.3f} | {2 - p:.3f} |')

  # Readings that do not reproduce the paper, for the record.
  rec = paper_row('gemma', 2).lat
  sequential = dataclasses.replace(setting, baseline='none')
  one_at_a_time = run_policy(vanilla, exit_trace(1, 0.0), 'none', sequential).tokens_per_s
  fixed = dataclasses.replace(setting, stream=dataclasses.replace(setting.stream, decode_len_min=None))
  fixed_ratio = (run_policy(vanilla, exit_trace(1, 0.0), 'csb', fixed).tokens_per_s
                 / run_policy(vanilla, exit_trace(1, 0.0), 'none', fixed).tokens_per_s)
  overhead = dataclasses.replace(setting, sim=dataclasses.replace(setting.sim, count_overhead=True))
  overhead_max = (run_policy(rec, exit_trace(2, 1.0), 'cdb', overhead).tokens_per_s
                  / run_policy(vanilla, exit_trace(1, 0.0), 'none', overhead).tokens_per_s)
  cdb_paper = rows[2]['tokens_per_s']
  alternatives = {
      'none_one_at_a_time_tokens_per_s': one_at_a_time,
      'cdb_over_one_at_a_time': cdb_paper / one_at_a_time,
      'csb_over_one_at_a_time': csb / one_at_a_time,
      'csb_over_static_fixed_length': fixed_ratio,
      'cdb_over_static_with_overhead_all_exit_at_loop_1': overhead_max,
  }
  print('\n## Readings that do not reproduce the paper\n')
  print(f'- "none" = one sequence at a time: {one_at_a_time:.1f} tok/s, so CSB x{csb / one_at_a_time:.0f} and '
        f'CDB x{cdb_paper / one_at_a_time:.0f} (paper x1.41, x2.66).')
  print(f'- Every output 2048 tokens long: CSB / static = x{fixed_ratio:.2f} (static batching loses nothing).')
  print(f'- Charging Total - (emb + stage + head) per call: CDB / none <= x{overhead_max:.2f} even when every token '
        'exits after loop 1.')
  return {'rows': rows, 'exit_rates': rates, 'sweep': sweep, 'csb_ratio': csb / base, 'implied_exit_rate': implied,
          'alternatives': alternatives}


def load_measured(path: str) -> tuple[StageLatencies, StageLatencies, ExitTrace]:
  with open(path) as f:
    data = json.load(f)
  exits = tuple(int(x) for x in data['exit_loops'])
  loops = int(data.get('loops', max(exits)))
  return (StageLatencies(**data['vanilla']), StageLatencies(**data['recursive']),
          ExitTrace(loops=loops, samples=exits, seed=_SEED.value))


def measured_part(setting: PaperSetting, rates: list[float]) -> dict:
  vanilla, rec, trace = load_measured(_LATENCIES.value)
  runs = {
      'vanilla none (one at a time)': run_policy(vanilla, exit_trace(1, 0.0), 'none',
                                                 dataclasses.replace(setting, baseline='none')),
      'vanilla static': run_policy(vanilla, exit_trace(1, 0.0), 'static', setting),
      'vanilla csb': run_policy(vanilla, exit_trace(1, 0.0), 'csb', setting),
      'recursive csb, no exit': run_policy(rec, exit_trace(trace.loops, 0.0), 'csb', setting),
      'recursive csb + exit': run_policy(rec, trace, 'csb', setting),
      'recursive cdb, no exit': run_policy(rec, exit_trace(trace.loops, 0.0), 'cdb', setting),
      'recursive cdb + exit': run_policy(rec, trace, 'cdb', setting),
  }
  base = runs['vanilla static'].tokens_per_s
  print(f'\n## Measured latencies ({_LATENCIES.value}), B = {trace.loops}, mean exit loop '
        f'{trace.mean_loops():.3f}\n')
  print('| run | tok/s | vs vanilla static | util. | steps |')
  print('|---|---|---|---|---|')
  for name, res in runs.items():
    print(f'| {name} | {res.tokens_per_s:.1f} | x{res.tokens_per_s / base:.2f} | {res.utilisation:.2f} | '
          f'{res.steps} |')
  sweep = [run_policy(rec, exit_trace(trace.loops, p, setting.seed), 'cdb', setting).tokens_per_s / base
           for p in rates]
  return {'runs': {k: {'tokens_per_s': v.tokens_per_s, 'steps': v.steps, 'utilisation': v.utilisation,
                       'mean_latency_ms': v.mean_latency_ms} for k, v in runs.items()},
          'mean_exit_loop': trace.mean_loops(), 'exit_rates': rates, 'sweep': sweep}


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if 'paper' in results:
    paper = results['paper']
    for (name, ys), row, color in zip(paper['sweep'].items(), [r for r in PAPER_TABLE if r.batching == 'cdb'],
                                      plt.cm.viridis([0.0, 0.25, 0.5, 0.7, 0.9]), strict=True):
      ax.plot(paper['exit_rates'], ys, 'o-', color=color, label=f'K.1 {name} CDB (paper x{row.ratio:.2f})')
      ax.axhline(row.ratio, color=color, ls=':', lw=1)
    ax.axhline(paper['csb_ratio'], color='gray', ls='--', label=f"vanilla CSB (ours x{paper['csb_ratio']:.2f})")
  if 'measured' in results:
    ax.plot(results['measured']['exit_rates'], results['measured']['sweep'], 's-', color='crimson',
            label='measured recursive CDB')
  ax.set_xlabel('exit rate (P[token exits after loop 1])')
  ax.set_ylabel('throughput / vanilla "none"')
  ax.set_title('Continuous depth-wise batching, simulated (dotted: paper)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  setting = setting_from_flags()
  rates = [float(x) for x in _EXIT_RATES.value]
  os.makedirs(_WORKDIR.value, exist_ok=True)
  results = {'setting': dataclasses.asdict(setting)}
  if _PAPER.value:
    results['paper'] = paper_part(setting, rates)
  if _LATENCIES.value:
    results['measured'] = measured_part(setting, rates)
  with open(os.path.join(_WORKDIR.value, 'simulate_cdb.json'), 'w') as f:
    json.dump(results, f, indent=2)
  plot(results, os.path.join(_WORKDIR.value, 'simulate_cdb.png'))
  print(f'\nWrote {_WORKDIR.value}/simulate_cdb.json and simulate_cdb.png')


if __name__ == '__main__':
  app.run(main)
