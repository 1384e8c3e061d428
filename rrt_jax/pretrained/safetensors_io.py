"""A minimal, memory-lean safetensors reader: memory-maps the file and yields one tensor at a time.

Handles single files and sharded checkpoints (model.safetensors.index.json). bf16 comes through ml_dtypes,
so no framework is needed to read a checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


class SafetensorsFile:
  """One .safetensors file: `keys()`, `shape(name)`, `get(name)` (a read-only view of the mapped file)."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    if size < 8:
      raise ValueError(f'{path} is truncated or not a safetensors file: {size} bytes, less than the 8-byte header '
                       'length; re-copy it.')
    with open(path, 'rb') as f:
      (header_len,) = struct.unpack('<Q', f.read(8))
      if 8 + header_len > size:
        raise ValueError(f'{path} is truncated or not a safetensors file: its header says {header_len} header bytes, '
                         f'the file has {size} bytes in all; re-copy it.')
      try:
        header = json.loads(f.read(header_len))
        header.pop('__metadata__', None)
        # The data section must hold every tensor's bytes; a cut copy fails here, not at a reshape later.
        data_len = max((int(info['data_offsets'][1]) for info in header.values()), default=0)
      except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f'{path} is corrupt: its {header_len}-byte header is not a valid safetensors header '
                         f'({type(e).__name__}: {e}); re-copy it.') from e
    if 8 + header_len + data_len > size:
      raise ValueError(f'{path} is truncated: its header says {8 + header_len + data_len} bytes, the file has '
                       f'{size}; re-copy it.')
    self._header = header
    self._data_start = 8 + header_len
    self._mmap = np.memmap(path, dtype=np.uint8, mode='r')

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]['shape'])

  def get(self, name: str) -> np.ndarray:
    info = self._header[name]
    if info['dtype'] not in _DTYPES:
      raise ValueError(f'{self.path}: tensor {name} has unsupported dtype {info["dtype"]}.')
    begin, end = info['data_offsets']
    dtype, shape = np.dtype(_DTYPES[info['dtype']]), tuple(info['shape'])
    if end - begin != dtype.itemsize * int(np.prod(shape)):
      raise ValueError(f'{self.path} is corrupt: tensor {name} ({info["dtype"]} {list(shape)}) needs '
                       f'{dtype.itemsize * int(np.prod(shape))} bytes but its offsets give {end - begin}; re-copy it.')
    raw = self._mmap[self._data_start + begin:self._data_start + end]
    return raw.view(dtype).reshape(shape)


class Checkpoint:
  """All safetensors files of an HF checkpoint directory, addressed by tensor name."""

  def __init__(self, directory: str):
    index_path = os.path.join(directory, 'model.safetensors.index.json')
    single = os.path.join(directory, 'model.safetensors')
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
      files = {fn: SafetensorsFile(os.path.join(directory, fn)) for fn in sorted(set(weight_map.values()))}
      self._where = {name: files[fn] for name, fn in weight_map.items()}
    elif os.path.exists(single):
      st = SafetensorsFile(single)
      self._where = {name: st for name in st.keys()}
    else:
      raise FileNotFoundError(
          f'No model.safetensors or model.safetensors.index.json in {directory}: point at a directory '
          'written by transformers save_pretrained (safetensors format).')

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def keys(self) -> list[str]:
    return list(self._where)

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(f'Tensor {name!r} is not in the checkpoint.')
    return self._where[name].get(name)

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for name in self._where:
      yield name, self.get(name)
