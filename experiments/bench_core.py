r"""Core speed benchmark: recursive vs vanilla model of the same depth and width, and compile time vs B.

  python -m experiments.bench_core --preset=smollm2_135m --batch=2 --seq=256

Prints ratios measured in one run (median of --repeats): jitted forward and train step (loss, grads and an
AdamW update) of the recursive model with B = 2, 3 (with and without LoRA) against the vanilla model, and
the compile time of a K-layer block looped B = 1..8 times (constant if the loop is a scan).
"""

from __future__ import annotations

import json
import statistics

import jax
import optax
from absl import app, flags

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.model import init_variables
from rrt_jax.train.simple_step import train_step_fn
from rrt_jax.utils.timing import compile_seconds, machine_description, median_seconds

_PRESET = flags.DEFINE_string('preset', 'smollm2_135m', 'Model shape (random weights).')
_BATCH = flags.DEFINE_integer('batch', 2, 'Sequences per batch.')
_SEQ = flags.DEFINE_integer('seq', 256, 'Tokens per sequence.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per measurement (median reported).')
_LOOPS = flags.DEFINE_list('loops', ['2', '3'], 'Loop counts B to compare with the vanilla model.')
_LORA_RANK = flags.DEFINE_integer('lora_rank', 64, 'Rank of the relaxed variants (0 = skip them).')
_COMPILE_LOOPS = flags.DEFINE_list('compile_loops', ['1', '2', '4', '8'], 'B values for the compile-time sweep.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')


def build(cfg, rec, tokens) -> dict:
  """Compiles the forward and the train step of one variant; returns callables with their inputs bound."""
  model = Decoder(cfg, rec)
  variables = init_variables(cfg, rec, jax.random.key(0))
  fwd_compile, fwd = compile_seconds(lambda v, t: model.apply(v, t)[0], variables, tokens)
  optimizer = optax.adamw(1e-4)
  opt_state = optimizer.init(variables)
  step_compile, step = compile_seconds(train_step_fn(model, optimizer), variables, opt_state, tokens)
  return {'forward': lambda: fwd(variables, tokens), 'train_step': lambda: step(variables, opt_state, tokens),
          'forward_compile_s': fwd_compile, 'train_step_compile_s': step_compile,
          'params': sum(x.size for x in jax.tree.leaves(variables))}


def interleaved_medians(built: dict, key: str, repeats: int) -> dict:
  """Median seconds of built[name][key]() per variant, timing the variants round-robin so that machine
  noise (other jobs, frequency changes) spreads over all of them instead of biasing one."""
  for b in built.values():
    jax.block_until_ready(b[key]())  # Warm-up.
  times = {name: [] for name in built}
  for _ in range(repeats):
    for name, b in built.items():
      times[name].append(median_seconds(b[key], repeats=1, warmup=0))
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv):
  del argv
  cfg = presets.get(_PRESET.value)
  tokens = jax.random.randint(jax.random.key(1), (_BATCH.value, _SEQ.value + 1), 0, cfg.vocab_size)
  print(f'# {machine_description()}; {_PRESET.value}, batch {_BATCH.value} x seq {_SEQ.value}, '
        f'median of {_REPEATS.value}')
  variants = [('vanilla', RecursionConfig())]
  for b in map(int, _LOOPS.value):
    variants.append((f'recursive B={b}', RecursionConfig(loops=b)))
    if _LORA_RANK.value:
      variants.append((f'relaxed B={b} r={_LORA_RANK.value}', RecursionConfig(loops=b, lora_rank=_LORA_RANK.value)))
  built = {name: build(cfg, rec, tokens) for name, rec in variants}
  forward = interleaved_medians(built, 'forward', _REPEATS.value)
  train_step = interleaved_medians(built, 'train_step', _REPEATS.value)
  results = {name: {'forward_s': forward[name], 'train_step_s': train_step[name],
                    **{k: v for k, v in b.items() if k not in ('forward', 'train_step')}}
             for name, b in built.items()}
  del built
  base = results['vanilla']
  print(f'{"model":<24}{"params":>12}{"fwd ms":>10}{"fwd/van":>9}{"step ms":>10}{"step/van":>10}'
        f'{"compile s":>11}')
  for name, r in results.items():
    print(f'{name:<24}{r["params"]:>12,}{1e3 * r["forward_s"]:>10.1f}{r["forward_s"] / base["forward_s"]:>9.2f}'
          f'{1e3 * r["train_step_s"]:>10.1f}{r["train_step_s"] / base["train_step_s"]:>10.2f}'
          f'{r["train_step_compile_s"]:>11.2f}')

  # Compile time vs B for a fixed K-layer block: depth grows B-fold, the compiled program must not.
  k = cfg.num_layers // max(map(int, _COMPILE_LOOPS.value))
  k = max(k, 1)
  print(f'\n# compile time of a {k}-layer shared block looped B times (train step, s)')
  compile_times = {}
  for b in map(int, _COMPILE_LOOPS.value):
    c = cfg.replace(num_layers=k * b)
    rec = RecursionConfig(loops=b, lora_rank=_LORA_RANK.value or None)
    model = Decoder(c, rec)
    variables = init_variables(c, rec, jax.random.key(0))
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(variables)
    compile_times[b], _ = compile_seconds(train_step_fn(model, optimizer), variables, opt_state, tokens)
    print(f'B={b:<3} depth={k * b:<4} compile {compile_times[b]:.2f} s')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'machine': machine_description(), 'results': results, 'compile_vs_loops': compile_times}, f,
                indent=2)


if __name__ == '__main__':
  app.run(main)
