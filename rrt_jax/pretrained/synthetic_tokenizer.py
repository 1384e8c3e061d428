"""The synthetic tokenizer of throughput runs: data.tokenizer='synthetic:<V>' (documents from
rrt_jax.data.synthetic.synthetic_source). SyntheticTokenizer turns a document's text into a deterministic stream of
uniform ids in [3, V) (a hash of the text seeds it), so runs are reproducible and the data pipeline (packing,
sharding, checkpointed iteration) is the real one. Only for speed and memory: nothing can be learnt from it.
"""

from __future__ import annotations

import zlib

import numpy as np

from rrt_jax.pretrained.byte_tokenizer import Encoding

PREFIX = 'synthetic:'


class SyntheticTokenizer:
  eos_id: int = 2

  def __init__(self, vocab_size: int, doc_tokens: int = 4096):
    if vocab_size < 4:
      raise ValueError(f'A synthetic vocabulary needs at least 4 ids, got {vocab_size}.')
    self._vocab_size, self._doc_tokens = vocab_size, doc_tokens
    self.spec = f'{PREFIX}{vocab_size}'

  def encode(self, text: str) -> Encoding:
    rng = np.random.default_rng(zlib.crc32(text.encode('utf-8')))
    return Encoding(rng.integers(3, self._vocab_size, self._doc_tokens).tolist())

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    del skip_special_tokens
    return ' '.join(str(i) for i in ids)

  def get_vocab_size(self) -> int:
    return self._vocab_size


def parse(spec: str) -> SyntheticTokenizer:
  """'synthetic:<vocab size>' -> its tokenizer."""
  size = spec[len(PREFIX):]
  if not size.isdigit():
    raise ValueError(f"data.tokenizer={spec!r}: write 'synthetic:<vocabulary size>', e.g. 'synthetic:256000'.")
  return SyntheticTokenizer(int(size))


__all__ = ['PREFIX', 'SyntheticTokenizer', 'parse']
