"""Local paths and URIs (gs://bucket/dir, s3://...) as etils.epath paths, failing early on what cannot work.

Every workdir and checkpoint path goes through `as_path`: local paths are made absolute (Orbax wants them so), URIs
are kept as they are (never resolved against the working directory).
"""

from __future__ import annotations

import importlib.util
import os
import re

from etils import epath

_URI = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')


def is_uri(path: str | os.PathLike) -> bool:
  """Whether `path` is a URI (gs://bucket/dir, s3://...) rather than a local path."""
  return _URI.match(os.fspath(path)) is not None


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # A missing parent package.
    return False


def missing_packages(path: str | os.PathLike) -> list[str]:
  """pip packages that a gs:// path needs and that are not installed: gcsfs (etils.epath's GCS access, unless
  TensorFlow's gfile is there) and google-cloud-storage (Orbax asks it about the bucket)."""
  if not os.fspath(path).startswith('gs://'):
    return []
  needed = {'google.cloud.storage': 'google-cloud-storage'}
  if not _installed('tensorflow'):
    needed['gcsfs'] = 'gcsfs'
  return sorted(package for module, package in needed.items() if not _installed(module))


def as_path(path: str | os.PathLike) -> epath.Path:
  """An epath.Path for a local path (made absolute) or a URI (kept as it is). Fails early, naming the packages to
  install, for a gs:// path without them."""
  if not is_uri(path):
    return epath.Path(os.path.abspath(path))
  if missing := missing_packages(path):
    raise ImportError(f'{path}: gs:// paths need {" and ".join(missing)} (pip install {" ".join(missing)}).')
  try:
    return epath.Path(path)
  except KeyError:  # epath raises KeyError for schemes it has no backend for.
    scheme = _URI.match(os.fspath(path)).group(1)
    raise ValueError(f'{path}: etils.epath does not handle {scheme}:// paths (it does gs://, s3://, az://, hf://; '
                     'local paths need no scheme).') from None
