r"""Few-shot log-likelihood scoring of the packaged SmolLM2-135M (rrt_jax.eval.fewshot), at every loop's exit:
`rrt-eval`, or from a checkout `python -m experiments.fewshot`.

  rrt-eval --tasks=analogy_syntactic,austen_lastword --shots=0 --limit=200
  rrt-eval --loops=3 --limit=50    # plain recursive conversion (no LoRA): per-loop scores

Prints one JSON line per task (rrt_jax.eval.fewshot.TaskResult) and the wall time.
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import flags

from rrt_jax import Decoder, RecursionConfig
from rrt_jax.cli import common
from rrt_jax.convert import to_recursive
from rrt_jax.eval.fewshot import DEFAULT_TASKS, TASKS, evaluate_tasks, load_task
from rrt_jax.pretrained.gguf import load_gguf, load_tokenizer

_TASKS = flags.DEFINE_list('tasks', list(DEFAULT_TASKS), f'Tasks, from {sorted(TASKS)}.')
_SHOTS = flags.DEFINE_integer('shots', 0, 'Solved examples before each item.')
_LIMIT = flags.DEFINE_integer('limit', 100, 'Items per task (after a seeded shuffle).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Requests per scoring call.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the item subset and the shots.')
_LOOPS = flags.DEFINE_integer('loops', 1, '>1: plain recursive conversion (no LoRA), scored at every loop.')


def main(argv):
  del argv
  tasks = [load_task(name) for name in _TASKS.value]  # First: a missing data package fails before a slow load.
  cfg, variables = load_gguf()
  rec = RecursionConfig(loops=_LOOPS.value)
  if _LOOPS.value > 1:
    variables = to_recursive(variables, cfg, rec)
  start = time.perf_counter()
  results = evaluate_tasks(Decoder(cfg, rec), variables, load_tokenizer(), tasks, _SHOTS.value,
                           _LIMIT.value, _BATCH_SIZE.value, _SEED.value)
  for r in results.values():
    print(json.dumps(dataclasses.asdict(r)))
  print(f'{time.perf_counter() - start:.1f} s')


def run() -> None:
  common.run(main)


if __name__ == '__main__':
  run()
