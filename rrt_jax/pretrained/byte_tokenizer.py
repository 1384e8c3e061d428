"""A byte-level tokenizer for tiny from-scratch models: id = byte + 3 (0 pad, 1 unused, 2 end of sequence).

Same interface as the `tokenizers.Tokenizer` methods the pipeline uses (encode(...).ids, decode,
get_vocab_size) plus `eos_id`, so tiny CPU runs train on real text with a 259-token vocabulary.
"""

from __future__ import annotations

import dataclasses

OFFSET = 3


@dataclasses.dataclass(frozen=True)
class Encoding:
  ids: list[int]


class ByteTokenizer:
  eos_id: int = 2

  def encode(self, text: str) -> Encoding:
    return Encoding([b + OFFSET for b in text.encode('utf-8')])

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    del skip_special_tokens
    return bytes(i - OFFSET for i in ids if i >= OFFSET).decode('utf-8', errors='replace')

  def get_vocab_size(self) -> int:
    return 256 + OFFSET
