"""Serving precision: a model and its variables cast to one dtype (e.g. bfloat16) for decoding.

The cast model computes in `dtype` and stores its parameters in `dtype`; init_cache follows cfg.dtype, so the KV
cache of generate() and the Engine is in `dtype` too. Norms, softmax and logits stay fp32 inside the model
(model/layers.py, attention.py, Decoder.logits), so exit confidences and sampling see fp32 probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rrt_jax.model import Decoder


def cast_for_serving(model: Decoder, variables: dict, dtype: str = 'bfloat16') -> tuple[Decoder, dict]:
  """(model with cfg.dtype = cfg.param_dtype = dtype, variables with every floating leaf cast to dtype).
  Integer leaves (none today) are left alone; the input variables are not modified."""
  jnp.dtype(dtype)  # An unknown name fails here, not inside jit.
  cfg = model.cfg.replace(dtype=str(jnp.dtype(dtype)), param_dtype=str(jnp.dtype(dtype)))
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  return Decoder(cfg, model.rec), jax.tree.map(cast, variables)


__all__ = ['cast_for_serving']
