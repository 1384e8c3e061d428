"""Throughput simulator (rrt_jax.serve.simulator): scheduling invariants, and the paper's headline ratios from its
tables (experiments/paper_tables.py)."""

import dataclasses

import numpy as np
import pytest

from experiments.paper_tables import TABLE_K1, PaperSetting, paper_row, run_policy
from rrt_jax.serve.simulator import POLICIES, ExitTrace, RequestStream, SimConfig, StageLatencies, exit_trace, simulate

# Small, fast setting: 8 slots, 40 requests of 16..64 tokens; latencies shaped like K.1 (fixed + per-row part).
LAT = StageLatencies(n_max=8, emb_1=0.08, emb_max=0.02, stage_1=10.0, stage_max=1.5, head_1=0.8, head_max=0.15,
                     total_1=12.0, total_max=1.9)
STREAM = RequestStream(num_requests=40, prompt_len=16, decode_len=64, decode_len_min=16, seed=3)
POISSON = dataclasses.replace(STREAM, arrival_rate=20.0)

# The paper's x2.66 and x1.41 (Sec. 6.4) must come out of the simulation within this relative tolerance.
PAPER_TOLERANCE = 0.03


def test_paper_headline_ratios():
  setting = PaperSetting()
  vanilla, rec = paper_row('gemma', 1).lat, paper_row('gemma', 2).lat
  none = run_policy(vanilla, exit_trace(1, 0.0), 'none', setting).tokens_per_s
  csb = run_policy(vanilla, exit_trace(1, 0.0), 'csb', setting).tokens_per_s
  cdb = run_policy(rec, exit_trace(2, setting.exit_rate, setting.seed), 'cdb', setting).tokens_per_s
  assert csb / none == pytest.approx(1.41, rel=PAPER_TOLERANCE)
  assert cdb / none == pytest.approx(2.66, rel=PAPER_TOLERANCE)


def test_table_k1_complete():
  keys = {(r.model, r.loops, r.rank) for r in TABLE_K1}
  assert len(TABLE_K1) == len(keys) == 23
  for r in TABLE_K1:  # Total covers its parts at batch 1 (the rest is per-call overhead).
    assert r.lat.total_1 >= r.lat.emb_1 + r.lat.stage_1 + r.lat.head_1


def test_interpolation_hits_measured_points():
  assert LAT.call_ms('stage', 0) == 0.0
  assert LAT.call_ms('stage', 1) == pytest.approx(LAT.stage_1)
  assert LAT.call_ms('stage', LAT.n_max) == pytest.approx(LAT.n_max * LAT.stage_max)
  # K.1's vanilla transformer has 111 * 0.188 < 20.937: the slope is clamped, a bigger batch is never cheaper.
  vanilla = paper_row('gemma', 1).lat
  assert vanilla.call_ms('stage', vanilla.n_max) == pytest.approx(vanilla.stage_1)


@pytest.mark.parametrize('stream', [STREAM, POISSON], ids=['at_once', 'poisson'])
@pytest.mark.parametrize('count_overhead', [False, True])
def test_cdb_equals_csb_without_depth(stream, count_overhead):
  cfg = SimConfig(count_overhead=count_overhead)
  cdb = simulate(LAT, ExitTrace(loops=1), stream, dataclasses.replace(cfg, policy='cdb'))
  csb = simulate(LAT, ExitTrace(loops=1), stream, dataclasses.replace(cfg, policy='csb'))
  assert cdb.time_ms == pytest.approx(csb.time_ms)
  assert (cdb.steps, cdb.busy_row_steps, cdb.tokens_per_request) == (csb.steps, csb.busy_row_steps,
                                                                      csb.tokens_per_request)


@pytest.mark.parametrize('loops', [2, 3])
def test_cdb_throughput_monotone_in_exit_rate(loops):
  tps = [simulate(LAT, exit_trace(loops, p, seed=1), STREAM, SimConfig(policy='cdb')).tokens_per_s
         for p in np.linspace(0, 1, 6)]
  assert np.all(np.diff(tps) >= 0), tps
  assert tps[-1] > tps[0] * 1.3  # Early exit must actually pay off.


@pytest.mark.parametrize('policy', POLICIES)
@pytest.mark.parametrize('stream', [STREAM, POISSON], ids=['at_once', 'poisson'])
def test_conservation_and_utilisation(policy, stream):
  res = simulate(LAT, exit_trace(2, 0.5, seed=2), stream, SimConfig(policy=policy, kv_fill_rows=0.5))
  _, lengths = stream.sample()
  assert res.tokens_per_request == tuple(int(x) for x in lengths)
  assert res.tokens == int(lengths.sum())
  assert 0.0 < res.utilisation <= 1.0
  assert res.busy_row_steps <= res.slot_steps


def test_depthwise_beats_sequencewise_with_early_exit():
  trace = exit_trace(2, 0.5, seed=4)
  cdb = simulate(LAT, trace, STREAM, SimConfig(policy='cdb'))
  csb = simulate(LAT, trace, STREAM, SimConfig(policy='csb'))
  static = simulate(LAT, trace, STREAM, SimConfig(policy='static'))
  none = simulate(LAT, trace, STREAM, SimConfig(policy='none'))
  assert cdb.tokens_per_s > csb.tokens_per_s >= static.tokens_per_s > none.tokens_per_s
  assert cdb.utilisation > csb.utilisation  # Exited tokens leave bubbles in CSB, not in CDB.


def test_kv_fill_costs_time():
  trace = exit_trace(2, 0.7, seed=5)
  free = simulate(LAT, trace, STREAM, SimConfig(policy='cdb'))
  paid = simulate(LAT, trace, STREAM, SimConfig(policy='cdb', kv_fill_rows=1.0))
  assert paid.tokens_per_s < free.tokens_per_s
  assert paid.steps == free.steps  # Filling K/V adds rows to a step, not steps.


def test_exit_trace_from_samples_and_coupling():
  trace = ExitTrace(loops=3, samples=(1, 1, 2, 3))
  assert trace.loop_probs() == pytest.approx([0.5, 0.25, 0.25])
  assert set(np.unique(trace.draw(1000))) == {1, 2, 3}
  low, high = exit_trace(3, 0.2, seed=7).draw(5000), exit_trace(3, 0.6, seed=7).draw(5000)
  assert np.all(high <= low)  # Same seed: a higher exit rate only moves exits earlier.
  assert exit_trace(2, 0.0).mean_loops() == 2.0 and exit_trace(2, 1.0).mean_loops() == 1.0
  with pytest.raises(ValueError):
    ExitTrace(loops=2, samples=(3,))
  with pytest.raises(ValueError):
    SimConfig(policy='orca')
