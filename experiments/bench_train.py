r"""Training throughput and MFU: recursive/relaxed vs the vanilla model of the same shape, in one run.

  python -m experiments.bench_train --steps=8 --rounds=2

Each variant trains `--steps` steps with the same config (KD from the original model, aggressive early-exit
losses); variants alternate for `--rounds` rounds (ABAB...) and the median tokens/s over logged steps (the
compile step excluded) is reported, with MFU against the measured matmul peak of this machine.
"""

from __future__ import annotations

import json
import statistics
import tempfile

from absl import app, flags

from experiments.configs import smollm2, tiny_cpu
from rrt_jax.train import flops
from rrt_jax.train.loop import train
from rrt_jax.utils.timing import machine_description

_STEPS = flags.DEFINE_integer('steps', 8, 'Steps per variant per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternating rounds.')
_MODELS = flags.DEFINE_list('models', ['tiny', 'smollm2'], 'Which model families to run.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON output.')

VARIANTS = {'vanilla': (1, 0), 'recursive B=3': (3, 0), 'relaxed B=3 r=64': (3, 64)}


def config_for(model: str, loops: int, rank: int, steps: int):
  c = tiny_cpu.get_config() if model == 'tiny' else smollm2.get_config()
  if model == 'tiny':
    c.model.preset = 'tiny_llama'
    c.data.seq_len, c.data.global_batch = 128, 8
  else:
    c.data.seq_len, c.data.global_batch = 128, 4
  c.recursion.loops, c.recursion.lora_rank = loops, rank or None  # (Rank 0 in VARIANTS: no LoRA.)
  c.recursion.init = 'average' if rank else 'stepwise'
  c.recursion.lora_init, c.healing.steps_per_layer = 'svd', 0  # Step time only: no calibration or healing.
  c.loss.kd_weight, c.loss.early_exit = 1.0, 'aggressive'
  c.train.steps, c.log_every, c.checkpoint.every_steps = steps, 1, 0
  c.data.split = 'validation'
  return c


def main(argv):
  del argv
  peak = flops.measured_matmul_peak('float32')
  results = {'machine': machine_description(), 'matmul_peak_flops': peak}
  print(f'# {results["machine"]}; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s', flush=True)
  for model in _MODELS.value:
    samples = {name: {'tokens_per_s': [], 'mfu': []} for name in VARIANTS}
    for _ in range(_ROUNDS.value):
      for name, (loops, rank) in VARIANTS.items():
        with tempfile.TemporaryDirectory() as workdir:
          history = train(config_for(model, loops, rank, _STEPS.value), workdir)
        for h in history[1:]:  # The first logged step includes compilation.
          samples[name]['tokens_per_s'].append(h['tokens_per_s'])
          samples[name]['mfu'].append(h['mfu'])
    base = statistics.median(samples['vanilla']['tokens_per_s'])
    print(f'\n{model}: {"variant":<20}{"tokens/s":>10}{"/ vanilla":>11}{"MFU":>8}')
    for name, s in samples.items():
      tps, mfu = statistics.median(s['tokens_per_s']), statistics.median(s['mfu'])
      results[f'{model}/{name}'] = {'tokens_per_s': tps, 'mfu': mfu, 'ratio_to_vanilla': tps / base}
      print(f'{"":<7}{name:<20}{tps:>10,.0f}{tps / base:>11.2f}{mfu:>8.1%}', flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main)
