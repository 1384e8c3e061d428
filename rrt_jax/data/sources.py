"""Your own data: a `data.source` spec -> a random-access source of {'text'} documents for lm_dataset.

  ''  or  'packaged'           the packaged corpora, split data.split (tfds_builder.text_source): the default
  'packaged:<split>'           one packaged split (train, validation, austen, brown, wikipedia)
  'tfds:<name>[:<split>]'      a prepared TFDS dataset in ArrayRecord format (under $TFDS_DATA_DIR, default
                               ~/tensorflow_datasets; or <name> = its prepared version directory), text in the
                               feature data.text_field; the split defaults to data.split. A versioned name
                               (c4/en:3.0.1) needs the split spelled out: tfds:c4/en:3.0.1:train
  'jsonl:<path or glob>'       JSON Lines, one JSON object per document, text under data.text_field
  'arrayrecord:<glob>'         ArrayRecord files, one document per record: its raw UTF-8 text
  'arrayrecord+json:<glob>'    ArrayRecord files, one JSON object per record, text under data.text_field
  'A@0.7,B@0.3'                a weighted mixture of any of the above (weights need not sum to 1; default 1)

  source = open_source(c.data.source, c.data.split, c.data.text_field)   # -> lm_dataset(source, ...)

A mixture is a `Mixture`: lm_dataset shuffles and repeats each component, then interleaves them with grain's
MapDataset.mix (deterministic, exact proportions up to 1% of the smallest weight), so the iterator state is still
one index and checkpoints round-trip. Paths are local (or mounted) files; globs expand in sorted order. A JSONL
file is indexed once when it opens (the byte range of every line, 16 bytes a document, in memory, built on each
host); documents are then read with os.pread. Write ArrayRecord files with options 'group_size:1' for cheap random
access (a record read decodes its whole group).
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import logging
import operator
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMES = ('packaged', 'tfds', 'jsonl', 'arrayrecord', 'arrayrecord+json')
SPEC_HELP = ("use '' / packaged[:<split>], tfds:<name>[:<split>], jsonl:<path or glob>, arrayrecord:<glob> or "
             "arrayrecord+json:<glob>, each optionally with @<weight>, comma-separated for a mixture")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One parsed entry of a data.source spec."""
  scheme: str  # One of SCHEMES.
  location: str  # The split (packaged), the dataset name or directory (tfds), a path or glob (files).
  split: str = ''  # packaged and tfds.
  weight: float = 1.0
  text: str = ''  # The entry as written, for messages.


def parse_spec(spec: str, split: str = 'train') -> list[SourceSpec]:
  """data.source -> its entries (one, or several for a mixture); `split` (data.split) fills in omitted splits.
  Raises ValueError naming the bad entry and the fix; touches no file."""
  spec = (spec or '').strip()
  if not spec:
    return [SourceSpec('packaged', split, split, text='')]
  entries = [e.strip() for e in spec.split(',')]
  if not all(entries):
    raise ValueError(f'data.source={spec!r} has an empty entry: {SPEC_HELP}.')
  return [_parse_entry(e, split) for e in entries]


def _parse_entry(entry: str, split: str) -> SourceSpec:
  body, weight = entry, 1.0
  head, sep, tail = entry.rpartition('@')
  if sep:
    try:
      weight = float(tail)
    except ValueError:
      pass  # An '@' inside a path, not a weight.
    else:
      body = head
      if not weight > 0 or not np.isfinite(weight):
        raise ValueError(f'data.source entry {entry!r}: the weight must be a number > 0, got {tail!r}.')
  scheme, colon, location = body.partition(':')
  scheme, location = scheme.strip(), location.strip()
  if scheme == 'packaged':
    split_here = location or split
    return SourceSpec(scheme, split_here, split_here, weight, entry)
  if scheme not in SCHEMES:
    raise ValueError(f'data.source entry {entry!r}: unknown scheme {scheme!r}: {SPEC_HELP}.')
  if not colon or not location:
    raise ValueError(f'data.source entry {entry!r}: {scheme}: needs a location ({SPEC_HELP}).')
  if scheme == 'tfds':
    name, colon, split_here = location.rpartition(':')
    name, split_here = (name, split_here) if colon else (location, split)
    if not name or not split_here:
      raise ValueError(f'data.source entry {entry!r}: write tfds:<name> or tfds:<name>:<split>.')
    return SourceSpec(scheme, name, split_here, weight, entry)
  return SourceSpec(scheme, location, '', weight, entry)


def open_source(spec: str = '', split: str = 'train', text_field: str = 'text'):
  """data.source -> what lm_dataset reads: a random-access source of {'text'} documents, or a Mixture of them.
  '' (and 'packaged') is exactly text_source(split), as before data.source existed."""
  specs = parse_spec(spec, split)
  if len(specs) == 1:
    return open_entry(specs[0], text_field)
  return Mixture(tuple((open_entry(s, text_field), s.weight) for s in specs))


def open_entry(spec: SourceSpec, text_field: str = 'text'):
  if spec.scheme == 'packaged':
    from rrt_jax.data.tfds_builder import text_source
    return text_source(spec.split)
  if spec.scheme == 'tfds':
    return FieldSource(_tfds_builder(spec.location).as_data_source(split=spec.split), text_field, spec.text)
  paths = expand(spec)
  if spec.scheme == 'jsonl':
    return JsonlSource(paths, text_field)
  import grain
  records = grain.sources.ArrayRecordDataSource(paths)
  return RecordSource(records, text_field if spec.scheme == 'arrayrecord+json' else None, spec.text)


def expand(spec: SourceSpec) -> list[str]:
  """The sorted files of a jsonl/arrayrecord entry; ValueError when there are none."""
  pattern = os.path.expanduser(spec.location)
  if glob.has_magic(pattern):
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
      raise ValueError(f'data.source entry {spec.text!r}: {spec.location!r} matches no files: check the path '
                       '(the glob expands on this host).')
    return paths
  if not os.path.isfile(pattern):
    raise ValueError(f'data.source entry {spec.text!r}: no such file {spec.location!r}: check the path.')
  return [pattern]


def _tfds_builder(location: str):
  import tensorflow_datasets as tfds
  if os.path.isdir(os.path.expanduser(location)):
    return tfds.builder_from_directory(os.path.expanduser(location))
  return tfds.builder(location)


def _text_of(record: Any, field: str, where: str):
  text = record.get(field) if isinstance(record, dict) else None
  if not isinstance(text, str | bytes):
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f'{where}: no text field {field!r} (the record has {keys}): set data.text_field.')
  return text


class FieldSource:
  """A random-access source of dict records (TFDS) -> {'text': record[field]}."""

  def __init__(self, records, field: str, name: str = ''):
    self._records, self._field, self._name = records, field, name

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):
    return {'text': _text_of(self._records[index], self._field, f'{self._name} record {index}')}

  def __repr__(self) -> str:
    return f'FieldSource({self._name!r}, {len(self)} documents)'


class RecordSource:
  """ArrayRecord records -> {'text'}: the record's bytes (raw UTF-8), or with `json_field` a JSON object's field."""

  def __init__(self, records, json_field: str | None = None, name: str = ''):
    self._records, self._field, self._name = records, json_field, name

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):
    record = self._records[index]
    if self._field is None:
      return {'text': record}
    try:
      doc = json.loads(record)
    except ValueError as e:
      raise ValueError(f'{self._name} record {index} is not JSON ({e}): for raw text records use arrayrecord:.') \
          from None
    return {'text': _text_of(doc, self._field, f'{self._name} record {index}')}

  def __repr__(self) -> str:
    return f'RecordSource({self._name!r}, {len(self)} documents)'


_CHUNK = 1 << 24


def line_ranges(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(starts, ends) byte offsets of the non-blank lines of a file (ends exclude the newline), one chunked pass."""
  starts, ends = [], []
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    offset = 0
    while chunk := f.read(_CHUNK):
      newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + offset
      ends.append(newlines)
      starts.append(newlines + 1)
      offset += len(chunk)
  ends = np.concatenate([*ends, np.array([size], np.int64)])
  starts = np.concatenate([np.array([0], np.int64), *starts])
  keep = ends > starts
  starts, ends = starts[keep], ends[keep]
  short = np.flatnonzero(ends - starts < 8)  # Blank lines ('\r', spaces) are short: read only those.
  if short.size:
    with open(path, 'rb') as f:
      blank = []
      for i in short:
        f.seek(int(starts[i]))
        if not f.read(int(ends[i] - starts[i])).strip():
          blank.append(i)
    if blank:
      keep = np.ones(starts.size, bool)
      keep[blank] = False
      starts, ends = starts[keep], ends[keep]
  return starts, ends


def check_jsonl(path: str, field: str) -> None:
  """Every non-blank line of a JSON Lines file is a JSON object with a text `field`, or one ValueError naming the
  file, the line number and what is wrong: a bad line fails the run before its first step, not when training
  reaches it."""
  with open(path, 'rb') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path}, line {number}'
      try:
        doc = json.loads(line)
      except ValueError as e:
        raise ValueError(f'{where} is not JSON ({e}): jsonl: wants one JSON object per line.') from None
      _text_of(doc, field, where)


class JsonlSource:
  """JSON Lines files as a random-access source of {'text'}: every non-blank line is a document, a JSON object
  with the text under `field`. Every line is checked once here (check_jsonl) and the line index built (in
  memory); reads are os.pread, so threads share no file position, and the source pickles (to grain workers)
  without its open files."""

  def __init__(self, paths: Sequence[str], field: str = 'text'):
    self._paths, self._field = tuple(paths), field
    for path in self._paths:
      check_jsonl(path, field)
    ranges = [line_ranges(p) for p in self._paths]
    self._starts = np.concatenate([s for s, _ in ranges]) if ranges else np.zeros(0, np.int64)
    self._ends = np.concatenate([e for _, e in ranges]) if ranges else np.zeros(0, np.int64)
    self._first = np.cumsum([0] + [s.size for s, _ in ranges]).tolist()  # Document index of each file's first.
    self._open()

  def _open(self):
    self._fds, self._pid, self._lock = {}, os.getpid(), threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    for k in ('_fds', '_pid', '_lock'):
      state.pop(k)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __del__(self):
    for fd in getattr(self, '_fds', {}).values():
      if getattr(self, '_pid', None) == os.getpid():
        os.close(fd)

  def _fd(self, k: int) -> int:
    if self._pid != os.getpid():  # A forked child: its own descriptors.
      self._open()
    fd = self._fds.get(k)
    if fd is None:
      with self._lock:
        fd = self._fds.get(k)
        if fd is None:
          fd = self._fds[k] = os.open(self._paths[k], os.O_RDONLY)
    return fd

  def __len__(self) -> int:
    return int(self._starts.size)

  def __getitem__(self, index):
    i = operator.index(index)
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f'document {index} of {len(self)}')
    k = bisect.bisect_right(self._first, i) - 1
    start, end = int(self._starts[i]), int(self._ends[i])
    line = os.pread(self._fd(k), end - start, start)
    where = f'{self._paths[k]} (line at byte {start})'
    try:
      doc = json.loads(line)
    except ValueError as e:
      raise ValueError(f'{where} is not JSON: {e}') from None
    return {'text': _text_of(doc, self._field, where)}

  def __repr__(self) -> str:
    return f'JsonlSource({len(self._paths)} files, {len(self)} documents)'


def _component_seed(seed: int, k: int) -> int:
  return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Weighted random-access sources (a comma-separated data.source); lm_dataset reads it through `dataset`."""
  components: tuple[tuple[Any, float], ...]

  def __post_init__(self):
    if not self.components:
      raise ValueError('A Mixture needs at least one (source, weight).')
    for source, weight in self.components:
      if not weight > 0:
        raise ValueError(f'Mixture weights must be > 0, got {weight}.')
      if len(source) == 0:
        raise ValueError(f'A mixture component has no documents: {source!r}.')

  def __len__(self) -> int:
    return sum(len(s) for s, _ in self.components)

  def dataset(self, seed: int, shuffle: bool = True, num_epochs: int | None = None):
    """Each component shuffled (its own seed drawn from `seed`) and repeated num_epochs times (None: forever),
    then mixed in the weights' proportions by grain's MapDataset.mix, a fixed interleave (so the mixture is
    deterministic and its iterator state one index). A finite mixture ends when its first component does."""
    import grain
    parts = []
    for k, (source, _) in enumerate(self.components):
      ds = grain.MapDataset.source(source)
      if shuffle:
        ds = ds.shuffle(seed=_component_seed(seed, k))
      parts.append(ds.repeat(num_epochs))
    return grain.MapDataset.mix(parts, [w for _, w in self.components])


def check_spec(spec: str, split: str = 'train', text_field: str = 'text') -> None:
  """Validates data.source without reading more than a first document per entry: the syntax, that the files or
  the TFDS dataset exist, and that a document has the text field. Raises one ValueError naming entry and fix."""
  specs = parse_spec(spec, split)
  if not isinstance(text_field, str) or not text_field:
    raise ValueError(f'data.text_field={text_field!r}: name the field that holds the text (e.g. text).')
  for s in specs:
    _check_entry(s, text_field)


def _check_entry(s: SourceSpec, text_field: str) -> None:
  if s.scheme == 'packaged':
    from rrt_jax.data.prepare import SPLITS
    if s.split not in SPLITS:
      where = f'data.source entry {s.text!r}' if s.text else "data.source='' (the packaged corpora), data.split"
      raise ValueError(f'{where}: the packaged corpora have no split {s.split!r}: choose one of {SPLITS} '
                       '(data.split, or packaged:<split>).')
    return
  if s.scheme == 'tfds':
    _check_tfds(s, text_field)
    return
  paths = expand(s)
  if s.scheme == 'jsonl':
    first = _first_line(paths[0])
    if first is None:
      if all(_first_line(p) is None for p in paths):
        raise ValueError(f'data.source entry {s.text!r}: no documents (the files are empty).')
      return
    try:
      doc = json.loads(first)
    except ValueError:
      raise ValueError(f'data.source entry {s.text!r}: the first line of {paths[0]} is not JSON: '
                       'jsonl: wants one JSON object per line.') from None
    _text_of(doc, text_field, f'data.source entry {s.text!r}: the first document of {paths[0]}')
    return
  import grain
  try:
    records = grain.sources.ArrayRecordDataSource(paths)
    first = records[0] if len(records) else None
  except Exception as e:  # noqa: BLE001  (array_record raises RuntimeError/ValueError/... for a bad file)
    raise ValueError(f'data.source entry {s.text!r}: not readable as ArrayRecord files ({type(e).__name__}: '
                     f'{str(e)[:200]}): check the files.') from None
  if first is None:
    raise ValueError(f'data.source entry {s.text!r}: no records.')
  if s.scheme == 'arrayrecord+json':
    try:
      doc = json.loads(first)
    except ValueError:
      raise ValueError(f'data.source entry {s.text!r}: the first record is not JSON: for raw UTF-8 text records '
                       'use arrayrecord:.') from None
    _text_of(doc, text_field, f'data.source entry {s.text!r}: the first record')
    return
  try:
    text = first.decode('utf-8')
  except UnicodeDecodeError:
    raise ValueError(f'data.source entry {s.text!r}: the first record is not UTF-8 text (arrayrecord: reads raw '
                     'text records; TFDS-written files go through tfds:).') from None
  if text.lstrip().startswith('{'):
    try:
      looks_json = isinstance(json.loads(text), dict)
    except ValueError:
      looks_json = False
    if looks_json:
      log.warning('data.source entry %r: the first record is a JSON object, read as raw text; for JSON records '
                  'use arrayrecord+json:.', s.text)


def _first_line(path: str) -> bytes | None:
  with open(path, 'rb') as f:
    for line in f:
      if line.strip():
        return line
  return None


def _check_tfds(s: SourceSpec, text_field: str) -> None:
  where = f'data.source entry {s.text!r}'
  try:
    builder = _tfds_builder(s.location)
  except Exception as e:  # noqa: BLE001  (DatasetNotFoundError lists every registered dataset: cut it)
    raise ValueError(f'{where}: no TFDS dataset {s.location!r} ({type(e).__name__}: {str(e).splitlines()[0]}): '
                     'prepare it (tfds build <name> --file_format=array_record; $TFDS_DATA_DIR sets where) or '
                     'name its prepared version directory.') from None
  if not builder.is_prepared():
    raise ValueError(f'{where}: the TFDS dataset is not prepared under {builder.data_dir}: run '
                     f'tfds build {s.location} --file_format=array_record (no downloads at training time).')
  info = builder.info
  if str(getattr(info.file_format, 'value', info.file_format)) != 'array_record':
    raise ValueError(f'{where}: prepared as {info.file_format}, but random access needs ArrayRecord: rebuild with '
                     '--file_format=array_record.')
  if s.split.split('[')[0].split('+')[0] not in info.splits:
    versionish = s.split.replace('.', '').replace('*', '').isdigit()
    hint = f' (a version needs the split too: tfds:{s.location}:{s.split}:train)' if versionish else ''
    raise ValueError(f'{where}: no split {s.split!r}; it has {sorted(info.splits)}{hint}.')
  features = info.features
  if text_field not in getattr(features, 'keys', lambda: [])():
    raise ValueError(f'{where}: no feature {text_field!r} (it has {sorted(features.keys())}): set data.text_field.')
