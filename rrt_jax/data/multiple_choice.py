"""One multiple-choice item, the unit every multiple-choice few-shot task's source (analogies, BIG-bench) yields."""

from __future__ import annotations

import dataclasses


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
