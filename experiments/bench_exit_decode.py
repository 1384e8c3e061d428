r"""Decode speed of early exit: the unrolled step (every loop for every row) against the vmapped while-loop step
(a batch runs as many loops as its deepest row; rrt_jax/serve/vmapped_decode.py), per exit threshold.

  python -m experiments.bench_exit_decode                      # SmolLM2-135M converted to relaxed B=3, and a tiny model
  python -m experiments.bench_exit_decode --models=tiny --batch=4 --steps=4 --repeats=3    # a quick end-to-end run

Per model: --batch prompts of --prompt_len tokens are prefilled once; then, per threshold and decode, --steps
greedy decode steps fed back (generate()'s loop, dispatch included) are timed, jax.block_until_ready at the end,
median of --repeats after a warm-up run (the compilation), the two decodes interleaved. Prints tokens/s of each,
the speed-up, the mean exit loop and the loops the vmapped step ran per step (its deepest row), and checks that
both decodes generated the same tokens.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.convert import to_recursive
from rrt_jax.model import init_cache, init_variables
from rrt_jax.serve.generate import DECODES, ExitConfig, Generator
from rrt_jax.utils.buckets import bucket
from rrt_jax.utils.timing import machine_description
from rrt_jax.utils.xla_cpu import prefer_ynn_dots

_MODELS = flags.DEFINE_list('models', ['tiny', 'smollm2'], 'tiny (random TINY_LLAMA) and/or smollm2 (packaged).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Rows decoded together.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 128, 'Prompt tokens per row (cache context of the steps).')
_STEPS = flags.DEFINE_integer('steps', 16, 'Decode steps per timed run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per measurement (median reported).')
_LOOPS = flags.DEFINE_integer('loops', 3, 'Loops B of the relaxed model.')
_RANK = flags.DEFINE_integer('rank', 64, 'LoRA rank of the relaxed smollm2 (average init + SVD LoRA).')
_TINY_RANK = flags.DEFINE_integer('tiny_rank', 8, 'LoRA rank of the relaxed tiny model.')
_THRESHOLDS = flags.DEFINE_list('thresholds', ['1.0', '0.9', '0.7', '0.5', '0.0'], 'Exit thresholds for smollm2.')
_TINY_THRESHOLDS = flags.DEFINE_list('tiny_thresholds', ['1.0', '0.03', '0.015', '0.0'],
                                     'Exit thresholds for the tiny model (random weights: max_prob ~ 0.015-0.045).')
_CONFIDENCE = flags.DEFINE_enum('confidence', 'max_prob', ['max_prob', 'margin', 'saturation'], 'Exit confidence.')
_KV_FILL = flags.DEFINE_enum('kv_fill', 'propagate', ['propagate', 'full'], 'K/V of skipped loops.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')


def _source(name: str) -> tuple:
  """(cfg, vanilla variables, token ids to cut prompts from)."""
  if name == 'tiny':
    cfg = presets.TINY_LLAMA
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, 16 * _PROMPT_LEN.value).tolist()
    return cfg, init_variables(cfg, RecursionConfig(), jax.random.key(0)), ids
  if name == 'smollm2':
    from rrt_jax.data import austen
    from rrt_jax.pretrained.gguf import load_gguf, load_tokenizer
    cfg, vanilla = load_gguf()
    return cfg, vanilla, load_tokenizer().encode(austen.novels()[0]['Emma']).ids
  raise ValueError(f'Unknown model {name!r}: choose tiny or smollm2.')


def _prefilled(model: Decoder, variables: dict, ids: list[int]) -> tuple:
  """(first tokens [B], positions [B], cache) after prefilling --batch prompts cut from ids."""
  batch, length = _BATCH.value, _PROMPT_LEN.value
  starts = np.random.default_rng(1).integers(0, len(ids) - length, batch)
  prompts = jnp.asarray(np.stack([ids[s:s + length] for s in starts]).astype(np.int32))
  cache = init_cache(model.cfg, model.rec, batch, bucket(length + _STEPS.value))
  lengths = jnp.full(batch, length, jnp.int32)
  token, _, cache = Generator(model).prefill(variables, prompts, lengths, cache, jax.random.key(0))
  return token, lengths, cache


def _run(gen: Generator, variables: dict, start: tuple) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
  """Seconds for --steps decode steps from `start`, and their tokens, exit loops and loops run [steps, B]."""
  tokens, positions, cache = start
  cache = jax.block_until_ready(jax.tree.map(jnp.copy, cache))  # The step donates it.
  keys = jax.random.split(jax.random.key(0), len(positions))  # Greedy: unused.
  out = []
  begin = time.perf_counter()
  for step in range(_STEPS.value):
    tokens, exits, cache, loops = gen.counted_step(variables, tokens, positions + step, cache, keys)
    out.append((tokens, exits, loops))
  jax.block_until_ready(out)
  seconds = time.perf_counter() - begin
  return (seconds,) + tuple(np.stack([np.asarray(o[i]) for o in out]) for i in range(3))


def _measure(model: Decoder, variables: dict, start: tuple, threshold: float) -> dict:
  exit_cfg = ExitConfig(threshold, _CONFIDENCE.value, _KV_FILL.value)
  gens = {d: Generator(model, exit_cfg, decode=d) for d in DECODES}
  results = {d: _run(g, variables, start) for d, g in gens.items()}  # Warm-up: compiles.
  times = {d: [] for d in DECODES}
  for _ in range(_REPEATS.value):
    for d, g in gens.items():
      times[d].append(_run(g, variables, start)[0])
  _, tokens, exits, loops = results['vmapped']
  row = {f'{d}_tokens_per_s': _STEPS.value * _BATCH.value / statistics.median(t) for d, t in times.items()}
  row.update(threshold=threshold, speedup=row['vmapped_tokens_per_s'] / row['unrolled_tokens_per_s'],
             mean_exit_loop=float(exits.mean()), vmapped_loops_per_step=float(loops.max(axis=1).mean()),
             same_tokens=bool((tokens == results['unrolled'][1]).all()))
  return row


def main(argv):
  del argv
  prefer_ynn_dots()  # Before the backend starts (rrt_jax.utils.xla_cpu).
  print(f'# decode benchmark on {machine_description()}: batch {_BATCH.value}, prompt {_PROMPT_LEN.value}, '
        f'{_STEPS.value} steps, median of {_REPEATS.value}, {_CONFIDENCE.value}, kv_fill={_KV_FILL.value}',
        flush=True)
  all_rows = {}
  for name in _MODELS.value:
    cfg, vanilla, ids = _source(name)
    rank = _TINY_RANK.value if name == 'tiny' else _RANK.value
    rec = RecursionConfig(loops=_LOOPS.value, init='average', lora_rank=rank)
    model = Decoder(cfg, rec)
    variables = to_recursive(vanilla, cfg, rec)
    start = _prefilled(model, variables, ids)
    thresholds = _TINY_THRESHOLDS.value if name == 'tiny' else _THRESHOLDS.value
    print(f'\n## {name}: relaxed B={rec.loops} r={rec.lora_rank} ({cfg.num_layers} layers)\n'
          '| threshold | unrolled tok/s | vmapped tok/s | speed-up | mean exit loop | vmapped loops/step | '
          'same tokens |\n|---|---|---|---|---|---|---|', flush=True)
    rows = []
    for threshold in thresholds:
      r = _measure(model, variables, start, float(threshold))
      rows.append(r)
      print(f"| {r['threshold']:g} | {r['unrolled_tokens_per_s']:.1f} | {r['vmapped_tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['mean_exit_loop']:.2f} | {r['vmapped_loops_per_step']:.2f} | "
            f"{r['same_tokens']} |", flush=True)
    all_rows[name] = rows
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'machine': machine_description(), 'results': all_rows}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
