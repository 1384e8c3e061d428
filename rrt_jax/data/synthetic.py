"""Synthetic token streams for throughput runs of random models at a real vocabulary size, with no text, weights
or tokenizer files (an accelerator machine that has none of the packaged data): data.tokenizer='synthetic:<V>'
(the tokenizer: rrt_jax.pretrained.synthetic_tokenizer).

Each document is named by its index; the synthetic tokenizer turns it into a deterministic stream of uniform ids.
Only for speed and memory: nothing can be learnt from it.
"""

from __future__ import annotations


def synthetic_source(documents: int = 4096) -> list[dict]:
  """A random-access source of {'id', 'text'} documents (rrt_jax.data.pipeline's input)."""
  return [{'id': i, 'text': f'synthetic document {i}'.encode()} for i in range(documents)]


__all__ = ['synthetic_source']
