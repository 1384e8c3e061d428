"""Word-analogy multiple-choice tasks from the Google analogy test set (Mikolov et al., 2013), the default few-shot
tasks: their data comes from a wheel the package registry serves today, pinned by version and sha256.

The test set (`questions-words.txt`, 19,544 rows 'a b c d' in 14 sections) ships inside gensim's wheel as test
data; only that member is read (nothing is installed or imported). Each row becomes one item:

  context  'Athens is to Greece as Baghdad is to'      choices  ' Iraq' and 3 other answers of the same section

  analogy_semantic   capitals, currencies, US cities' states, family words (5 sections).
  analogy_syntactic  adjective -> adverb, opposites, comparatives, superlatives, participles, nationalities,
                     past tenses, plurals, verb forms (9 sections).

Shots must not give the answer away: a row's two pairs (a, b) and (c, d) may appear in other rows in either
place. So every pair is put in one of BUCKETS buckets by a stable hash of its second word (pairs that share an
answer, e.g. two cities of one state, share a bucket); a row is kept only when both its pairs are in one bucket,
and that bucket is the item's group. The few-shot split (rrt_jax.eval.fewshot) never draws shots from the
item's group, and no pair is in two groups, so no shot holds the item's pairs. Keeps ~1/BUCKETS of the rows.
Distractors are drawn per item by a generator seeded with the item id: deterministic across machines.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rrt_jax import package_sources
from rrt_jax.data.multiple_choice import MultipleChoice, cached_items_path, read_cached_items, write_cached_items
from rrt_jax.data.packages import wheel_member

SOURCE = package_sources.ANALOGIES
MEMBER = 'gensim/test/test_data/questions-words.txt'
SEMANTIC = ('capital-common-countries', 'capital-world', 'currency', 'city-in-state', 'family')
TASK_SECTIONS = {'analogy_semantic': SEMANTIC, 'analogy_syntactic': tuple(
    f'gram{i}-{s}' for i, s in enumerate(('adjective-to-adverb', 'opposite', 'comparative', 'superlative',
                                          'present-participle', 'nationality-adjective', 'past-tense', 'plural',
                                          'plural-verbs'), start=1))}
TASKS = tuple(TASK_SECTIONS)
NUM_CHOICES = 4
BUCKETS = 8
FORMAT_VERSION = 1  # Bump when items change: cached item files with another version are rebuilt.


def read_sections(path: str) -> dict[str, list[tuple[str, str, str, str]]]:
  """{section: rows (a, b, c, d)} of a questions-words file, in file order."""
  sections: dict[str, list[tuple[str, str, str, str]]] = {}
  rows = None
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if line.startswith(':'):
        rows = sections.setdefault(line[1:].strip(), [])
        continue
      words = line.split()
      if not words:
        continue
      if rows is None or len(words) != 4:
        raise ValueError(f'{path}:{number}: expected a ": section" line or four words, got {line.strip()!r}.')
      rows.append(tuple(words))
  return sections


def _bucket(section: str, answer: str) -> int:
  return int(hashlib.sha1(f'{section}/{answer}'.encode()).hexdigest(), 16) % BUCKETS


def build(task: str, sections: dict[str, list[tuple[str, str, str, str]]]) -> list[MultipleChoice]:
  """The items of a task from read_sections' output (see the module docstring for the rules)."""
  if task not in TASK_SECTIONS:
    raise ValueError(f'Unknown analogy task {task!r}: choose one of {list(TASKS)}.')
  items = []
  for section in TASK_SECTIONS[task]:
    if section not in sections:
      raise ValueError(f'The analogy file has no section {section!r} (it has {sorted(sections)}).')
    answers = sorted({d for _, _, _, d in sections[section]})
    for i, (a, b, c, d) in enumerate(sections[section]):
      group = _bucket(section, b)
      if group != _bucket(section, d):
        continue
      item_id = f'{task}/{section}/{i}'
      seed = int(hashlib.sha1(item_id.encode()).hexdigest()[:12], 16)
      others = [w for w in answers if w not in (b, d)]
      picks = np.random.default_rng(seed).choice(len(others), NUM_CHOICES - 1, replace=False)
      choices = [others[j] for j in sorted(picks)]
      gold = int(seed % NUM_CHOICES)
      choices.insert(gold, d)
      items.append(MultipleChoice(item_id, f'{section}/{group}', f'{a} is to {b} as {c} is to', tuple(choices),
                                  gold))
  return items


def load(task: str, root: str | None = None) -> list[MultipleChoice]:
  """A task's items, from the JSON cache or built once from the pinned wheel's analogy file."""
  if task not in TASK_SECTIONS:
    raise ValueError(f'Unknown analogy task {task!r}: choose one of {list(TASKS)}.')
  path = cached_items_path(task, root)
  items = read_cached_items(path, FORMAT_VERSION)
  if items is None:
    items = build(task, read_sections(wheel_member(SOURCE, MEMBER, root)))
    write_cached_items(path, FORMAT_VERSION, items, source=f'{SOURCE.filename}:{MEMBER}')
  return items
