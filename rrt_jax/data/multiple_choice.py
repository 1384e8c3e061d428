"""One multiple-choice item, the unit every multiple-choice few-shot task's source (analogies, BIG-bench) yields,
and the JSON cache of a task's parsed items (<cache>/prepared/fewshot/<task>.json) the sources share."""

from __future__ import annotations

import dataclasses
import json
import os

from rrt_jax.data.packages import cache_dir
from rrt_jax.utils.locking import atomic_write_text


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """One item. Choice i is scored as the continuation `delimiter + choices[i]` of `context`; or, when `suffix` is
  set (fill-the-blank), the context is `context + choices[i]` and the scored continuation is `' ' + suffix`.

  group: items sharing a group (same question text, same twin pair) are never used as each other's shots.
  """

  id: str
  group: str
  context: str
  choices: tuple[str, ...]
  gold: int
  suffix: str | None = None

  def __post_init__(self):
    object.__setattr__(self, 'choices', tuple(self.choices))
    if not 0 <= self.gold < len(self.choices):
      raise ValueError(f'{self.id}: gold index {self.gold} is not in range of {len(self.choices)} choices.')

  def requests(self, delimiter: str = ' ') -> list[tuple[str, str]]:
    """(context, continuation) per choice."""
    if self.suffix is None:
      return [(self.context, delimiter + c) for c in self.choices]
    return [(self.context + c, ' ' + self.suffix) for c in self.choices]

  def solved(self, delimiter: str = ' ') -> str:
    """The item with its gold answer filled in: the text of a few-shot example."""
    context, continuation = self.requests(delimiter)[self.gold]
    return context + continuation


def cached_items_path(task: str, root: str | None = None) -> str:
  return os.path.join(cache_dir(root), 'prepared', 'fewshot', f'{task}.json')


def read_cached_items(path: str, format_version: int) -> list[MultipleChoice] | None:
  """A task's items from its cache file, or None when there is none or it was written by another parser version."""
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  if data.get('format') != format_version:
    return None
  return [MultipleChoice(**it) for it in data['items']]


def write_cached_items(path: str, format_version: int, items: list[MultipleChoice], **about) -> None:
  """Writes a task's items (and `about`: where they came from) in one piece. Concurrent first runs build the same
  items; each replaces the file whole, so no lock is needed."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_text(path, json.dumps({'format': format_version, **about,
                                      'items': [dataclasses.asdict(it) for it in items]}, ensure_ascii=False))
