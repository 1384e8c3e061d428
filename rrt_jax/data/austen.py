"""Jane Austen's six novels from Debian's r-cran-janeaustenr, parsed from its R data file without R.

`Rdata.rdb` is a sequence of records [4-byte big-endian uncompressed length][zlib stream]; each decompresses
to an R XDR serialization. The novels are character vectors (STRSXP), one element per line of the book.
"""

from __future__ import annotations

import os
import struct
import zlib

from rrt_jax import package_sources
from rrt_jax.data.packages import debian_package

PACKAGE = package_sources.AUSTEN
RDB = 'usr/lib/R/site-library/janeaustenr/data/Rdata.rdb'
_STRSXP, _CHARSXP = 16, 9


def _strings(payload: bytes) -> list[str] | None:
  """The strings of a serialized STRSXP, or None if the record holds something else."""
  if payload[:2] != b'X\n':
    return None
  (version,) = struct.unpack('>i', payload[2:6])
  pos = 14  # 'X\n' + format version, writer version, minimal reader version.
  if version == 3:
    (enc_len,) = struct.unpack('>i', payload[pos:pos + 4])
    pos += 4 + enc_len
  flags, length = struct.unpack('>ii', payload[pos:pos + 8])
  if flags & 0xFF != _STRSXP:
    return None
  pos += 8
  out = []
  for _ in range(length):
    flags, n = struct.unpack('>ii', payload[pos:pos + 8])
    pos += 8
    if flags & 0xFF != _CHARSXP:
      raise ValueError(f'{PACKAGE}: unexpected R type {flags & 0xFF} inside a character vector.')
    if n == -1:  # NA_character_
      out.append('')
      continue
    out.append(payload[pos:pos + n].decode('utf-8', errors='strict'))
    pos += n
  return out


def parse_rdb(path: str) -> list[list[str]]:
  """Every character vector stored in an R .rdb file, in file order.

  Records are [4-byte big-endian uncompressed length][zlib stream]; a stream's end is found by decompressing
  it (the .rdx index is not needed).
  """
  with open(path, 'rb') as f:
    data = f.read()
  vectors, pos = [], 0
  while pos + 4 <= len(data):
    (expected,) = struct.unpack('>I', data[pos:pos + 4])
    stream = zlib.decompressobj()
    payload = stream.decompress(data[pos + 4:])
    if len(payload) != expected or not stream.eof:
      raise ValueError(f'{path}: corrupt record at byte {pos} ({len(payload)} bytes, expected {expected}).')
    pos = len(data) - len(stream.unused_data)
    strings = _strings(payload)
    if strings is not None:
      vectors.append(strings)
  return vectors


def novels(root: str | None = None) -> tuple[dict[str, str], str]:
  """({title: text}, package version). Titles are taken from each book's own first lines."""
  unpacked, version = debian_package(PACKAGE, root)
  books = {}
  for lines in parse_rdb(os.path.join(unpacked, RDB)):
    text = '\n'.join(lines).strip()
    if len(text) < 100_000:  # Not a novel (e.g. a lookup vector).
      continue
    title = next(line.strip() for line in lines if line.strip()).title()
    books[title] = text
  return books, version
