r"""Evaluate a trained checkpoint at every loop exit: the offline few-shot stand-ins, optionally lm-eval-harness tasks.
`rrt-eval`, or from a checkout `python -m experiments.evaluate`.

  python -m experiments.evaluate --workdir=workdir/main/uptrain                     # DEFAULT_TASKS, every exit
  python -m experiments.evaluate --workdir=/tmp/ckpt --tasks=analogy_semantic --limit=200 --exit_loop=2
  python -m experiments.evaluate --workdir=workdir/main/uptrain --tasks= --lm_eval_tasks=lambada_openai \
      --lm_eval_limit=200                                               # lm-eval's tasks download their data

--workdir is a training workdir (latest readable checkpoint, or --step) or an rrt_jax.save directory; the model's
recorded tokenizer is used. The offline tasks (rrt_jax.eval.fewshot: word analogies, austen_lastword,
opt-in bb_* BIG-bench stand-ins; their data is fetched before the model is loaded)
score every exit in one pass; lm-eval tasks run through lm_eval.simple_evaluate with the registered `rrt_jax`
model (rrt_jax.eval.lm_eval) once per exit, the exits sharing their log-likelihood scores. --exit_loop=N keeps
only exit N. Prints a table (one column per exit) and one JSON line per task; --out writes them all as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags

from rrt_jax.checkpoint import load_pretrained
from rrt_jax.cli import common
from rrt_jax.eval.fewshot import DEFAULT_TASKS, TASKS, Task, evaluate_tasks, load_task

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir or an rrt_jax.save directory.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step of a training workdir (default: the latest).')
_TOKENIZER = flags.DEFINE_string('tokenizer', '', 'A data.tokenizer spec instead of the recorded tokenizer.')
_TASKS = flags.DEFINE_list('tasks', list(DEFAULT_TASKS), f'Offline tasks, from {sorted(TASKS)} (empty: none).')
_SHOTS = flags.DEFINE_integer('shots', 0, 'Solved examples before each item (offline tasks).')
_LIMIT = flags.DEFINE_integer('limit', 100, 'Items per offline task (after a seeded shuffle; 0 = all).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Requests per scoring / generation call.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the item subset and the shots.')
_EXIT_LOOP = flags.DEFINE_integer('exit_loop', 0, 'Only this exit (1-based); 0 = every exit.')
_LM_EVAL_TASKS = flags.DEFINE_list('lm_eval_tasks', [], 'lm-eval-harness task names (needs pip install lm-eval).')
_LM_EVAL_SHOTS = flags.DEFINE_integer('lm_eval_shots', None, 'num_fewshot for the lm-eval tasks (default: theirs).')
_LM_EVAL_LIMIT = flags.DEFINE_integer('lm_eval_limit', None, 'Documents per lm-eval task (default: all).')
_LM_EVAL_INCLUDE = flags.DEFINE_string('lm_eval_include_path', '', 'A folder of extra lm-eval task YAMLs.')
_EXIT_THRESHOLD = flags.DEFINE_float('exit_threshold', 1.0, 'Early-exit threshold of lm-eval generation tasks.')
_OUT = flags.DEFINE_string('out', '', 'Also write every result to this JSON file.')


def exits_to_run(num_exits: int, exit_loop: int) -> list[int]:
  """1-based exits: all of them, or the one asked for."""
  if exit_loop == 0:
    return list(range(1, num_exits + 1))
  if not 1 <= exit_loop <= num_exits:
    raise app.UsageError(f'--exit_loop must be in 1..{num_exits} (this model\'s exits) or 0 (all), got {exit_loop}.')
  return [exit_loop]


def offline_results(loaded, exits: list[int], tasks: list[Task]) -> list[dict]:
  """One row per offline task: {'task', 'kind', 'n', 'num_shots', 'per_exit': {exit: metrics}}."""
  if not tasks:
    return []
  results = evaluate_tasks(loaded.model, loaded.variables, loaded.tokenizer, tasks, _SHOTS.value,
                           _LIMIT.value or None, _BATCH_SIZE.value, _SEED.value)
  rows = []
  for r in results.values():
    row = dataclasses.asdict(r)
    per_loop = row.pop('per_loop')
    rows.append({**row, 'per_exit': {e: per_loop[e - 1] for e in exits}})
  return rows


def lm_eval_results(loaded, exits: list[int]) -> list[dict]:
  """One row per lm-eval task, its metrics at every exit, from lm_eval.simple_evaluate with our model."""
  if not _LM_EVAL_TASKS.value:
    return []
  from rrt_jax.eval import lm_eval as adapter
  adapter.require_lm_eval()
  import lm_eval
  from lm_eval.api.registry import get_model
  from lm_eval.tasks import TaskManager

  lm = get_model(adapter.MODEL_NAME)(model=loaded.model, variables=loaded.variables, tokenizer=loaded.tokenizer,
                                     batch_size=_BATCH_SIZE.value, exit_threshold=_EXIT_THRESHOLD.value)
  lm.description = loaded.description
  manager = TaskManager(include_path=_LM_EVAL_INCLUDE.value) if _LM_EVAL_INCLUDE.value else None
  rows: dict[str, dict] = {}
  for e in exits:
    out = lm_eval.simple_evaluate(model=lm.at_exit(e), tasks=_LM_EVAL_TASKS.value, num_fewshot=_LM_EVAL_SHOTS.value,
                                  limit=_LM_EVAL_LIMIT.value, task_manager=manager, log_samples=False)
    for task, metrics in out['results'].items():
      row = rows.setdefault(task, {'task': task, 'kind': 'lm_eval', 'n': out.get('n-samples', {}).get(task, {})
                                   .get('effective'), 'num_shots': out.get('n-shot', {}).get(task),
                                   'per_exit': {}})
      row['per_exit'][e] = {k.removesuffix(',none'): v for k, v in metrics.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)}
  return list(rows.values())


def table(rows: list[dict], exits: list[int]) -> str:
  """task | n | metric | one column per exit."""
  head = ['task', 'n', 'metric'] + [f'exit {e}' for e in exits]
  lines = [head]
  for row in rows:
    metrics = [m for m in next(iter(row['per_exit'].values())) if not m.endswith('_stderr') and m != 'sample_len']
    for j, metric in enumerate(metrics):
      values = [row['per_exit'].get(e, {}).get(metric) for e in exits]
      lines.append([row['task'] if j == 0 else '', str(row['n']) if j == 0 else '', metric]
                   + ['-' if v is None else f'{v:.4f}' if abs(v) < 1e4 else f'{v:.4g}' for v in values])
  widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def main(argv):
  del argv
  start = time.perf_counter()
  tasks = [load_task(name) for name in _TASKS.value]  # First: a missing data package fails before a slow load.
  loaded = load_pretrained(_WORKDIR.value, step=_STEP.value, tokenizer=_TOKENIZER.value or None)
  rec = loaded.model.rec
  exits = exits_to_run(rec.num_exits, _EXIT_LOOP.value)
  print(f'{loaded.description} loops={rec.loops} looping={rec.looping.value} lora_rank={rec.lora_rank}: '
        f'exits {exits}')
  rows = offline_results(loaded, exits, tasks) + lm_eval_results(loaded, exits)
  if rows:
    print(table(rows, exits))
  for row in rows:
    print(json.dumps(row))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'model': loaded.description, 'exits': exits, 'results': rows}, f, indent=2)
  print(f'{time.perf_counter() - start:.1f} s')


def run() -> None:
  common.run(main)


if __name__ == '__main__':
  run()
