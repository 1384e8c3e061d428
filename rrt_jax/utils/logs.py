"""Quiet library logs: the INFO lines of Orbax (~40 per checkpoint), grain, TensorStore and TFDS dropped, their
warnings and errors kept, so that the progress bar and rrt_jax's own lines are what a user reads.

  from rrt_jax.utils.logs import quiet_libraries
  quiet_libraries()          # e.g. in a notebook that set logging.basicConfig(level=logging.INFO)
  quiet_libraries(False)     # undo

The CLIs (rrt_jax/cli/common.py run: rrt-train, python -m experiments.train, ...) call it unless -v 1 is given.
`rrt_jax.train.loop.train` does not: a library leaves the caller's logging configuration alone, and with Python's
default (WARNING) none of these lines is printed anyway.
"""

from __future__ import annotations

import logging

# Source paths of the libraries whose INFO lines are dropped. They log through absl (one 'absl' logger for all of
# them, told apart by the calling file) or through their own Python loggers (CHATTY_LOGGERS).
CHATTY = ('/orbax/', '/grain/', '/tensorstore/', '/tensorflow_datasets/')
CHATTY_LOGGERS = ('orbax', 'grain', 'tensorstore', 'tensorflow_datasets')


class QuietLibraries(logging.Filter):
  """Drops the records below WARNING logged from CHATTY libraries' files (on a logger or a handler)."""

  CHATTY = CHATTY

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in self.CHATTY)


_FILTER = QuietLibraries()
_LEVELS: dict[str, int] = {}  # The levels quiet_libraries(True) replaced, for quiet_libraries(False).


def quiet_libraries(enabled: bool = True) -> None:
  """Drops (enabled) or lets through again (not enabled) the INFO and DEBUG lines of Orbax, grain, TensorStore and
  TFDS, whatever handlers print them: a filter on the 'absl' logger they log through, and WARNING as the level of
  their own Python loggers. Idempotent; changes nothing else (rrt_jax's lines, jax's warnings, other libraries)."""
  absl_logger = logging.getLogger('absl')
  if enabled:
    if _FILTER not in absl_logger.filters:
      absl_logger.addFilter(_FILTER)
    for name in CHATTY_LOGGERS:
      logger = logging.getLogger(name)
      if name not in _LEVELS and logger.level < logging.WARNING:
        _LEVELS[name] = logger.level
        logger.setLevel(logging.WARNING)
  else:
    absl_logger.removeFilter(_FILTER)
    for name, level in _LEVELS.items():
      logging.getLogger(name).setLevel(level)
    _LEVELS.clear()
