"""A cut or corrupt checkpoint file is one clear error that names the file and says what is wrong, not a
struct/json/reshape error from deep inside a reader (tiny files written here; nothing is downloaded)."""

import os
import re

import numpy as np
import pytest

from rrt_jax.pretrained.gguf import load_gguf, load_tokenizer
from rrt_jax.pretrained.safetensors_io import Checkpoint, SafetensorsFile


@pytest.fixture
def safetensors_dir(tmp_path):
  from safetensors.numpy import save_file
  save_file({'a.weight': np.arange(64, dtype=np.float32).reshape(8, 8), 'b.bias': np.ones(8, np.float32)},
            str(tmp_path / 'model.safetensors'))
  return tmp_path


def cut(path, keep: int) -> bytes:
  """Truncates the file to `keep` bytes (negative: drop that many); returns the original bytes."""
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:keep])
  return data


def test_intact_safetensors_reads(safetensors_dir):
  ckpt = Checkpoint(str(safetensors_dir))
  np.testing.assert_array_equal(ckpt.get('a.weight')[1], np.arange(8, 16))


@pytest.mark.parametrize('keep, message', [
    (-10, r'is truncated: its header says (\d+) bytes, the file has (\d+); re-copy it'),
    (40, r'is truncated or not a safetensors file: its header says \d+ header bytes, the file has 40 bytes'),
    (5, r'is truncated or not a safetensors file: 5 bytes, less than the 8-byte header length'),
], ids=['data', 'header', 'length'])
def test_truncated_safetensors_names_the_file(safetensors_dir, keep, message):
  path = str(safetensors_dir / 'model.safetensors')
  size = len(cut(path, keep))
  with pytest.raises(ValueError, match=re.escape(path) + ' ' + message) as e:
    Checkpoint(str(safetensors_dir))  # What load_hf opens.
  if keep < 0:
    assert e.match(rf'says {size} bytes, the file has {size + keep}')


def test_corrupt_safetensors_header_names_the_file(safetensors_dir):
  path = str(safetensors_dir / 'model.safetensors')
  data = bytearray(cut(path, 0))
  data[8:12] = b'\xff\xfe{['  # Not JSON.
  with open(path, 'wb') as f:
    f.write(bytes(data))
  with pytest.raises(ValueError, match=re.escape(path) + r' is corrupt: its \d+-byte header is not a valid'):
    SafetensorsFile(path)


@pytest.fixture
def gguf_path(tmp_path):
  import gguf
  path = str(tmp_path / 'tiny.gguf')
  writer = gguf.GGUFWriter(path, 'llama')
  writer.add_block_count(1)
  writer.add_tensor('token_embd.weight', np.ones((16, 8), np.float32))
  writer.add_tensor('output_norm.weight', np.ones(8, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.mark.parametrize('keep', [-40, -1, 200, 50, 10, 3, 0], ids=lambda k: f'keep{k}')
def test_truncated_gguf_names_the_file(gguf_path, keep):
  import gguf
  assert len(gguf.GGUFReader(gguf_path).tensors) == 2  # Intact: reads.
  cut(gguf_path, keep)
  size = os.path.getsize(gguf_path)
  for load in (load_gguf, load_tokenizer):
    with pytest.raises(ValueError, match=re.escape(gguf_path) + rf' is truncated .*\b{size} bytes.*re-copy it'):
      load(gguf_path)
