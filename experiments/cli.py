"""absl entry points that fail in one line: a bad flag, a mistyped config field (with its nearest match), a config
file that does not exist, a bad config value or a stray positional argument is one message and exit status 2,
before anything is loaded or written, and also under --only_check_args (which then really checks).

  if __name__ == '__main__':
    cli.run(main, validate=lambda: check_config(_CONFIG.value, _WORKDIR.value))
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

USAGE_ERROR = 2


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
        return f'--{name}: ' + ' '.join(str(e).split())
  return None


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


class QuietLibraries(logging.Filter):
  """Drops the INFO lines of chatty libraries (Orbax logs ~20 per checkpoint), keeping their warnings and errors,
  so that the progress bar and rrt_jax's own lines are what a user reads."""

  CHATTY = ('/orbax/', '/grain/', '/tensorstore/')

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in self.CHATTY)


def run(main: Callable[[list[str]], None], validate: Callable[[], None] | None = None) -> None:
  """app.run(main) with `parse_flags` and quiet library logs (-v 1 shows them)."""
  def parse(argv):
    rest = parse_flags(argv, validate)
    if flags.FLAGS.verbosity <= 0:
      absl_logging.get_absl_handler().addFilter(QuietLibraries())
    return rest
  app.run(main, flags_parser=parse)
