"""absl entry points that fail in one line: a bad flag, a mistyped config field (with its nearest match), a config
file that does not exist, a bad config value or a stray positional argument is one message and exit status 2,
before anything is loaded or written, and also under --only_check_args (which then really checks).

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant] or a packaged name.')
  common.accept_config_names(_CONFIG)         # --config=smollm2:b3_r64_average from any directory

  def run():                                   # the console script (pyproject [project.scripts])
    common.run(main, validate=lambda: check_config(_CONFIG.value, _WORKDIR.value))

--help prints the module's docstring and its flags and exits 0, whether the module is run as a console script,
with `python -m`, or through a thin wrapper that imports it (experiments/train.py).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable

from absl import app, flags

from rrt_jax import configs
from rrt_jax.checkpoint import CheckpointError
from rrt_jax.data.packages import PackageUnavailable
from rrt_jax.utils.logs import QuietLibraries, quiet_libraries  # noqa: F401  (QuietLibraries: experiments/cli.py)

USAGE_ERROR = 2
FAILED = 1  # What was asked for cannot be had: one line saying why and naming the fix, not a traceback.
# A package the data or weights come from cannot be fetched; a model or checkpoint that cannot be read.
_ONE_LINE_ERRORS = (PackageUnavailable, CheckpointError, FileNotFoundError)


def _fail(message: str) -> None:
  print(f'{sys.argv[0].rsplit("/", 1)[-1]}: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR)


def _config_flags(argv: list[str]) -> dict:
  """Flags holding a ConfigDict (DEFINE_config_file), by name: read again from `argv` when parsing failed in the
  middle (config_flags applies the overrides while it parses the file's flag)."""
  import ml_collections
  out = {}
  for name, flag in flags.FLAGS._flags().items():  # noqa: SLF001  (absl has no public iterator over flags)
    if type(flag).__name__ != '_ConfigFlag':
      continue
    value = flag.value
    if value is None:
      given = [a.split('=', 1)[1] for a in argv if re.match(rf'--?{name}=', a)]
      try:
        value = flag.parser.parse(given[-1]) if given else None
      except Exception:  # noqa: BLE001  (an unloadable file is reported as it is)
        value = None
    if isinstance(value, ml_collections.ConfigDict):
      out[name] = value
  return out


def _unknown_field(argv: list[str]) -> str | None:
  """'--config.recursion.initt: no field ...; did you mean --config.recursion.init?' for the first override whose
  path is not in its config."""
  configs = _config_flags(argv)
  for arg in argv[1:]:
    m = re.match(r'--?([\w-]+)\.([\w.]+)', arg)
    if not m or m.group(1) not in configs:
      continue
    node, done = configs[m.group(1)], [m.group(1)]
    for part in m.group(2).split('.'):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        near = difflib.get_close_matches(part, keys, n=1)
        where = '.'.join(done)
        hint = f'; did you mean --{where}.{near[0]}?' if near else f'; {where} has {sorted(keys)}'
        return f'--{m.group(1)}.{m.group(2)}: no field {part!r} in {where}{hint}'
      node, done = node[part], [*done, part]
  return None


def _unloadable_config_file() -> str | None:
  """config_flags defers a config file's load error until the config is read; read it now."""
  for name, flag in flags.FLAGS._flags().items():  # noqa: SLF001
    if type(flag.value).__name__ == '_ErrorConfig':
      try:
        flag.value.keys()
      except OSError as e:
        hint = f' (packaged configs: {", ".join(configs.names())})' if isinstance(flag.parser, _NamedConfigs) else ''
        return f'--{name}: ' + ' '.join(str(e).split()) + hint
  return None


class _NamedConfigs(flags.ArgumentParser):
  """A config file flag's parser that also takes a packaged config's name (rrt_jax.configs.resolve)."""

  def __init__(self, inner: flags.ArgumentParser):
    self.inner = inner

  def parse(self, argument):
    return self.inner.parse(configs.resolve(argument))

  def flag_type(self) -> str:
    return self.inner.flag_type()


def accept_config_names(holder: flags.FlagHolder) -> None:
  """Lets a DEFINE_config_file flag take `smollm2`, `smollm2:variant` or `experiments/configs/smollm2.py` from any
  working directory, besides any config file path (rrt_jax.configs.resolve)."""
  flag = flags.FLAGS[holder.name]
  if not isinstance(flag.parser, _NamedConfigs):
    flag.parser = _NamedConfigs(flag.parser)


def parse_flags(argv: list[str], validate: Callable[[], None] | None = None) -> list[str]:
  """absl's flag parsing with one-line errors, no positional arguments, and `validate` run on the parsed flags."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001  (absl wraps some override errors; others escape as their own type)
    _fail(_unknown_field(argv) or str(e).strip().splitlines()[-1])
  if len(rest) > 1:
    _fail(f'unexpected positional arguments {rest[1:]}: every option is a --flag (did you forget "--"?).')
  problem = _unloadable_config_file()
  if problem:
    _fail(problem)
  if validate is not None:
    try:
      validate()
    except ValueError as e:
      _fail(str(e))
  return rest


_HELP = {'--help': True, '-help': True, '-?': True, '--helpshort': True, '-helpshort': True, '--helpfull': False,
         '-helpfull': False}


def _help(main: Callable, argv: list[str]) -> None:
  """--help: the docstring of `main`'s module and that module's flags on stdout, exit status 0 (absl's own --help
  lists the flags of sys.argv[0], none for a console script or a wrapper, and exits 1)."""
  args = argv[1:argv.index('--')] if '--' in argv else argv[1:]
  short = next((_HELP[a] for a in args if a in _HELP), None)
  if short is None:
    return
  module = sys.modules[main.__module__]
  key = sys.argv[0] if main.__module__ == '__main__' else main.__module__  # absl's name for the main module.
  print((module.__doc__ or f'USAGE: {argv[0]} [flags]').strip('\n') + '\n')
  print('flags:')
  print(flags.FLAGS.module_help(key) if short else flags.FLAGS.get_help())
  if short:
    print('\nTry --helpfull to get a list of all flags.')
  sys.exit(0)


def run(main: Callable[[list[str]], None], validate: Callable[[], None] | None = None) -> None:
  """app.run(main) with `parse_flags`, quiet library logs (-v 1 shows them), a --help that exits 0, and a missing
  source package or an unreadable model or checkpoint reported in one line with exit status 1."""
  _help(main, sys.argv)

  def guarded(argv):
    try:
      return main(argv)
    except _ONE_LINE_ERRORS as e:
      print(f'{sys.argv[0].rsplit("/", 1)[-1]}: {" ".join(str(e).split())}', file=sys.stderr)
      sys.exit(FAILED)

  def parse(argv):
    rest = parse_flags(argv, validate)
    if flags.FLAGS.verbosity <= 0:
      quiet_libraries()
    return rest
  app.run(guarded, flags_parser=parse)
