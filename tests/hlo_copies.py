"""Test-side reading of compiled HLO text: the buffer copies a decode loop runs every step."""

from __future__ import annotations

import re

_HEADER = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) ')
_CALLEE = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)')


def _computations(hlo: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines}."""
  out, name = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      match = _HEADER.match(line)
      name = match.group(1) if match else None
      out[name] = []
    elif name is not None and line.startswith(' '):
      out[name].append(line)
  return out


def loop_copies(hlo: str, buffer_tail: str) -> list[str]:
  """The copy instructions of f32 buffers whose shape ends in `buffer_tail` (e.g. 'B,H,T,D': every K/V buffer,
  whatever its leading axes) that run inside a while loop's body, or any computation it calls that is not a
  fusion's body (those copies are loads inside one kernel, not a copy of a buffer). Copies before the loop (the
  cache converted once) do not count."""
  comps = _computations(hlo)
  shape = re.compile(r'= f32\[(?:\d+,)*' + re.escape(buffer_tail) + r'\]\{[\d,]*\} copy\(')
  todo = [m for lines in comps.values() for line in lines for m in re.findall(r'body=%?([\w.\-]+)', line)]
  seen = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      if ' fusion(' not in line:
        todo += _CALLEE.findall(line)
  return [line.strip() for name in seen for line in comps[name] if shape.search(line)]
