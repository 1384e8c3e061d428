r"""Self-speculative decoding (rrt_jax.serve.speculative) timed against plain greedy no-exit decoding of the
same model, at batch 1 and 4: tokens per second, the speed-up, and the draft's acceptance rate.

  python -m experiments.speculative_bench --pretrained=workdir/main/uptrain    # the main job's relaxed SmolLM2
  python -m experiments.speculative_bench --smollm2                            # SmolLM2 converted, not uptrained
  python -m experiments.speculative_bench --tiny                               # smoke run (random tiny model)

Every configuration generates the same --new_tokens greedy tokens per row (no stop token) for prompts of
--prompt_len tokens cut from held-out Austen text (random ids with --tiny). Rows of the table:
  generate           rrt_jax.serve.generate.generate at threshold 1.0 (no exit): the library's greedy decode, one
                     host round trip per token;
  greedy (on device) speculative_generate with draft_len=0: greedy no-exit decoding in the same on-device loop,
                     so the speculative rows' gain over it is the speculation's alone;
  j loops, k drafts  speculative_generate with draft_loops=j, draft_len=k.
Each is compiled first (a run not timed), then the configurations are interleaved --repeats times and the
median wall time (jax.block_until_ready on the result: the read-out to host lists) is reported. `exact` checks
the tokens equal generate's, token for token.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from rrt_jax.serve.generate import ExitConfig, generate, generator_for
from rrt_jax.serve.speculative import speculative_decoder
from rrt_jax.utils.xla_cpu import prefer_ynn_dots

FLAGS = flags.FLAGS
NO_EXIT = ExitConfig(threshold=1.0)


def _configs(draft_loops: Sequence[int], draft_lens: Sequence[int], loops: int) -> list[tuple[str, int, int]]:
  """(label, draft_loops, draft_len) of every timed configuration but `generate`."""
  out = [('greedy (on device)', 1, 0)]
  out += [(f'{j} loop{"s" if j > 1 else ""}, {k} drafts', j, k) for j in draft_loops if j < loops
          for k in draft_lens if k > 0]
  return out


def speculation_rows(model, variables: dict, prompts: Sequence[Sequence[int]], new_tokens: int,
                     batches: Sequence[int] = (1, 4), draft_loops: Sequence[int] = (1,),
                     draft_lens: Sequence[int] = (2, 4), repeats: int = 3) -> list[dict]:
  """One row per (batch, configuration): median seconds, tokens/s, speed-up over `generate` and over on-device
  greedy, acceptance rate, tokens per round, and whether the tokens equal generate's. prompts: at least
  max(batches) of them; batch b uses the first b."""
  if len(prompts) < max(batches):
    raise ValueError(f'{len(prompts)} prompts for batch {max(batches)}: give at least as many prompts as the '
                     'largest batch.')
  loops = model.rec.loops
  configs = _configs(draft_loops, draft_lens, loops)
  gen = generator_for(model, NO_EXIT)
  rows = []
  for b in batches:
    batch = [list(p) for p in prompts[:b]]
    runs = {'generate': lambda batch=batch: generate(model, variables, batch, new_tokens, exit_cfg=NO_EXIT,
                                                     generator=gen)}
    for label, j, k in configs:
      decoder = speculative_decoder(model, j, k)
      runs[label] = lambda batch=batch, decoder=decoder: decoder(variables, batch, new_tokens)
    outputs = {label: run() for label, run in runs.items()}  # Compiles (not timed).
    times = {label: [] for label in runs}
    for _ in range(repeats):  # Interleaved, so a change of machine load hits every configuration alike.
      for label, run in runs.items():
        start = time.perf_counter()
        run()  # Returns host lists: every device result has been waited for.
        times[label].append(time.perf_counter() - start)
    reference = outputs['generate'].tokens
    seconds = {label: statistics.median(t) for label, t in times.items()}
    tokens = b * new_tokens
    for label in runs:
      out = outputs[label]
      spec = label != 'generate'
      j, k = next(((j, k) for name, j, k in configs if name == label), (loops, 0))
      rows.append({'batch': b, 'config': label, 'draft_loops': j if spec and k else None,
                   'draft_len': k if spec else None, 'seconds': seconds[label],
                   'tokens_per_s': tokens / seconds[label],
                   'speedup_vs_generate': seconds['generate'] / seconds[label],
                   'speedup_vs_greedy_on_device': seconds['greedy (on device)'] / seconds[label],
                   'acceptance_rate': out.acceptance_rate if spec else None,
                   'tokens_per_round': out.tokens_per_round if spec else None,
                   'exact': out.tokens == reference, 'tokens': tokens, 'repeats': repeats})
  return rows


def _f(x, fmt: str) -> str:
  return '–' if x is None else format(x, fmt)


def markdown(rows: list[dict]) -> str:
  lines = ['| batch | decode | tokens/s | × generate | × greedy on device | acceptance | tokens/round | exact |',
           '|---:|---|---:|---:|---:|---:|---:|:---:|']
  for r in rows:
    lines.append(f'| {r["batch"]} | {r["config"]} | {r["tokens_per_s"]:.1f} | {r["speedup_vs_generate"]:.2f} | '
                 f'{r["speedup_vs_greedy_on_device"]:.2f} | {_f(r["acceptance_rate"], ".1%")} | '
                 f'{_f(r["tokens_per_round"], ".2f")} | {"yes" if r["exact"] else "NO"} |')
  return '\n'.join(lines)


def best(rows: list[dict], batch: int) -> dict | None:
  """The fastest exact speculative row at `batch` (None if none)."""
  spec = [r for r in rows if r['batch'] == batch and r['draft_len'] and r['exact']]
  return max(spec, key=lambda r: r['tokens_per_s']) if spec else None


def heldout_prompts(tokenizer, count: int, length: int, book: str = 'Emma') -> list[list[int]]:
  """`count` prompts of `length` tokens cut at fixed random offsets from a held-out Austen novel."""
  from rrt_jax.data import austen
  books, _ = austen.novels()
  ids = tokenizer.encode(books[book]).ids
  starts = np.random.default_rng(0).integers(0, len(ids) - length, count)
  return [ids[s:s + length] for s in starts]


# ---------------------------------------------------------------------------------------------------------- main

def define_flags() -> None:
  """The benchmark's flags (defined by the script only: importing this module defines none, so that
  experiments/small_world.py can use speculation_rows)."""
  f = flags
  f.DEFINE_string('out', 'workdir/speculative_bench', 'Where results.json and results.md go.')
  f.DEFINE_string('pretrained', None, 'A training workdir or rrt_jax.save directory (e.g. the main job\'s '
                  'workdir/main/uptrain), loaded with its tokenizer.')
  f.DEFINE_bool('smollm2', False, 'The packaged SmolLM2-135M converted to relaxed (--loops, Average, --lora_rank; '
                'weight-space SVD, no training) instead of --pretrained.')
  f.DEFINE_integer('loops', 3, 'Loops of the --smollm2 / --tiny relaxed model.')
  f.DEFINE_integer('lora_rank', 64, 'LoRA rank of the --smollm2 relaxed model.')
  f.DEFINE_bool('tiny', False, 'Smoke run: a random tiny relaxed Llama, random prompts, 2 repeats.')
  f.DEFINE_list('batches', ['1', '4'], 'Batch sizes.')
  f.DEFINE_list('draft_loops', ['1'], 'Loops of the draft model (each < the model\'s loops).')
  f.DEFINE_list('draft_lens', ['2', '4'], 'Tokens drafted per round.')
  f.DEFINE_integer('prompt_len', 64, 'Prompt tokens.')
  f.DEFINE_integer('new_tokens', 32, 'Generated tokens per row.')
  f.DEFINE_integer('repeats', 3, 'Interleaved timed repeats (median).')


def _model_and_prompts(count: int):
  """(model, variables, prompts, description)."""
  import jax

  from rrt_jax import Decoder, RecursionConfig, presets
  from rrt_jax.convert import to_recursive
  from rrt_jax.model import init_variables
  if FLAGS.tiny:
    cfg = presets.TINY_LLAMA
    vanilla = init_variables(cfg, RecursionConfig(), jax.random.key(0))
    rec = RecursionConfig(loops=FLAGS.loops, init='average', lora_rank=8)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, FLAGS.prompt_len).tolist() for _ in range(count)]
    return Decoder(cfg, rec), to_recursive(vanilla, cfg, rec), prompts, 'tiny random relaxed Llama'
  from rrt_jax.checkpoint import load_pretrained
  if FLAGS.smollm2 == (FLAGS.pretrained is not None):
    raise app.UsageError('Give --pretrained=<workdir or checkpoint> or --smollm2 (or --tiny).')
  if FLAGS.smollm2:
    loaded = load_pretrained(source='smollm2')
    rec = RecursionConfig(loops=FLAGS.loops, init='average', lora_rank=FLAGS.lora_rank)
    model = Decoder(loaded.model.cfg, rec)
    variables = to_recursive(loaded.variables, loaded.model.cfg, rec)
    what = f'SmolLM2-135M relaxed B={FLAGS.loops} r={FLAGS.lora_rank} (converted, not uptrained)'
  else:
    loaded = load_pretrained(FLAGS.pretrained)
    model, variables = loaded.model, loaded.variables
    what = f'{FLAGS.pretrained} ({loaded.description})'
  return model, variables, heldout_prompts(loaded.tokenizer, count, FLAGS.prompt_len), what


def main(argv):
  del argv
  prefer_ynn_dots()  # Before the backend starts (rrt_jax.utils.xla_cpu).
  from rrt_jax.serve.precision import cast_for_serving
  from rrt_jax.utils.timing import machine_description
  batches = [int(b) for b in FLAGS.batches]
  model, variables, prompts, what = _model_and_prompts(max(batches))
  model, variables = cast_for_serving(model, variables, 'float32')
  command = shlex.join(['python', '-m', 'experiments.speculative_bench'] + sys.argv[1:])
  machine = machine_description()
  print(f'# self-speculation on {machine}: {what}\n# {command}', flush=True)
  rows = speculation_rows(model, variables, prompts, FLAGS.new_tokens, batches,
                          [int(j) for j in FLAGS.draft_loops], [int(k) for k in FLAGS.draft_lens],
                          2 if FLAGS.tiny and not FLAGS['repeats'].present else FLAGS.repeats)
  table = (f'Self-speculative decoding of {what} on {machine}: prompts of {FLAGS.prompt_len} tokens, '
           f'{FLAGS.new_tokens} greedy tokens per row, median of interleaved repeats.\n\nCommand: `{command}`\n\n'
           + markdown(rows))
  print('\n' + table, flush=True)
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'results.json'), 'w') as f:
    json.dump({'machine': machine, 'command': command, 'model': what, 'rows': rows}, f, indent=1)
  with open(os.path.join(FLAGS.out, 'results.md'), 'w') as f:
    f.write(table + '\n')
  if not all(r['exact'] for r in rows):
    raise SystemExit('Some decode did not reproduce generate\'s tokens: see the "exact" column.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
