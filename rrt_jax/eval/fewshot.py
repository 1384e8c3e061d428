"""Few-shot scoring by log-likelihood (lm-eval-harness style) at the exit of every loop.

Tasks (real offline data; sources and item counts in BUILD_NOTES.md, "Few-shot scoring"): the word-analogy
multiple-choice tasks of rrt_jax.data.analogies (analogy_semantic, analogy_syntactic; from a pinned wheel the
registry serves), the Austen-LastWord cloze (austen_lastword), and the opt-in BIG-bench stand-ins of
rrt_jax.data.bigbench (bb_wikihow_step, bb_social_iqa, bb_winogrande_objects, bb_winogrande_persons), whose sdist
the registry no longer serves (they need a copy in the data cache). DEFAULT_TASKS are the ones a fresh machine
can fetch.

Each task is split once into evaluation items and a few-shot pool by a stable hash of the item's group (same
question text, same twin pair, ...), so shots never share a group with the scored item. k-shot prompts are
`shot_1 + '\\n\\n' + ... + shot_k + '\\n\\n' + context`, the shots drawn per item by a generator seeded with (seed,
item id): the same item gets the same shots whatever the subset or batch.

Metrics per exit: multiple choice: acc (argmax of the summed continuation log-likelihood) and acc_norm (divided by
the choice's length in characters, as lm-eval); cloze: exact_match (every continuation token is the argmax, i.e.
greedy decoding reproduces the word: lm-eval lambada's acc) and ppl (exp of minus the mean log-likelihood).
The command line is experiments/fewshot.py.

Shapes: B batch (rows of one scoring call), S input length (bucketed), C continuation length (bucketed), D width,
V vocab, E exits (one per loop), N scored requests (every choice of every item).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rrt_jax.data import analogies, bigbench
from rrt_jax.data.multiple_choice import MultipleChoice
from rrt_jax.eval import austen_lastword
from rrt_jax.eval.austen_lastword import Cloze
from rrt_jax.model import Decoder
from rrt_jax.utils.buckets import bucket

MULTIPLE_CHOICE, CLOZE = 'multiple_choice', 'cloze'
TASKS = {**{name: MULTIPLE_CHOICE for name in analogies.TASKS + bigbench.TASKS}, austen_lastword.TASK: CLOZE}
DEFAULT_TASKS = (*analogies.TASKS, austen_lastword.TASK)
POOL_PERCENT = 10  # Of each task's groups, held back as the few-shot pool (never scored).
SHOT_DELIMITER = '\n\n'
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str  # MULTIPLE_CHOICE or CLOZE
  items: list  # Scored items (MultipleChoice or Cloze).
  pool: list  # Few-shot examples; no group in common with `items`.


@dataclasses.dataclass(frozen=True)
class TaskResult:
  task: str
  kind: str
  n: int  # Items scored.
  num_shots: int
  per_loop: list[dict[str, float]]  # One metrics dict per exit (loop), first loop first.


def _in_pool(group: str, percent: int = POOL_PERCENT) -> bool:
  return int(hashlib.sha1(group.encode()).hexdigest(), 16) % 100 < percent


def split_pool(items: Sequence, percent: int = POOL_PERCENT) -> tuple[list, list]:
  """(evaluation items, few-shot pool), split by a stable hash of each item's group."""
  pool = [it for it in items if _in_pool(it.group, percent)]
  return [it for it in items if not _in_pool(it.group, percent)], pool


def load_task(name: str, root: str | None = None) -> Task:
  """A task by name, from the data cache (built on first use)."""
  if name not in TASKS:
    raise ValueError(f'Unknown few-shot task {name!r}: choose from {sorted(TASKS)}.')
  if TASKS[name] == CLOZE:
    items = austen_lastword.load(root)
  else:
    items = analogies.load(name, root) if name in analogies.TASKS else bigbench.load(name, root)
  return Task(name, TASKS[name], *split_pool(items))


def subset(items: Sequence, limit: int | None, seed: int = 0) -> list:
  """The first `limit` items after a seeded shuffle (all of them, shuffled, when limit is None)."""
  order = np.random.default_rng(seed).permutation(len(items))
  return [items[i] for i in order[:limit]]


def _item_seed(seed: int, item_id: str) -> list[int]:
  return [seed, int(hashlib.sha1(item_id.encode()).hexdigest()[:12], 16)]


def fewshot_prefix(item: MultipleChoice | Cloze, pool: Sequence, num_shots: int, seed: int = 0) -> str:
  """`num_shots` solved pool examples (none of the item's group), each followed by the shot delimiter."""
  if num_shots <= 0:
    return ''
  candidates = [ex for ex in pool if ex.group != item.group and ex.id != item.id]
  if len(candidates) < num_shots:
    raise ValueError(f'{item.id}: {num_shots} shots requested but the few-shot pool has only {len(candidates)} '
                     'usable examples: lower num_shots.')
  picks = np.random.default_rng(_item_seed(seed, item.id)).choice(len(candidates), num_shots, replace=False)
  return ''.join(candidates[i].solved() + SHOT_DELIMITER for i in picks)


def _encode(tokenizer, text: str) -> list[int]:
  """Token ids from a `tokenizers.Tokenizer`-like object (encode(text).ids) or one returning a list."""
  out = tokenizer.encode(text)
  return list(getattr(out, 'ids', out))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """lm-eval's split: trailing spaces of the context move to the continuation, context + continuation is encoded
  as one string (so merges across the boundary are as in running text) and split after the context's tokens."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  whole = _encode(tokenizer, context + continuation)
  ctx = _encode(tokenizer, context)
  if not ctx:
    raise ValueError('An empty context has no token to predict the continuation from: give a non-empty context.')
  cont = whole[len(ctx):]
  if not cont:
    raise ValueError(f'Continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}.')
  return ctx, cont


@functools.lru_cache(maxsize=8)
def _scorer(model: Decoder):
  @jax.jit
  def score(variables, tokens_BxS, pos_BxC, targets_BxC, mask_BxC):
    # Same as model.apply(..., all_exits=True) at the gathered positions, without [E, B, S, V] logits in memory.
    hidden_ExBxSxD, _ = model.apply(variables, tokens_BxS, method=Decoder.hidden_states)
    hidden_ExBxCxD = jnp.take_along_axis(hidden_ExBxSxD, pos_BxC[None, :, :, None], axis=2)
    logits_ExBxCxV = model.apply(variables, hidden_ExBxCxD, method=Decoder.logits)
    logp_ExBxCxV = jax.nn.log_softmax(logits_ExBxCxV)
    token_ll_ExBxC = jnp.take_along_axis(logp_ExBxCxV, targets_BxC[None, :, :, None], axis=-1)[..., 0]
    ll_ExB = jnp.sum(token_ll_ExBxC * mask_BxC, axis=-1)
    hit_ExBxC = (jnp.argmax(logits_ExBxCxV, axis=-1) == targets_BxC) | (mask_BxC == 0)
    return ll_ExB, jnp.all(hit_ExBxC, axis=-1)
  return score


def loglikelihoods(model: Decoder, variables: dict, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   batch_size: int = 8, max_length: int | None = None, progress: bool = False,
                   desc: str = 'loglikelihood') -> tuple[np.ndarray, np.ndarray]:
  """(log p(continuation | context) [E, N] float64, greedy [E, N] bool) at every exit, for (context ids,
  continuation ids) requests. Contexts longer than max_length (default: the model's max_seq_len) lose their
  oldest tokens. Requests are sorted by length and padded to power-of-two buckets, rows padded to batch_size,
  so compiled shapes are reused across batches and tasks; right padding never changes the scored positions
  (causal attention)."""
  max_length = max_length or model.cfg.max_seq_len
  rows = []  # (inputs, first scored input position, continuation ids)
  for ctx, cont in requests:
    if len(cont) > max_length:
      raise ValueError(f'A continuation of {len(cont)} tokens does not fit max_length={max_length}.')
    full = list(ctx) + list(cont)
    inputs = full[:-1][-max_length:]  # Truncate from the left: the whole continuation stays scored.
    rows.append((inputs, len(inputs) - len(cont), list(cont)))
  order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), -len(rows[i][2]), i))
  batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  if progress:
    from tqdm import tqdm
    batches = tqdm(batches, desc=desc, unit='batch', leave=False)
  score = _scorer(model)
  ll, greedy = None, None
  for idx in batches:
    # Power-of-two buckets, so batches of nearby lengths share one compiled shape; inputs never exceed max_length.
    seq = min(bucket(max(len(rows[i][0]) for i in idx), MIN_BUCKET), max_length)
    cont_len = bucket(max(len(rows[i][2]) for i in idx), minimum=1)
    tokens = np.zeros((batch_size, seq), np.int32)
    pos, targets = np.zeros((batch_size, cont_len), np.int32), np.zeros((batch_size, cont_len), np.int32)
    mask = np.zeros((batch_size, cont_len), np.float32)
    for r, i in enumerate(idx):
      inputs, start, cont = rows[i]
      tokens[r, :len(inputs)] = inputs
      pos[r, :len(cont)] = np.arange(start, start + len(cont))  # Input positions whose next token is cont.
      targets[r, :len(cont)] = cont
      mask[r, :len(cont)] = 1.0
    out_ll, out_greedy = score(variables, tokens, pos, targets, mask)
    out_ll, out_greedy = np.asarray(out_ll, np.float64), np.asarray(out_greedy)
    if ll is None:
      ll = np.zeros((out_ll.shape[0], len(rows)), np.float64)
      greedy = np.zeros((out_ll.shape[0], len(rows)), bool)
    ll[:, idx], greedy[:, idx] = out_ll[:, :len(idx)], out_greedy[:, :len(idx)]
  if ll is None:
    raise ValueError('No requests to score.')
  return ll, greedy


def _norm_length(item: MultipleChoice, choice: int) -> int:
  # lm-eval divides by the choice's characters; fill-the-blank items score one shared suffix (acc_norm = acc).
  return max(1, len(item.choices[choice]) if item.suffix is None else len(item.suffix))


def multiple_choice_metrics(items: Sequence[MultipleChoice], ll_ExN: np.ndarray) -> list[dict[str, float]]:
  """acc and acc_norm per exit from the log-likelihoods of every item's choices, concatenated in item order."""
  sizes = [len(it.choices) for it in items]
  if ll_ExN.shape[1] != sum(sizes):
    raise ValueError(f'{ll_ExN.shape[1]} log-likelihoods for {sum(sizes)} choices.')
  starts = np.cumsum([0, *sizes])
  out = []
  for ll in ll_ExN:
    acc, acc_norm = [], []
    for it, a, b in zip(items, starts[:-1], starts[1:], strict=True):
      lengths = np.array([_norm_length(it, j) for j in range(len(it.choices))], np.float64)
      acc.append(int(np.argmax(ll[a:b])) == it.gold)
      acc_norm.append(int(np.argmax(ll[a:b] / lengths)) == it.gold)
    out.append({'acc': float(np.mean(acc)), 'acc_norm': float(np.mean(acc_norm))})
  return out


def cloze_metrics(ll_ExN: np.ndarray, greedy_ExN: np.ndarray) -> list[dict[str, float]]:
  return [{'exact_match': float(np.mean(g)), 'ppl': math.exp(-float(np.mean(ll)))}
          for ll, g in zip(ll_ExN, greedy_ExN, strict=True)]


def task_requests(task: Task, items: Sequence, tokenizer, num_shots: int, seed: int = 0
                  ) -> list[tuple[list[int], list[int]]]:
  """Token-id requests of `items` (all choices of each item, in order) with k-shot prefixes from the pool."""
  requests = []
  for item in items:
    prefix = fewshot_prefix(item, task.pool, num_shots, seed)
    requests += [encode_pair(tokenizer, prefix + ctx, cont) for ctx, cont in item.requests()]
  return requests


def evaluate_tasks(model: Decoder, variables: dict, tokenizer, tasks: Sequence[str | Task],
                   num_shots: int | Mapping[str, int] = 0, limit: int | None = None, batch_size: int = 8,
                   seed: int = 0, max_length: int | None = None, root: str | None = None,
                   progress: bool = True) -> dict[str, TaskResult]:
  """Scores each task's first `limit` items (after a seeded shuffle) with `num_shots` shots at every exit.

  tasks: names (see TASKS) or Task objects. num_shots: one count, or {task name: count}.
  Returns {task name: TaskResult} with one metrics dict per loop exit.
  """
  results = {}
  for spec in tasks:
    task = spec if isinstance(spec, Task) else load_task(spec, root)
    shots = num_shots.get(task.name, 0) if isinstance(num_shots, Mapping) else num_shots
    items = subset(task.items, limit, seed)
    requests = task_requests(task, items, tokenizer, shots, seed)
    ll, greedy = loglikelihoods(model, variables, requests, batch_size, max_length, progress,
                                desc=f'{task.name} {shots}-shot')
    if task.kind == MULTIPLE_CHOICE:
      per_loop = multiple_choice_metrics(items, ll)
    elif task.kind == CLOZE:
      per_loop = cloze_metrics(ll, greedy)
    else:
      raise ValueError(f'Task {task.name!r} has kind {task.kind!r}: expected {MULTIPLE_CHOICE!r} or {CLOZE!r}.')
    results[task.name] = TaskResult(task.name, task.kind, len(items), shots, per_loop)
  return results
