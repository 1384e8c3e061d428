"""The device side of the depth-wise batching engine: every slot's state in one pytree, and the three jitted
functions that change it. The host scheduler (rrt_jax.serve.scheduler) only decides which request goes in which
slot and which slots run; it reads back tokens and exits, nothing else.

  state = slots.init_state()                                            # N empty slots
  token, exit_loop, row = slots.prefill(variables, tokens_1xS, length_1, key)   # a request's cache row
  state = slots.insert(state, slot, row, token, length, seed)           # ...into slot `slot`
  token_N, exit_loop_N, exits_N, state = slots.step(variables, step_variables, state, running_N, base_key)
  token_N, exit_loop_N, exits_N, state = slots.uniform_step(slots.loop_views[b], variables, state, running_N,
                                                            base_key, loop=b)      # sequencewise: all at loop b

`step` is one pass of the shared block over all N slots, each at its own loop (`loop_step` with multi-LoRA rows),
then the exit head; a running slot whose token exits (confidence >= threshold, or the last loop) advances to its
next token at loop 0, the others to their next loop. Exited tokens' skipped (loop, layer) K/V are filled by
`propagate_kv` from the exit state. Cache layout: [R, K, N slots, kv_heads, T, head_dim]; a step gathers each
slot's [K, T] slice at its own loop and scatters only the new entries back.

`uniform_step` is the step of sequence-wise batching (CSB, `sequencewise=True`), where every running slot is at
the same loop b (the scheduler's phase): compiled per loop b, it reads loop b's own LoRA buffers (`loop_views`,
split once: no one-hot over all R adapters, no slicing of the [R, ...] LoRA inside the step) and loop b's own cache
buffer (the cache is then a list of R {'k', 'v'} of [1, K, N, H, T, D]: no per-slot gather, no copy of a loop's
slice, the new K/V written in place) and, where no token can exit at loop b (no early exit and b < R - 1), skips
the exit head. Slots that do not run may have loop b's entry at their own position
overwritten: a position their next token has not reached, which it writes before any token reads it (free slots
are overwritten whole by `insert`).

Sharded (`mesh`): the cache and the hidden states over the mesh (rrt_jax.serve.sharding), the small per-slot
integers replicated (the host reads them); the jitted functions return the state in the shardings they take it
in, so the donated state is updated in place and nothing moves between steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from rrt_jax.model import Decoder, cache_length, init_cache, loop_variables, multi_lora_variables, propagate_kv
from rrt_jax.model.attention import KVCache
from rrt_jax.model.exits import ExitConfig, exits_at
from rrt_jax.serve.generate import Generator, SamplingConfig, sample, serving_variables, token_keys
from rrt_jax.serve.loop_step import loop_step
from rrt_jax.serve.sharding import cache_shardings, rows_sharding, shard_variables, sharded_cache
from rrt_jax.sharding import replicated


@struct.dataclass
class DecodeState:
  """Every slot of the engine, on device (N slots)."""

  # {'k', 'v'} of [R, K, N, kv_heads, T, head_dim]; sequence-wise: a list of R of [1, K, N, ...], one per loop.
  cache: KVCache | list[KVCache]
  h: jax.Array  # [N, 1, D] each slot's hidden state between loops.
  tokens: jax.Array  # [N] int32: the last token each slot emitted (the input of its next token's loop 0).
  loops: jax.Array  # [N] int32: the 0-based loop each slot runs next.
  positions: jax.Array  # [N] int32: the cache position of `tokens`.
  seeds: jax.Array  # [N] int32: each slot's request's sampling seed (token_keys).
  emitted: jax.Array  # [N] int32: tokens each slot's request has emitted (the index of its next token's key).


class SlotDecoder:
  """The jitted prefill / insert / step of one model and configuration over `slots` slots of `max_len`."""

  def __init__(self, model: Decoder, variables: dict, slots: int, max_len: int, exit_cfg: ExitConfig,
               sampling: SamplingConfig, mesh: Mesh | None = None, sequencewise: bool = False):
    model, variables = serving_variables(model, variables)  # One buffer per layer (LayerLayout).
    self.model, self.slots, self.max_len, self.exit_cfg, self.sampling, self.mesh = (
        model, slots, max_len, exit_cfg, sampling, mesh)
    self.sequencewise = sequencewise  # The state for `uniform_step` (a cache buffer per loop), else for `step`.
    self.generator = Generator(model, exit_cfg, sampling)  # Its prefill is the request's prefill.
    self.variables = variables if mesh is None else shard_variables(model, variables, mesh)
    self.step_variables = multi_lora_variables(self.variables)  # Every slot selects its own loop's LoRA.
    self.relaxed = len(self.step_variables) > 1
    # Each loop's variables as their own buffers (CSB's uniform_step), split here once, outside jit: slicing the
    # [R, ...] LoRA inside a step would copy it every step.
    self.loop_views = [loop_variables(self.variables, b) for b in range(model.rec.loops)]
    pinned = {}
    if mesh is not None:  # Outputs pinned to the inputs' shardings: the donated state aliases, no per-step moves.
      host, state = replicated(mesh), self.state_shardings()  # host: what the scheduler reads.
      pinned = {'prefill': {'out_shardings': (host, host, None)}, 'insert': {'out_shardings': state},
                'step': {'out_shardings': (host, host, host, state)}}
    self.prefill = jax.jit(self._prefill, **pinned.get('prefill', {}))
    self.insert = jax.jit(self._insert, donate_argnums=(0,), **pinned.get('insert', {}))
    self.step = jax.jit(self._step, donate_argnums=(2,), **pinned.get('step', {}))
    self.uniform_step = jax.jit(self._uniform_step, static_argnames=('loop',), donate_argnums=(2,),
                                **pinned.get('step', {}))

  def emits_at(self, loop: int) -> bool:
    """Whether a token can exit at `loop` (0-based): with early exit every loop, else only the last."""
    return self.exit_cfg.early or loop == self.model.rec.loops - 1

  def state_shardings(self) -> DecodeState:
    mesh, n = self.mesh, self.slots
    small = replicated(mesh)
    cache = cache_shardings(self.model, mesh, n)  # A loop's [1, K, ...] buffer splits as the [R, K, ...] one.
    if self.sequencewise:
      cache = [cache] * self.model.rec.loops
    return DecodeState(cache, rows_sharding(mesh, (n, 1, self.model.cfg.d_model)),
                       small, small, small, small, small)

  def init_state(self) -> DecodeState:
    """N empty slots: a zero cache [R, K, N, ...] (sequence-wise: R buffers of [1, K, N, ...]) and zero
    states, in the step's shardings."""
    cfg, n = self.model.cfg, self.slots
    h = jnp.zeros((n, 1, cfg.d_model), jnp.dtype(cfg.dtype))
    ints = [jnp.zeros(n, jnp.int32) for _ in range(5)]  # Five buffers: the step donates each.
    if self.mesh is None:
      cache = init_cache(cfg, self.model.rec, n, self.max_len)
    else:
      cache = sharded_cache(self.model, self.mesh, n, self.max_len)
    if self.sequencewise:
      cache = [jax.tree.map(lambda c, b=b: c[b:b + 1], cache) for b in range(self.model.rec.loops)]
    state = DecodeState(cache, h, *ints)
    return state if self.mesh is None else jax.device_put(state, self.state_shardings())

  # ---- Device functions (jitted in __init__) ----------------------------------------------------------------

  def _prefill(self, variables, tokens_1xS, length_1, key):
    """One request's prompt through every loop into a fresh cache row [R, K, 1, ...] -> (its first token,
    1-based exit loop, the row). A fresh row, not a slice of the slots' cache: its old entries are never read,
    and slicing slots split over the mesh would gather the whole cache onto every device."""
    row = init_cache(self.model.cfg, self.model.rec, 1, self.max_len)
    token, exit_loop, row = self.generator.prefill(variables, tokens_1xS, length_1, row, key)
    return token[0], exit_loop[0], row

  def _insert(self, state: DecodeState, slot, row: KVCache, token, length, seed) -> DecodeState:
    """`state` with a prefilled request in slot `slot`: its cache row, its first token at position `length`,
    loop 0, its seed, one token emitted."""
    put_row = lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r.astype(c.dtype), slot, axis=2)  # noqa: E731
    if self.sequencewise:  # Loop b's buffer takes the row's loop b.
      cache = [jax.tree.map(lambda c, r, b=b: put_row(c, r[b:b + 1]), state.cache[b], row)
               for b in range(len(state.cache))]
    else:
      cache = jax.tree.map(put_row, state.cache, row)
    put = lambda x, value: x.at[slot].set(jnp.asarray(value, x.dtype))  # noqa: E731
    return state.replace(cache=cache, tokens=put(state.tokens, token), loops=put(state.loops, 0),
                         positions=put(state.positions, length), seeds=put(state.seeds, seed),
                         emitted=put(state.emitted, 1))

  def _step(self, variables, step_variables, state: DecodeState, running_N, base_key):
    """One pass of the shared block over all N slots, each at its own loop -> (sampled token [N], 1-based loop
    it ran [N], exits [N], the advanced state). Slots not `running` compute but write nothing and keep their
    place. Slot s samples with its request's key for its next token (token_keys)."""
    model, loops, exit_cfg = self.model, self.model.rec.loops, self.exit_cfg
    loops_N, positions_N = state.loops, state.positions
    max_len = cache_length(state.cache)
    slot_ids = jnp.arange(loops_N.shape[0])
    head_vars = {'params': variables['params']}
    embedded = model.apply(head_vars, state.tokens[:, None], method=Decoder.embed)
    h_in = jnp.where((loops_N == 0)[:, None, None], embedded, state.h)
    # Each slot's cache at its own loop: [N, K, H, T, D] -> [1 loop, K, N, H, T, D].
    gathered = jax.tree.map(lambda c: jnp.moveaxis(c[loops_N, :, slot_ids], 0, 1)[None], state.cache)
    onehot = jax.nn.one_hot(loops_N, loops, dtype=jnp.float32) if self.relaxed else None
    out = loop_step(model, step_variables, head_vars, h_in, h_in, positions_N[:, None], gathered, exit_cfg, onehot)
    exits = (loops_N == loops - 1) | exits_at(out.conf, exit_cfg.threshold)
    token = sample(out.logits, self.sampling, token_keys(base_key, state.seeds, state.emitted))
    # Scatter the new K/V: mode='drop' with an out-of-range position skips slots that must not write.
    write_pos = jnp.where(running_N, positions_N, max_len)
    # Indexed [loops_N, :, slot_ids, :, write_pos]: the slot axis leads the result, [N, K, H, D] on both sides.
    cache = jax.tree.map(
        lambda c, g: c.at[loops_N, :, slot_ids, :, write_pos].set(g[0][:, slot_ids, :, positions_N], mode='drop'),
        state.cache, out.slots)
    if loops > 1 and exit_cfg.early:
      fill = running_N & exits & (loops_N < loops - 1)
      cache = jax.lax.cond(jnp.any(fill), self._fill_skipped_kv, lambda _, c, *__: c, variables, cache, out.h,
                           loops_N, positions_N, fill)
    return token, loops_N + 1, exits, _advanced(state, cache, out.h, token, exits, running_N, loops_N)

  def _uniform_step(self, loop_variables_b, variables, state: DecodeState, running_N, base_key, loop: int):
    """`_step` with every slot at loop `loop` (static; sequence-wise batching): loop_variables_b is
    `loop_views[loop]`. Returns what `_step` does; where no token can exit at `loop` (not `emits_at`) the token
    is zeros and nothing exits."""
    model, loops, exit_cfg = self.model, self.model.rec.loops, self.exit_cfg
    positions_N, n = state.positions, state.positions.shape[0]
    loops_N = jnp.full((n,), loop, jnp.int32)
    head_vars = {'params': variables['params']}
    h_in = model.apply(head_vars, state.tokens[:, None], method=Decoder.embed) if loop == 0 else state.h
    head = self.emits_at(loop)
    out = loop_step(model, loop_variables_b, head_vars, h_in, h_in, positions_N[:, None], state.cache[loop], exit_cfg,
                    head=head)
    cache = list(state.cache)
    cache[loop] = out.slots  # Loop b's buffer, written in place (non-running slots too: see the module doc).
    if not head:  # Nothing exits: the running slots go on to the next loop.
      token, exits = jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool)
      return token, loops_N + 1, exits, _advanced(state, cache, out.h, token, exits, running_N, loops_N)
    exits = jnp.full((n,), loop == loops - 1) | exits_at(out.conf, exit_cfg.threshold)
    token = sample(out.logits, self.sampling, token_keys(base_key, state.seeds, state.emitted))
    if exit_cfg.early and loop < loops - 1:
      fill = running_N & exits
      cache = jax.lax.cond(jnp.any(fill), functools.partial(self._fill_later_loops, loop), lambda _, c, *__: c,
                           variables, cache, out.h, positions_N, fill)
    return token, loops_N + 1, exits, _advanced(state, cache, out.h, token, exits, running_N, loops_N)

  def _fill_later_loops(self, loop: int, variables, cache: list[KVCache], h_Nx1xD, positions_N, fill_N
                        ) -> list[KVCache]:
    """Sequence-wise `_fill_skipped_kv`: K/V propagated from the exiting slots' exit state after loop `loop`
    written into every later loop's buffer."""
    later = range(loop + 1, self.model.rec.loops)
    new = propagate_kv(self.model, variables, h_Nx1xD, positions_N[:, None], later)  # [len(later), K, N, H, 1, D]
    write_pos = jnp.where(fill_N, positions_N, cache_length(cache[0]))  # Out of range: dropped.
    slot_ids = jnp.arange(positions_N.shape[0])
    cache = list(cache)
    for i, b in enumerate(later):
      cache[b] = jax.tree.map(lambda c, x, i=i: c.at[0, :, slot_ids, :, write_pos].set(
          jnp.swapaxes(x[i, :, :, :, 0], 0, 1), mode='drop'), cache[b], new)
    return cache

  def _fill_skipped_kv(self, variables, cache, h_Nx1xD, loops_N, positions_N, fill_N):
    """Writes K/V propagated from each exiting slot's exit state into every (loop, layer) after its exit loop."""
    loops, max_len = self.model.rec.loops, cache_length(cache)
    later = range(1, loops)  # Loop 0 is never skipped.
    new = propagate_kv(self.model, variables, h_Nx1xD, positions_N[:, None], later)  # [R-1, K, N, H, 1, D]
    later_R = jnp.arange(1, loops)[:, None]  # [R-1, 1]
    write_pos = jnp.where(fill_N[None] & (later_R > loops_N[None]), positions_N[None], max_len)  # [R-1, N]
    slot_ids = jnp.arange(loops_N.shape[0])[None]
    put = lambda c, x: c.at[later_R, :, slot_ids, :, write_pos].set(  # noqa: E731
        jnp.swapaxes(x[:, :, :, :, 0], 1, 2), mode='drop')
    return {'k': put(cache['k'], new['k']), 'v': put(cache['v'], new['v'])}


def _advanced(state: DecodeState, cache, h_Nx1xD, token_N, exits_N, running_N, loops_N) -> DecodeState:
  """`state` after a step that ran every slot at loops_N: a running slot whose token exits emits it and starts its
  next token at loop 0 (one position on), a running slot that does not goes on to its next loop; the others keep
  their place."""
  done = running_N & exits_N
  return state.replace(
      cache=cache, h=h_Nx1xD, tokens=jnp.where(done, token_N, state.tokens),
      loops=jnp.where(running_N, jnp.where(exits_N, 0, loops_N + 1), state.loops),
      positions=jnp.where(done, state.positions + 1, state.positions),
      emitted=jnp.where(done, state.emitted + 1, state.emitted))


__all__ = ['DecodeState', 'SlotDecoder']
