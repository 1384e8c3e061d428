"""One loop of a decode step: the shared block at one depth for a batch of rows, then the exit head and the exit
confidence. Every decode path runs this body: the Generator's unrolled step (a Python loop over depths), the
vmapped per-sequence while_loop (rrt_jax.serve.vmapped_decode) and the depth-wise batching engine (rows at
different loops, each selecting its own LoRA by a one-hot). The K/V an exited token skips are filled by
`rrt_jax.model.propagate_kv`, the only propagation mechanism; `write_token_kv` writes them (or any token's K/V)
into cache slots.

Shapes: B rows, S new tokens per row (1 when decoding), D width, V vocabulary, R loops, A / C the two leading
slot axes of a cache leaf ([loops, layers] of the block), H kv heads, T cache length (the cache's layout: see
rrt_jax.model.attention.KVCache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rrt_jax.model import Decoder, one_loop
from rrt_jax.model.attention import KVCache, write_cache
from rrt_jax.model.exits import ExitConfig, confidence


class LoopOut(NamedTuple):
  h: jax.Array  # [B, S, D] the block's output: the next loop's input.
  out: jax.Array  # [B, S, D] the exit hidden state the head read (the coda's output under MIDDLE_CYCLE, else h).
  logits: jax.Array | None  # [B, V] the exit head at each row's last token, fp32 (None: head=False).
  conf: jax.Array | None  # [B] the exit confidence (ExitConfig.confidence) of those logits (None: head=False).
  slots: KVCache  # The block's cache slots with this step's K/V written.
  coda_aux: Any  # What `coda` returned beside its output (None without one).


def loop_step(model: Decoder, block_variables: dict, head_variables: dict, h_BxSxD: jax.Array,
              prev_BxSxD: jax.Array, positions_BxS: jax.Array, slots: KVCache, exit_cfg: ExitConfig,
              loop_onehot_BxR: jax.Array | None = None,
              coda: Callable[[jax.Array], tuple[jax.Array, Any]] | None = None, head: bool = True) -> LoopOut:
  """One pass of `model`'s shared block on h against `slots` ({'k', 'v'} of [1, K, B, H, T, ...]), the exit head on
  its output and the confidence against `prev` (the previous exit's state, for saturation).

  block_variables: one loop's variables (`loop_variables`, `dynamic_loop_variables`) or every loop's
  (`multi_lora_variables`, with `loop_onehot_BxR` selecting each row's). head_variables: the model's variables
  (only 'params' is read). coda: MIDDLE_CYCLE's coda on the block's output -> (exit state, anything to return).
  head=False skips the exit head (logits and conf None): a loop no token can exit at reads no vocabulary matrix.
  """
  hidden, slots = one_loop(model).apply(block_variables, h_BxSxD, positions_BxS, slots, loop_onehot_BxR,
                                        method=Decoder.decode_stack)
  h_next = hidden[-1]
  out, aux = (h_next, None) if coda is None else coda(h_next)
  if not head:
    return LoopOut(h_next, out, None, None, slots, aux)
  logits_BxV = model.apply(head_variables, out, method=Decoder.logits)[:, -1]
  conf_B = confidence(exit_cfg.confidence, logits_BxV, out[:, -1], prev_BxSxD[:, -1])
  return LoopOut(h_next, out, logits_BxV, conf_B, slots, aux)


def write_token_kv(cache_AxCxBxHxTxD: jax.Array, new_AxCxBxHx1xD: jax.Array, positions_B: jax.Array) -> jax.Array:
  """The cache leaf with each row's one new token (cache layout) written at its position, in every (A, C) slot."""
  over_slots = jax.vmap(jax.vmap(write_cache, in_axes=(0, 0, None)), in_axes=(0, 0, None))
  return over_slots(cache_AxCxBxHxTxD, new_AxCxBxHx1xD, positions_B)


def loop_slots(kv, b: int):
  """Loop b's slots of a cache leaf: [1, ...] of a stacked [R, ...] leaf (all of it when R = 1: no copy), or loop
  b's K-tuple of per-(loop, layer) buffers (`per_layer_cache`)."""
  if isinstance(kv, tuple):
    return kv[b]
  return kv if kv.shape[0] == 1 else kv[b:b + 1]


def join_loop_slots(per_loop: list):
  """The inverse of `loop_slots` over every loop, in order (per-layer buffers are put back as they are)."""
  if isinstance(per_loop[0], tuple):
    return tuple(per_loop)
  return per_loop[0] if len(per_loop) == 1 else jnp.concatenate(per_loop)


__all__ = ['LoopOut', 'join_loop_slots', 'loop_slots', 'loop_step', 'write_token_kv']
