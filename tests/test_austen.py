"""Held-out long-form text: Jane Austen's novels parsed from Debian's r-cran-janeaustenr without R."""

import struct
import zlib

import pytest

from rrt_jax.data import austen


def _rdb_record(strings):
  body = b'X\n' + struct.pack('>iii', 2, 0x040000, 0x020300)
  body += struct.pack('>ii', austen._STRSXP, len(strings))
  for s in strings:
    raw = s.encode()
    body += struct.pack('>ii', austen._CHARSXP | (1 << 15), len(raw)) + raw
  return struct.pack('>I', len(body)) + zlib.compress(body)


def test_parse_rdb_reads_character_vectors(tmp_path):
  path = tmp_path / 'x.rdb'
  path.write_bytes(_rdb_record(['Line one', 'Ünïcode line', '']) + _rdb_record(['second']))
  assert austen.parse_rdb(str(path)) == [['Line one', 'Ünïcode line', ''], ['second']]


def test_corrupt_rdb_is_reported(tmp_path):
  record = _rdb_record(['abc'])
  path = tmp_path / 'bad.rdb'
  path.write_bytes(record[:4] + record[4:-6])
  with pytest.raises(ValueError, match='corrupt record at byte 0'):
    austen.parse_rdb(str(path))


def test_the_six_novels_from_the_debian_package():
  books, version = austen.novels()
  assert version == '1.0.0-1'
  assert sorted(books) == ['Emma', 'Mansfield Park', 'Northanger Abbey', 'Persuasion', 'Pride And Prejudice',
                           'Sense And Sensibility']
  assert 'It is a truth universally acknowledged' in books['Pride And Prejudice']
  assert books['Emma'].startswith('EMMA')
  assert 3_900_000 < sum(len(t) for t in books.values()) < 4_100_000
