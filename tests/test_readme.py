"""README.md's code runs: every ```python block executes, in order, in one namespace (later blocks use the
names earlier ones define), and every command in a ```bash block names modules, files, config variants,
config fields and flags that exist.

The default test swaps the packaged SmolLM2-135M for a model of its vocabulary but a tiny width (the real
tokenizer and every API call stay as written), so it takes seconds; blocks preceded by the line
`<!-- readme-test: slow -->` (invisible on GitHub) are too slow even then and run only in the slow test, which
executes every block as written, on the real model."""

from __future__ import annotations

import functools
import importlib
import os
import re
import shlex
import tomllib

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
SLOW_MARK = '<!-- readme-test: slow -->'
_FENCE = re.compile(r'^```(\w*)\n(.*?)^```$', re.M | re.S)


def code_blocks(language: str) -> list[tuple[int, str, bool]]:
  """(line number, code, marked slow) of every ```language block of README.md, in order."""
  text = open(README).read()
  blocks = []
  for m in _FENCE.finditer(text):
    if m[1] == language:
      before = text[:m.start()].rstrip('\n').rsplit('\n', 1)[-1]
      blocks.append((text.count('\n', 0, m.start()) + 1, m[2], before.strip() == SLOW_MARK))
  return blocks


def run_blocks(blocks) -> dict:
  namespace = {'__name__': 'readme'}
  for line, code, _ in blocks:
    try:
      exec(compile(code, f'README.md:{line}', 'exec'), namespace)  # noqa: S102  (the point of the test)
    except Exception as e:
      raise AssertionError(f'README.md python block at line {line} fails: {type(e).__name__}: {e}') from e
  return namespace


def test_the_readme_has_the_blocks_this_test_expects():
  assert len(code_blocks('python')) >= 4 and len(code_blocks('bash')) >= 5


@pytest.fixture
def tiny_smollm2(monkeypatch):
  """load_gguf() -> SmolLM2's config at a tiny width with random weights; the GGUF tokenizer read once."""
  from rrt_jax import RecursionConfig, presets
  from rrt_jax.model import init_variables
  from rrt_jax.pretrained import gguf
  cfg = presets.SMOLLM2_135M.replace(num_layers=3, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                                     mlp_dim=128)
  vanilla = init_variables(cfg, RecursionConfig(), jax.random.key(0))
  monkeypatch.setattr(gguf, 'load_gguf', lambda *a, **k: (cfg, vanilla))
  monkeypatch.setattr(gguf, 'load_tokenizer', functools.cache(gguf.load_tokenizer))
  return cfg


def test_python_blocks_run_on_a_tiny_smollm2(tiny_smollm2):
  blocks = code_blocks('python')
  namespace = run_blocks([b for b in blocks if not b[2]])
  assert namespace['logits_per_loop'].shape[:2] == (3, 1)  # [R loops, batch, S, vocab]
  assert len(namespace['out'].tokens[0]) <= 32 and namespace['completions'][0].error is None


@pytest.mark.slow
@pytest.mark.longest
def test_python_blocks_run_as_written():
  namespace = run_blocks(code_blocks('python'))
  assert namespace['logits_per_loop'].shape[:2] == (3, 1)


# ---- bash blocks: static checks ----------------------------------------------------------------------------

_ABSL_BUILTIN = {'help', 'helpfull', 'helpshort', 'helpxml', 'only_check_args', 'flagfile', 'undefok'}


def commands(code: str) -> list[list[str]]:
  """The commands of a bash block: continuation lines joined, comments and `&&` chains split."""
  joined = re.sub(r'\\\n\s*', ' ', code)
  out = []
  for line in joined.splitlines():
    line = line.split(' #', 1)[0] if not line.lstrip().startswith('#') else ''
    for part in line.split('&&'):
      if part.strip():
        out.append(shlex.split(part))
  return out


def module_file(module: str) -> str | None:
  for candidate in (module.replace('.', '/') + '.py', module.replace('.', '/') + '/__init__.py'):
    if os.path.exists(os.path.join(ROOT, candidate)):
      return os.path.join(ROOT, candidate)
  return None


def defined_flags(module: str) -> set[str]:
  """absl flag names DEFINEd in the module's file and in the repository modules it imports."""
  source = open(module_file(module)).read()
  names = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source))
  for imported in re.findall(r'^\s*(?:from|import) ((?:experiments|launch|rrt_jax)[\w.]*)', source, re.M):
    path = module_file(imported)
    if path:
      names |= set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", open(path).read()))
  return names


def check_config_flags(args: list[str], problems: list[str], where: str) -> None:
  """--config=file[:variant] exists and loads; every --config.a.b=... override names a field of it."""
  from ml_collections import ConfigDict
  spec = next((a.split('=', 1)[1] for a in args if a.startswith('--config=')), None)
  if spec is None:
    from experiments.configs.base import base_config
    config = base_config()
  else:
    from rrt_jax import configs
    path, _, variant = spec.partition(':')
    if os.path.exists(os.path.join(ROOT, path)):
      module = importlib.import_module(path.removesuffix('.py').replace('/', '.'))
    elif configs.resolve(path) != path:  # A packaged config by name (rrt_jax.configs.resolve).
      module = importlib.import_module(f'rrt_jax.configs.{os.path.basename(configs.resolve(path))[:-3]}')
    else:
      problems.append(f'{where}: --config file {path} does not exist')
      return
    try:
      config = module.get_config(variant) if variant else module.get_config()
    except Exception as e:  # noqa: BLE001  (reported as the README's problem)
      problems.append(f'{where}: --config={spec} does not load: {e}')
      return
  for arg in args:
    if arg.startswith('--config.'):
      node = config
      for key in arg[len('--config.'):].split('=', 1)[0].split('.'):
        if not isinstance(node, ConfigDict) or key not in node:
          problems.append(f'{where}: {arg} names no config field')
          break
        node = node[key]


@functools.cache
def console_scripts() -> dict[str, str]:
  """pyproject's [project.scripts]: {'rrt-train': 'rrt_jax.cli.train', ...}."""
  scripts = tomllib.load(open(os.path.join(ROOT, 'pyproject.toml'), 'rb'))['project']['scripts']
  return {name: target.split(':')[0] for name, target in scripts.items()}


def check_command(argv: list[str], problems: list[str], where: str) -> None:
  if argv[0] == 'bash':
    if not os.path.exists(os.path.join(ROOT, argv[1])):
      problems.append(f'{where}: script {argv[1]} does not exist')
    return
  if argv[0] in console_scripts():
    module, args = console_scripts()[argv[0]], argv[1:]
  elif '-m' not in argv:
    return
  else:
    module, args = argv[argv.index('-m') + 1], argv[argv.index('-m') + 2:]
  if module == 'pytest':
    return
  if module_file(module) is None:
    problems.append(f'{where}: module {module} does not exist (no {module.replace(".", "/")}.py)')
    return
  own, passed_on = (args[:args.index('--')], args[args.index('--') + 1:]) if '--' in args else (args, [])
  flags = defined_flags(module) | _ABSL_BUILTIN
  for arg in own:
    name = arg[2:].split('=', 1)[0] if arg.startswith('--') else None
    if name and '.' not in name and name not in flags and not (name.startswith('no') and name[2:] in flags):
      problems.append(f'{where}: {module} has no flag --{name}')
  if 'config' in flags:
    check_config_flags(own, problems, where)
  if passed_on:  # The launchers pass these to experiments.train.
    check_config_flags(passed_on, problems, where)


def test_bash_blocks_name_what_exists():
  problems = []
  for line, code, _ in code_blocks('bash'):
    for argv in commands(code):
      check_command(argv, problems, f'README.md:{line} `{shlex.join(argv)[:80]}`')
  assert not problems, '\n'.join(problems)


def test_the_bash_check_catches_what_it_should():
  problems = []
  for argv in commands('.venv/bin/python -m experiments.nope --workdir=/tmp/x\n'
                       'python -m experiments.train --config=experiments/configs/missing.py\n'
                       'python -m experiments.train --config=experiments/configs/tiny_cpu.py --config.train.stepz=3\n'
                       'python -m experiments.simulate_cdb --nopaper --no_such_flag=1\n'
                       'bash scripts/nope.sh\n'
                       'rrt-train --config=smollm2:b2 --workdir=/tmp/x --config.train.stepz=3 --no_such_flag\n'
                       'rrt-train --config=nope --workdir=/tmp/x'):
    check_command(argv, problems, 'x')
  assert [p.split(': ', 1)[1] for p in problems] == [
      'module experiments.nope does not exist (no experiments/nope.py)',
      '--config file experiments/configs/missing.py does not exist',
      '--config.train.stepz=3 names no config field', 'experiments.simulate_cdb has no flag --no_such_flag',
      'script scripts/nope.sh does not exist', 'rrt_jax.cli.train has no flag --no_such_flag',
      '--config.train.stepz=3 names no config field', '--config file nope does not exist']
