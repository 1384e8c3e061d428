"""The package as pip sees it: a wheel holds rrt_jax and nothing else (experiments/ and launch/ stay in the
checkout; both names are taken on PyPI), its console scripts run from any directory, pyproject.toml gives version
ranges, and constraints.txt pins each dependency inside its range to the version tested.

The wheel is built from a copy of the sources with this environment's setuptools (no build isolation, nothing
downloaded) and installed with --no-deps into a fresh venv of its own, which then sees this environment's
dependencies through a .pth line; the environment the tests run in is not written to."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = tomllib.load(open(os.path.join(ROOT, 'pyproject.toml'), 'rb'))
SCRIPTS = {'rrt-train': 'rrt_jax.cli.train', 'rrt-generate': 'rrt_jax.cli.generate', 'rrt-eval': 'rrt_jax.cli.evaluate',
           'rrt-export': 'rrt_jax.cli.export'}


def requirements() -> list[Requirement]:
  project = PYPROJECT['project']
  extras = [r for reqs in project['optional-dependencies'].values() for r in reqs]
  return [Requirement(r) for r in [*project['dependencies'], *extras]]


def constraints() -> dict[str, Version]:
  pins = {}
  for line in open(os.path.join(ROOT, 'constraints.txt')):
    line = line.split('#', 1)[0].strip()
    if line:
      name, version = re.fullmatch(r'([A-Za-z0-9._-]+)==([\w.+!-]+)', line).groups()
      assert canonicalize_name(name) not in pins, f'constraints.txt pins {name} twice'
      pins[canonicalize_name(name)] = Version(version)
  return pins


def test_dependencies_are_ranges_each_pinned_inside_it_in_constraints():
  pins = constraints()
  for req in requirements():
    ops = sorted(s.operator for s in req.specifier)
    assert ops == ['<', '>='], f'{req}: a range, >=tested,<next breaking release (not a pin, not open-ended)'
    name = canonicalize_name(req.name)
    assert name in pins, f'{req.name} has no pin in constraints.txt'
    assert req.specifier.contains(pins[name]), f'constraints.txt pins {req.name}=={pins[name]}, outside {req}'
    assert Version(next(s.version for s in req.specifier if s.operator == '>=')) <= pins[name]
  named = {canonicalize_name(r.name) for r in requirements()}
  assert not set(pins) - named, f'constraints.txt pins what pyproject.toml does not ask for: {set(pins) - named}'


def test_this_environment_has_the_pinned_versions():
  """constraints.txt is what these tests run on (packages of extras this environment lacks are skipped)."""
  wrong = {}
  for name, pin in constraints().items():
    try:
      installed = Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
      continue
    if Version(installed.base_version) != pin:  # torch 2.13.0+cpu is torch==2.13.0.
      wrong[name] = f'{installed} installed, {pin} pinned'
  assert not wrong, wrong


def test_setup_installs_with_the_constraints_and_the_metadata_is_pep_639():
  setup = open(os.path.join(ROOT, 'scripts', 'setup.sh')).read()
  assert '-c constraints.txt -e ".[${EXTRAS}]"' in setup
  assert "grep -E '^torch==' constraints.txt" in setup  # torch first, by its exact pin: the CPU build.
  assert PYPROJECT['project']['license'] == 'Apache-2.0'
  assert 'Apache License' in open(os.path.join(ROOT, 'LICENSE')).read(200)
  assert any(re.fullmatch(r'setuptools>=(\d+)', r) and int(r.split('>=')[1]) >= 77
             for r in PYPROJECT['build-system']['requires'])
  assert PYPROJECT['project']['scripts'] == {name: f'{module}:run' for name, module in SCRIPTS.items()}


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> str:
  """The wheel, built from a copy of the sources (a build writes build/ and *.egg-info into its source tree)."""
  tmp = tmp_path_factory.mktemp('wheel')
  src = tmp / 'src'
  src.mkdir()
  for name in ('pyproject.toml', 'README.md', 'LICENSE'):
    shutil.copy(os.path.join(ROOT, name), src / name)
  for name in ('rrt_jax', 'experiments', 'launch'):  # experiments/ and launch/ are there, to be left out.
    shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns('__pycache__', '*.egg-info'))
  out = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-cache-dir',
                        '--no-index', '-q', '-w', str(tmp / 'dist'), str(src)], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  (whl,) = (tmp / 'dist').glob('rrt_jax-*.whl')
  return str(whl)


def test_the_wheel_holds_only_rrt_jax(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split('/', 1)[0] for n in names} == {'rrt_jax', os.path.basename(wheel).split('-py3')[0] + '.dist-info'}
  for needed in ('rrt_jax/data/manifest.json', 'rrt_jax/configs/smollm2.py', 'rrt_jax/configs/tiny_cpu.py',
                 'rrt_jax/cli/train.py', 'rrt_jax/cli/export.py'):
    assert needed in names
  info = os.path.basename(wheel).split('-py3')[0] + '.dist-info'
  meta = zipfile.ZipFile(wheel).read(f'{info}/METADATA').decode()
  assert 'License-Expression: Apache-2.0' in meta and f'{info}/licenses/LICENSE' in names
  entry_points = zipfile.ZipFile(wheel).read(f'{info}/entry_points.txt').decode()
  for name, module in SCRIPTS.items():
    assert f'{name} = {module}:run' in entry_points


def _tree_state(path: str) -> dict[str, float]:
  return {e.name: e.stat().st_mtime for e in os.scandir(path)}


@pytest.fixture(scope='module')
def installed(wheel, tmp_path_factory) -> str:
  """A fresh venv with the wheel installed (--no-deps) and this environment's site-packages appended to its path
  by a .pth line (a plain path: that directory's own .pth files, such as an editable install's, are not run)."""
  venv = tmp_path_factory.mktemp('venv') / 'v'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=300)
  python = str(venv / 'bin' / 'python')
  out = subprocess.run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '--no-cache-dir', '-q', wheel],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        capture_output=True, text=True, check=True).stdout.strip()
  ours = [p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')]
  with open(os.path.join(site, 'zz_rrt_test_dependencies.pth'), 'w') as f:
    f.write(''.join(p + '\n' for p in ours))  # Appended after the venv's own site-packages.
  return str(venv)


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
  return {**env, 'JAX_PLATFORMS': 'cpu', 'PYTHONDONTWRITEBYTECODE': '1'}


def test_console_scripts_run_from_any_directory(installed, tmp_path):
  ours = sysconfig.get_paths()['purelib']
  before = (_tree_state(ours), _tree_state(os.path.dirname(sys.executable)))
  bin_dir = os.path.join(installed, 'bin')
  probe = [os.path.join(bin_dir, 'python'), '-c', 'import importlib.util, rrt_jax; print(rrt_jax.__file__); '
           'print([m for m in ("experiments", "launch") if importlib.util.find_spec(m)])']
  train = [os.path.join(bin_dir, 'rrt-train'), f'--workdir={tmp_path / "w"}']
  runs = {
      'probe': probe,
      **{name: [os.path.join(bin_dir, name), '--help'] for name in SCRIPTS},
      # A packaged config by name, from a directory that has no config files; checked, nothing loaded or written.
      'by name': [*train, '--config=tiny_cpu:b2_r8', '--config.train.steps=3', '--only_check_args'],
      'no such config': [*train, '--config=nope'],
  }
  procs = {k: subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env()) for k, argv in runs.items()}  # At once: each imports jax.
  done = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
  (out, err), rc = done['probe']
  assert rc == 0, err[-3000:]
  where, importable = out.strip().splitlines()
  assert where.startswith(installed) and importable == '[]', out  # Ours, and nothing else of the checkout's.
  flags = {'rrt-train': '--config', 'rrt-generate': '--exit_threshold', 'rrt-eval': '--tasks', 'rrt-export': '--out'}
  for name in SCRIPTS:  # --help: the module's docstring and its flags, exit status 0.
    (out, err), rc = done[name]
    assert rc == 0, f'{name} --help: {err[-3000:]}'
    assert f'{SCRIPTS[name]}:' in out and flags[name] in out and name in out, out
  (out, err), rc = done['by name']
  assert rc == 0, err[-3000:]
  (out, err), rc = done['no such config']
  assert rc == 2 and 'packaged configs: ' in err and 'smollm2' in err and 'Traceback' not in err, err
  assert not os.path.exists(tmp_path / 'w')
  assert (_tree_state(ours), _tree_state(os.path.dirname(sys.executable))) == before  # This environment untouched.


def test_config_names_resolve_to_the_packaged_files(tmp_path, monkeypatch):
  from rrt_jax import configs
  monkeypatch.chdir(tmp_path)
  packaged = os.path.join(configs.DIR, 'smollm2.py')
  assert configs.names() == ['gemma_2b', 'pythia_1b', 'smollm2', 'tiny_cpu', 'tinyllama_1_1b']
  assert configs.resolve('smollm2') == packaged
  assert configs.resolve('smollm2.py:b3_r64_average') == packaged + ':b3_r64_average'
  assert configs.resolve('experiments/configs/smollm2.py:b2') == packaged + ':b2'
  for unchanged in ('base', 'nope:b2', 'other/dir/smollm2.py', '/abs/smollm2.py', ''):
    assert configs.resolve(unchanged) == unchanged
  (tmp_path / 'smollm2.py').write_text('def get_config(v=""): ...\n')  # A file of that name here wins.
  assert configs.resolve('smollm2.py:b2') == 'smollm2.py:b2' and configs.resolve('smollm2') == packaged
  monkeypatch.chdir(ROOT)  # In the checkout the repo-relative path is the file itself (it re-exports the module).
  assert configs.resolve('experiments/configs/smollm2.py') == 'experiments/configs/smollm2.py'
