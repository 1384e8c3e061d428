"""The tokenizer choice (data.tokenizer): a name -> a tokenizer that knows its end-of-sequence id.

Every tokenizer here has the `tokenizers.Tokenizer` methods the project uses (encode(text).ids, decode(ids),
get_vocab_size()) and `eos_id`: the token that ends each document in training data and stops generation. Read
the id from the tokenizer, never as a constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rrt_jax.data.byte_tokenizer import ByteTokenizer

SMOLLM2_EOS = '<|im_end|>'  # SmolLM2's end of sequence (its GGUF's tokenizer.ggml.eos_token_id).


@dataclasses.dataclass(frozen=True)
class BPETokenizer:
  """A `tokenizers.Tokenizer` with its end-of-sequence id. A wrapper, not an attribute set on the tokenizer: that
  would be lost when grain pickles the pipeline for its worker processes."""

  tokenizer: Any  # tokenizers.Tokenizer
  eos_id: int

  @classmethod
  def with_eos_token(cls, tokenizer, eos_token: str) -> BPETokenizer:
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
      raise ValueError(f'The tokenizer has no {eos_token!r} token to end sequences with.')
    return cls(tokenizer, eos_id)

  def encode(self, text: str):
    return self.tokenizer.encode(text)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def get_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)


def make_tokenizer(name: str) -> BPETokenizer | ByteTokenizer:
  """'smollm2': the packaged SmolLM2 GGUF's byte-level BPE; 'bytes': ByteTokenizer (tiny from-scratch models)."""
  if name == 'smollm2':
    from rrt_jax.convert.gguf import load_tokenizer
    return BPETokenizer.with_eos_token(load_tokenizer(), SMOLLM2_EOS)
  if name == 'bytes':
    return ByteTokenizer()
  raise ValueError(f'Unknown data.tokenizer {name!r}: choose smollm2 or bytes.')
