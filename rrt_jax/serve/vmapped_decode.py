"""Early-exit decoding that saves compute: one sequence's token through a lax.while_loop over the loops, vmapped.

The unrolled step (Generator(decode='unrolled')) runs every loop for every row and only picks each row's exit.
Here `decode_token` is written for ONE sequence: its loops are a lax.while_loop that stops after the first loop
whose confidence reaches the threshold (rrt_jax.model.exits), or after loop R. `vmapped_step` vmaps it over the
batch; a vmapped while_loop runs while ANY row continues and masks the rows that are done, so a batch whose
tokens all exit at loop 1 runs one loop, and a step costs as many loops as its deepest row.

The loop index is dynamic inside the loop: loop b's LoRA (`dynamic_loop_variables`) and cache slots are sliced
with lax.dynamic_slice. Under vmap (axis_name given) every row still running is at the same loop (the rows
start together, advance together, and a row that is done stays done), so the index is taken as the max over
the batch: one unbatched index slices the LoRA once for all rows instead of gathering it per row (at SmolLM2
size this halves a step that exits at loop 1). The sequence reads the batch's cache at its row index rather
than receiving a vmapped row (vmap would move the batch axis of the whole cache to the front, a copy every
step), so only the slots read are gathered. The loop carries only the token's own new K/V, never the cache
(every masked iteration would copy it); `vmapped_step` writes them into the cache for the whole batch at the end.

kv_fill='propagate': a second while_loop, over the loops the token skipped only, fills their K/V from its exit
state (`propagate_kv` with loop b's LoRA: K/V projections, no attention or MLP), as the unrolled step does.
kv_fill='full' (the oracle): every row runs to loop R, so nothing is saved. Each loop's body is
rrt_jax.serve.loop_step.loop_step, the one every decode path runs.

MIDDLE_CYCLE: the prelude runs once before the loops; after loop b the coda runs against exit b's coda slots
(index b dynamic) and the head reads its output. Under 'propagate' the second while_loop also runs the coda
alone (U layers) on the frozen exit state for every exit the token skipped, as the unrolled step does.
Tokens, exit loops and cache equal the unrolled step's (up to float rounding of batch-1 matmuls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rrt_jax.config import CODA, PRELUDE
from rrt_jax.model import Decoder, dynamic_loop_variables, propagate_kv
from rrt_jax.model.attention import CACHE_TIME_AXIS, KVCache
from rrt_jax.model.exits import ExitConfig, exits_at
from rrt_jax.serve.loop_step import loop_step, write_token_kv

_ROWS = 'rows'  # The vmapped batch axis.


def _at(x: jax.Array, index: jax.Array, axis: int = 0) -> jax.Array:
  """The size-1 slice of x at a (traced) index."""
  return jax.lax.dynamic_slice_in_dim(x, index, 1, axis)


def _put(x: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
  """x with its axis-0 entry at a (traced) index replaced by update [1, ...]."""
  return jax.lax.dynamic_update_slice_in_dim(x, update.astype(x.dtype), index, 0)


def _row_slots(slots: KVCache, index: jax.Array, row: jax.Array) -> KVCache:
  """Entry `index` (axis 0) of one row of the batch's {'k', 'v'} [A, C, B, H, T, D]: [1, C, 1, H, T, D]."""
  window = lambda x: (1, x.shape[1], 1) + x.shape[3:]  # noqa: E731
  return jax.tree.map(lambda x: jax.lax.dynamic_slice(x, (index, 0, row) + (0,) * (x.ndim - 3), window(x)), slots)


def _token_kv(slots: KVCache, position: jax.Array) -> KVCache:
  """{'k', 'v'} of [A, C, 1, kv_heads, T, head_dim] -> the token's entries at `position`: [A, C, 1, H, 1, D]."""
  return jax.tree.map(lambda x: _at(x, position, axis=x.ndim + CACHE_TIME_AXIS), slots)


def _zeros_kv(slots: KVCache) -> KVCache:
  """A token's K/V for every slot of `slots` ({'k', 'v'} of [A, C, B, H, T, D]), zero: [A, C, 1, H, 1, D]."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape[:2] + (1, x.shape[3], 1, x.shape[5]), x.dtype), slots)


def _coda(model: Decoder, variables: dict, h_1x1xD: jax.Array, positions_1x1: jax.Array, cache: KVCache,
          row: jax.Array, exit_index: jax.Array) -> tuple[jax.Array, KVCache | None]:
  """MIDDLE_CYCLE: the coda on the middle's output after loop `exit_index` (traced) against that exit's slots
  of `row` -> (exit hidden state, the token's coda K/V [1, U, 1, H, 1, D]). Else (h, None). Only those slots go
  in (a cache of one exit, decode_coda's exit 0), so nothing of the other exits is copied."""
  if not model.rec.unique_layers:
    return h_1x1xD, None
  one_exit = {**_row_slots({'k': cache['k'], 'v': cache['v']}, 0, row),  # decode_coda reads T off 'k'.
              CODA: _row_slots(cache[CODA], exit_index, row)}
  out, one_exit = model.apply(variables, h_1x1xD, positions_1x1, one_exit, 0, method=Decoder.decode_coda)
  return out, _token_kv(one_exit[CODA], positions_1x1[0, 0])


def _prelude(model: Decoder, variables: dict, embed_1x1xD: jax.Array, positions_1x1: jax.Array, cache: KVCache,
             row: jax.Array) -> tuple[jax.Array, KVCache | None]:
  """MIDDLE_CYCLE: the prelude against `row`'s prelude slots -> (its output, the token's prelude K/V
  [1, U, 1, H, 1, D]). Else (embed, None)."""
  if not model.rec.unique_layers:
    return embed_1x1xD, None
  slots = {**_row_slots({'k': cache['k'], 'v': cache['v']}, 0, row),  # decode_prelude reads T off 'k'.
           PRELUDE: _row_slots(cache[PRELUDE], 0, row)}
  h, slots = model.apply(variables, embed_1x1xD, positions_1x1, slots, method=Decoder.decode_prelude)
  return h, _token_kv(slots[PRELUDE], positions_1x1[0, 0])


def _loops(model: Decoder, variables: dict, exit_cfg: ExitConfig, h_1x1xD: jax.Array, embed_1x1xD: jax.Array,
           positions_1x1: jax.Array, cache: KVCache, row: jax.Array, axis_name: str | None) -> dict:
  """The while_loop over loops for one token -> its final carry (see `init` below)."""
  rec, position = model.rec, positions_1x1[0, 0]
  run_past_exit = exit_cfg.kv_fill == 'full'  # The oracle computes the skipped loops for real.

  def body(c: dict) -> dict:
    b = c['loop'] if axis_name is None else jax.lax.pmax(c['loop'], axis_name)  # The running rows' loop.
    slots = _row_slots({'k': cache['k'], 'v': cache['v']}, b, row)
    coda = (lambda h_next: _coda(model, variables, h_next, positions_1x1, cache, row, b)) if rec.unique_layers \
        else None
    step = loop_step(model, dynamic_loop_variables(variables, b), variables, c['h'], c['prev'], positions_1x1,
                     slots, exit_cfg, coda=coda)
    h_next, out, slots, coda_kv = step.h, step.out, step.slots, step.coda_aux
    logits_V, conf = step.logits[0], step.conf[0]
    newly = ~c['exited'] & (exits_at(conf, exit_cfg.threshold) | (b == rec.loops - 1))
    new = dict(loop=b + 1, h=h_next, prev=out, exited=c['exited'] | newly, count=c['count'] + 1,
               exit_loop=jnp.where(newly, b, c['exit_loop']), exit_h=jnp.where(newly, h_next, c['exit_h']),
               logits=jnp.where(newly, logits_V, c['logits']),
               kv=jax.tree.map(lambda all_, one: _put(all_, one, b), c['kv'], _token_kv(slots, position)))
    if coda_kv is not None:
      new['coda'] = jax.tree.map(lambda all_, one: _put(all_, one, b), c['coda'], coda_kv)
    return new

  def cond(c: dict) -> jax.Array:
    return (c['loop'] < rec.loops) & (run_past_exit | ~c['exited'])

  init = dict(loop=jnp.int32(0), h=h_1x1xD, prev=embed_1x1xD, exited=jnp.bool_(False), count=jnp.int32(0),
              exit_loop=jnp.int32(rec.loops - 1), exit_h=jnp.zeros_like(h_1x1xD),
              logits=jnp.zeros((model.cfg.vocab_size,), jnp.float32),
              kv=_zeros_kv({'k': cache['k'], 'v': cache['v']}))
  if rec.unique_layers:
    init['coda'] = _zeros_kv(cache[CODA])
  return jax.lax.while_loop(cond, body, init)


def _propagated(model: Decoder, variables: dict, c: dict, positions_1x1: jax.Array, cache: KVCache,
                row: jax.Array, axis_name: str | None) -> dict:
  """The carry with the K/V of every loop the token skipped filled from its exit state (under MIDDLE_CYCLE also
  the skipped exits' coda K/V, the coda run on the exit state), as the unrolled step fills them. A
  second while_loop over the skipped loops only: K/V projections (and U coda layers) per skipped loop, none
  when the token ran every loop. Under vmap it starts at the batch's earliest skipped loop, the index shared
  (unbatched, as in `_loops`), and a row keeps its real K/V up to its exit."""
  start = c['exit_loop'] + 1
  if axis_name is not None:
    start = jax.lax.pmin(start, axis_name)

  def body(carry: tuple) -> tuple:
    b, kv, coda = carry
    skipped = b > c['exit_loop']
    put = lambda all_, one: jnp.where(skipped, _put(all_, one, b), all_)  # noqa: E731
    # Loop b's variables hold its LoRA at loop index 0.
    fill = propagate_kv(model, dynamic_loop_variables(variables, b), c['exit_h'], positions_1x1, (0,))
    kv = jax.tree.map(put, kv, fill)  # fill: [1, K, 1, H, 1, D]
    if coda is not None:
      coda = jax.tree.map(put, coda, _coda(model, variables, c['exit_h'], positions_1x1, cache, row, b)[1])
    return b + 1, kv, coda

  init = (start, c['kv'], c.get('coda'))
  _, kv, coda = jax.lax.while_loop(lambda carry: carry[0] < model.rec.loops, body, init)
  return {**c, 'kv': kv} | ({} if coda is None else {'coda': coda})


def decode_token(model: Decoder, variables: dict, exit_cfg: ExitConfig, token: jax.Array, position: jax.Array,
                 cache: KVCache, row: jax.Array, axis_name: str | None = None
                 ) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
  """ONE sequence's next token, through its loops up to its exit. token, position, row: [] int32; the sequence is
  row `row` of the batch's `cache` (read only). axis_name: the vmapped batch axis, when vmapped (the loop index
  is then shared by the running rows; see the module docstring). Returns (exit logits [V], 0-based exit loop
  [], the token's K/V for every cache slot (the cache's leaves with [A, C, kv_heads, 1, head_dim]), loops
  run [])."""
  tokens_1x1, positions_1x1 = token.reshape(1, 1), position.reshape(1, 1)
  embed = model.apply(variables, tokens_1x1, method=Decoder.embed)
  h, prelude_kv = _prelude(model, variables, embed, positions_1x1, cache, row)
  c = _loops(model, variables, exit_cfg, h, embed, positions_1x1, cache, row, axis_name)
  if exit_cfg.early and exit_cfg.kv_fill == 'propagate':
    c = _propagated(model, variables, c, positions_1x1, cache, row, axis_name)
  new = dict(c['kv'])
  if model.rec.unique_layers:
    new[PRELUDE], new[CODA] = prelude_kv, c['coda']
  return c['logits'], c['exit_loop'], jax.tree.map(lambda x: x[:, :, 0], new), c['count']


def vmapped_step(model: Decoder, variables: dict, exit_cfg: ExitConfig, tokens_B: jax.Array,
                 positions_B: jax.Array, cache: KVCache) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
  """`decode_token` vmapped over the batch -> (exit logits [B, V], 0-based exit loops [B], the cache with every
  row's token written at its position, loops each row ran [B]; the batch ran their max)."""
  row = lambda token, position, index: decode_token(model, variables, exit_cfg, token, position, cache,  # noqa: E731
                                                    index, _ROWS)
  rows_B = jnp.arange(tokens_B.shape[0], dtype=jnp.int32)
  logits_BxV, exit_B, new, loops_B = jax.vmap(row, out_axes=(0, 0, 2, 0), axis_name=_ROWS)(tokens_B, positions_B,
                                                                                          rows_B)
  return logits_BxV, exit_B, jax.tree.map(lambda c, n: write_token_kv(c, n, positions_B), cache, new), loops_B


__all__ = ['decode_token', 'vmapped_step']
