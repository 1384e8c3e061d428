"""Inter-process locks and atomic writes for files that processes on one machine share (the data cache, workdirs).

  with file_lock(os.path.join(cache, 'locks', 'thing.lock'), what='building thing'):
    if not os.path.exists(target):  # Check again under the lock: another process may have just built it.
      with staging_dir(target) as tmp:
        ...                          # Fill tmp; it becomes `target` in one rename.

Locks are `fcntl.flock` locks on a lock file: the kernel drops them when the holder closes the file or dies (even
by SIGKILL), so a crash leaves no stale lock. Lock files are never deleted (deleting one while another process waits
on it would let a third lock a new file of the same name). flock is per machine: on NFS without lock support, or
for processes on different hosts sharing a directory, it does not exclude anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):  # noqa: N818 (the name callers catch: it is a state, not a bug)
  """A non-blocking `file_lock` found the lock held by another process (or another open of it in this one)."""

  def __init__(self, path: str, holder: str, what: str = ''):
    self.path, self.holder, self.what = path, holder, what
    prefix = f'{what}: ' if what else ''
    super().__init__(f'{prefix}{path} is locked by {holder}. Wait for it to finish, or stop it; the lock goes away '
                     'with the process that holds it.')


def _holder(fd: int) -> str:
  """Who holds the lock, as its holder wrote it ('pid 123 on host h'), or a fallback while it has not yet."""
  try:
    text = os.pread(fd, 200, 0).decode(errors='replace').strip()
  except OSError:
    text = ''
  return text or 'another process (not yet named in the lock file)'


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True, what: str = '') -> Iterator[None]:
  """Holds an exclusive lock on the file `path` (created, with its parent directories, if missing).

  blocking: wait for the holder to release it (logging once, naming the holder); otherwise raise LockHeld.
  what: what the lock protects, for the messages. Not reentrant: taking a lock twice in one process deadlocks
  (blocking) or raises LockHeld.
  """
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      if not blocking:
        raise LockHeld(path, holder, what) from None
      log.info('%swaiting for %s to release %s', f'{what}: ' if what else '', holder, path)
      fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}\n'.encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # Released: no stale name for the next one to report.
  finally:
    os.close(fd)  # Closing releases the flock.


def temp_name(path: str | os.PathLike) -> str:
  """A temporary name next to `path` that no other process or thread uses: same filesystem, so os.replace works."""
  return f'{os.fspath(path)}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp'


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = 'w', **open_kwargs) -> Iterator:
  """Opens a temporary file that replaces `path` in one rename when the block succeeds (removed if it fails):
  readers see the old file or the whole new one, never a part."""
  path = os.fspath(path)
  tmp = temp_name(path)
  try:
    with open(tmp, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())  # The data is on disk before the name points at it (a crash leaves old or new).
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = 'utf-8') -> None:
  """Writes `text` to `path` atomically (a temporary file in the same directory, then os.replace)."""
  with atomic_file(path, 'w', encoding=encoding) as f:
    f.write(text)


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> bool:
  """Renames the finished directory `tmp` to `target` in one step. If `target` appeared meanwhile (another process
  was first), `tmp` is discarded and False is returned: the first complete copy wins."""
  tmp, target = os.fspath(tmp), os.fspath(target)
  if not os.path.exists(target):
    try:
      os.rename(tmp, target)
      return True
    except OSError as e:  # Lost a race: rename does not replace a non-empty directory.
      if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.exists(target):
        raise
  shutil.rmtree(tmp, ignore_errors=True)
  return False


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike) -> Iterator[str]:
  """Yields a new, empty, uniquely named directory next to `target`; when the block succeeds it becomes `target`
  (see publish_dir), when it fails it is removed."""
  target = os.path.abspath(os.fspath(target))
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'{name}.{os.getpid()}.', suffix='.tmp', dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  publish_dir(tmp, target)


def remove_stale_temps(target: str | os.PathLike) -> list[str]:
  """Removes what killed writers left next to `target` (temp_name files, staging_dir directories); returns them.

  Only call it while holding the lock that every writer of `target` takes: then no live writer owns them.
  """
  target = os.fspath(target)
  stale = glob.glob(glob.escape(target) + '.*.tmp')
  for path in stale:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
  if stale:
    log.info('removed %d leftovers of interrupted writes to %s', len(stale), target)
  return stale
