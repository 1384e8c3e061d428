"""Austen-LastWord: a LAMBADA-style last-word cloze built from the held-out Austen split.

Walk each novel's word stream (whitespace collapsed). A candidate target is a sentence-final word ([A-Za-z]{3,}
followed by . ! ? or ;), not a stopword or an abbreviation ('Mrs.'), that also occurs in its context: the 60-160
preceding words (length drawn by a seeded generator). As in LAMBADA the answer is recoverable from the wider
context; unlike LAMBADA no human filtered the items and the in-context rule makes it partly a copying task, hence
the different name. Items never overlap: a target comes at least 160 words after the previous one, and a context
starts after it. Deterministic for a given seed and Austen text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from rrt_jax.data import prepare

TASK = 'austen_lastword'
SPLIT = 'austen'  # The held-out split written by rrt_jax.data.prepare (never in training: see prepare.py).
MIN_CONTEXT, MAX_CONTEXT = 60, 160
DEFAULT_SEED = 1234
FORMAT_VERSION = 1
_CANDIDATE = re.compile(r'([A-Za-z]{3,})[.!?;][\'"\u2019\u201d)]*')

STOPWORDS = frozenset('''
about above after again against all and any are aren't because been before being below between both but can
cannot could did does doing down during each few for from further had has have having her here hers herself him
himself his how into its itself just let more most much must myself nor not now off once only other ought our
ours ourselves out over own same shall she should some such than that the their theirs them themselves then there
these they this those through too under until upon very was were what when where which while who whom why will
with would you your yours yourself yourselves yes one two three well say said indeed quite soon never ever also
thing things nothing something anything everything way time day again may might though although whether
'''.split())
ABBREVIATIONS = frozenset({'mrs', 'messrs', 'esq', 'etc', 'viz', 'capt', 'col', 'gen', 'rev', 'sen', 'hon'})  # 'Mrs. X'
_EXCLUDED = STOPWORDS | ABBREVIATIONS


@dataclasses.dataclass(frozen=True)
class Cloze:
  """Predict `target` (one word) after `context`; `group`: items of one group are never each other's shots."""

  id: str
  group: str
  context: str
  target: str

  def requests(self, delimiter: str = ' ') -> list[tuple[str, str]]:
    return [(self.context, delimiter + self.target)]

  def solved(self, delimiter: str = ' ') -> str:
    return self.context + delimiter + self.target


def build(documents: list[tuple[str, str]], seed: int = DEFAULT_SEED) -> list[Cloze]:
  """Items from (document id, text) pairs, in document order."""
  rng = np.random.default_rng(seed)
  items = []
  for doc_id, text in documents:
    words = text.split()
    start = MAX_CONTEXT  # First index that may be a target: a full context fits after the previous target.
    for i in range(MAX_CONTEXT, len(words)):
      if i < start:
        continue
      m = _CANDIDATE.fullmatch(words[i])
      if m is None or m.group(1).lower() in _EXCLUDED:
        continue
      context = words[i - int(rng.integers(MIN_CONTEXT, MAX_CONTEXT + 1)):i]
      target = m.group(1)
      if not any(re.sub(r'[^A-Za-z]', '', w).lower() == target.lower() for w in context):
        continue
      item_id = f'{TASK}/{doc_id}/{i}'
      items.append(Cloze(item_id, item_id, ' '.join(context), target))
      start = i + 1 + MAX_CONTEXT
  return items


def _split_documents(root: str | None) -> tuple[list[tuple[str, str]], str]:
  manifest = prepare.prepare(root)  # Returns at once when the prepared splits exist.
  path = os.path.join(prepare.prepared_dir(root), f'{SPLIT}.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: run `python -m rrt_jax.data.prepare` to write the prepared splits.')
  with open(path, encoding='utf-8') as f:
    docs = [(d['id'], d['text']) for d in map(json.loads, f)]
  return docs, manifest['splits'][SPLIT]['sha256']


def load(root: str | None = None, seed: int = DEFAULT_SEED, force: bool = False) -> list[Cloze]:
  """The items, from the JSON cache next to the prepared data, rebuilt when the Austen text or seed changes."""
  docs, sha = _split_documents(root)
  path = os.path.join(prepare.prepared_dir(root), 'fewshot', f'{TASK}.json')
  key = {'format': FORMAT_VERSION, 'split': SPLIT, 'split_sha256': sha, 'seed': seed}
  if os.path.exists(path) and not force:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
    if all(data.get(k) == v for k, v in key.items()):
      return [Cloze(**it) for it in data['items']]
  items = build(docs, seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f'{path}.{os.getpid()}.partial'
  with open(partial, 'w', encoding='utf-8') as f:
    json.dump({**key, 'items': [dataclasses.asdict(it) for it in items]}, f, ensure_ascii=False)
  os.replace(partial, path)
  return items
