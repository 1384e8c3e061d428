"""Power-of-two length buckets: inputs of nearby lengths are padded to one shape, so jit compiles once per bucket."""

from __future__ import annotations


def bucket(n: int, minimum: int = 16) -> int:
  """The next power of two >= n, and at least `minimum` (n <= 1 gives `minimum`, or 1 when minimum is 1)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())
