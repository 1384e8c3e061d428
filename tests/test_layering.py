"""The library's floors: no module imports one on a higher floor, and no import cycle exists, counting imports
inside functions too (a lazy import hides a cycle from Python, not from the layering). The floors are the layout
that README.md ("What is here") and BUILD_NOTES.md ("Layout") describe."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'rrt_jax')

# Lowest first. A module may import its own floor or lower ones.
FLOORS = (
    ('rrt_jax.config', 'rrt_jax.presets', 'rrt_jax.utils', 'rrt_jax.configs', 'rrt_jax.package_sources'),
    ('rrt_jax.model', 'rrt_jax.sharding'),
    ('rrt_jax.data', 'rrt_jax.pretrained'),
    ('rrt_jax.convert', 'rrt_jax.checkpoint', 'rrt_jax'),  # rrt_jax/__init__ re-exports the checkpoint API.
    ('rrt_jax.eval', 'rrt_jax.serve', 'rrt_jax.export'),
    ('rrt_jax.train',),
    ('rrt_jax.cli',),
)


def floor_of(module: str) -> int:
  """The floor of the longest prefix of `module` named in FLOORS."""
  best, floor = -1, None
  for i, names in enumerate(FLOORS):
    for name in names:
      if (module == name or module.startswith(name + '.')) and len(name) > best:
        best, floor = len(name), i
  if floor is None:
    raise AssertionError(f'{module} is on no floor: add its package to FLOORS (and to the layout in the docs).')
  return floor


def modules() -> dict[str, str]:
  """{module name: file} of every module of the package."""
  out = {}
  for directory, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(directory, f), os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
        out[rel.removesuffix('.__init__')] = os.path.join(directory, f)
  return out


def imports(path: str, known: set[str]) -> set[str]:
  """The rrt_jax modules a file imports anywhere in it (functions included); `from pkg import name` counts as
  pkg.name when that is a module, else as pkg."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split('.')[0] == 'rrt_jax'}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'rrt_jax':
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        out.add(sub if sub in known else node.module)
  return out


def graph() -> dict[str, set[str]]:
  files = modules()
  return {m: imports(path, set(files)) - {m} for m, path in files.items()}


def test_no_import_runs_up_a_floor():
  upward = sorted(f'{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})'
                  for m, deps in graph().items() for d in deps if floor_of(d) > floor_of(m))
  assert not upward, '\n'.join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycle():
  # Package __init__ files re-export their submodules; an edge from a submodule to its own package's __init__ is
  # the same package, not a cycle through another concern.
  edges = {m: {d for d in deps if not m.startswith(d + '.')} for m, deps in graph().items()}
  assert _cycles(edges) == []


def _package(module: str) -> str:
  """rrt_jax.<subpackage or top-level module>."""
  return '.'.join(module.split('.')[:2])


def test_no_cycle_between_packages():
  # Within a floor, packages may import each other one way only (data uses pretrained's tokenizers, never back).
  edges: dict[str, set[str]] = {}
  for m, deps in graph().items():
    if m == 'rrt_jax':
      continue  # The package __init__ re-exports; it is no concern of its own.
    edges.setdefault(_package(m), set()).update(
        _package(d) for d in deps if d != 'rrt_jax' and _package(d) != _package(m))
  assert _cycles(edges) == []


@pytest.mark.parametrize('edges, expected', [({'a': {'b'}, 'b': {'a'}}, [['a', 'b']]), ({'a': {'b'}, 'b': set()}, [])])
def test_the_cycle_finder_finds_cycles(edges, expected):
  assert _cycles(edges) == expected


def test_the_floor_check_sees_lazy_imports(tmp_path):
  path = tmp_path / 'm.py'
  path.write_text('def f():\n  from rrt_jax.train.loop import train\n  import rrt_jax.serve.engine\n')
  known = {'rrt_jax.train.loop', 'rrt_jax.serve.engine'}
  assert imports(str(path), known) == {'rrt_jax.train.loop', 'rrt_jax.serve.engine'}
  assert floor_of('rrt_jax.train.loop') > floor_of('rrt_jax.eval.perplexity')
