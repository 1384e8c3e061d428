"""Lossless self-speculative decoding: the first loops of a recursive model draft, the full depth verifies.

A model whose loops are exits (CYCLE or MIDDLE_CYCLE) holds its own draft model: its first j loops (what
`first_loops(model, variables, j)` cuts out: the same shared weights and the first j loops' LoRA), read from exit
j. One round per row:

  1. draft: from the last accepted token `t` at position p, the first j loops greedily propose d_1..d_k one token
     at a time, writing their K/V for positions p..p+k-1 into the first j loops' slots of the SAME cache (under
     MIDDLE_CYCLE also the prelude's and exit j's coda slots: an exit's coda slots are read by that exit only);
  2. verify: ONE full-depth cached forward of the k+1 tokens [t, d_1..d_k] at positions p..p+k gives the full
     model's greedy tokens g_0..g_k (g_i follows the i-th input). The longest prefix with d_{i+1} == g_i is
     accepted (n drafts), and g_0..g_n are emitted: the n accepted drafts plus the full model's own next token,
     so every round emits at least one token;
  3. the verify pass wrote every loop's K/V for positions p..p+k: those of the accepted tokens t, d_1..d_n are
     the no-exit K/V greedy decoding writes; the rejected ones lie beyond the row's next position, where the
     cache mask (`cache_mask`: a query sees slots at or before its own position) hides them until they are
     overwritten. The output is therefore greedy no-exit decoding, token for token (up to float rounding of a
     (k+1)-token forward against 1-token ones, which only matters at exact argmax ties).

Rows accept different counts, so each row keeps its own position (the cache and positions are per row). The
rounds run on device in one `lax.while_loop` (jitted once per batch, cache length, token budget and draft
length) over the cache split into one buffer per (depth, layer) (`per_layer_cache`), the loops unrolled, so no
round copies the cache; only the prefill and the final read-out touch the host. Greedy only: speculative
sampling would need the draft's and the full model's distributions (rejection sampling), which this module does
not implement.

draft_len=0 is plain greedy no-exit decoding in the same on-device loop (one full-depth token per round): the
baseline that isolates what speculation buys from what the on-device loop buys over `generate`'s host loop.

Shapes: B rows, k draft length, T cache length, N the output buffer (max_new_tokens + k + 1).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rrt_jax.config import LayerLayout
from rrt_jax.model import Decoder, init_cache, layer_layout, loop_variables, per_layer_cache, with_layer_layout
from rrt_jax.model.exits import ExitConfig
from rrt_jax.serve.generate import SamplingConfig, generator_for, serving_variables, validate_prompts
from rrt_jax.serve.loop_step import join_loop_slots, loop_slots, loop_step
from rrt_jax.utils.buckets import bucket

_NO_EXIT = ExitConfig(threshold=1.0)


@dataclasses.dataclass
class SpeculativeGeneration:
  """tokens: generated ids per prompt (stop token excluded; equal to greedy no-exit `generate`).
  rounds: draft+verify rounds each row ran (the prefill's first token is no round's).
  accepted: per row, the drafted tokens the full model accepted in each of its rounds (0..draft_len)."""

  tokens: list[list[int]]
  rounds: list[int]
  accepted: list[list[int]]
  draft_len: int
  draft_loops: int

  @property
  def acceptance_rate(self) -> float | None:
    """Accepted drafts over drafted tokens, over every row and round (None when nothing was drafted)."""
    drafted = self.draft_len * sum(self.rounds)
    return sum(map(sum, self.accepted)) / drafted if drafted else None

  @property
  def tokens_per_round(self) -> float | None:
    """Mean tokens a round emits per row (1 + accepted drafts): the speed-up bound before the draft's cost."""
    rounds = sum(self.rounds)
    return (sum(map(sum, self.accepted)) + rounds) / rounds if rounds else None


def check_speculative(model: Decoder, draft_loops: int, draft_len: int,
                      sampling: SamplingConfig | None = None) -> None:
  """Clear errors for settings self-speculation cannot run."""
  rec = model.rec
  if not rec.loops_are_exits:
    raise ValueError(f"Self-speculative decoding needs looping='cycle' or 'middle_cycle' (every loop an exit, so "
                     f"the first loops are a draft model), got looping={rec.looping.value!r}.")
  if isinstance(draft_loops, bool) or not isinstance(draft_loops, int) or not 1 <= draft_loops <= rec.loops:
    raise ValueError(f'draft_loops must be an integer in [1, {rec.loops}] (the loops the draft runs; fewer than '
                     f'the model\'s {rec.loops} to save compute), got {draft_loops!r}.')
  if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 0:
    raise ValueError(f'draft_len must be an integer >= 0 (tokens drafted per round; 0 = plain greedy decoding), '
                     f'got {draft_len!r}.')
  if sampling is not None and sampling.temperature > 0:
    raise ValueError(f'Self-speculative decoding is greedy only (lossless against greedy no-exit decoding), got '
                     f'temperature={sampling.temperature}: use SamplingConfig(temperature=0), or rrt_jax.serve.'
                     'generate.generate to sample.')


def cache_len_needed(prompt_lengths: Sequence[int], max_new_tokens: int, draft_len: int) -> int:
  """Cache slots a run needs: the longest prompt, the budget, and the k positions a last round writes past it."""
  return max(prompt_lengths) + max_new_tokens + draft_len


def _forward(model: Decoder, variables: dict, tokens_BxS: jax.Array, positions_BxS: jax.Array, cache,
             loops: int, every_coda: bool):
  """[B, S] greedy tokens of `model`'s exit `loops` after each input token, and the cache with the K/V of loops
  1..loops written (the later loops' slots untouched). The loops are unrolled, each reading and writing its own
  slots of the cache (`loop_slots`: in place, also in the per-layer form a decode loop carries), like generate's
  no-exit step. MIDDLE_CYCLE runs the prelude, and the coda of every exit (every_coda: the verify pass, so the
  cache is greedy decoding's) or of exit `loops` alone (the draft: an exit's coda slots are read by that exit
  only)."""
  unique = model.rec.unique_layers
  h = model.apply(variables, tokens_BxS, method=Decoder.embed)
  h, cache = model.apply(variables, h, positions_BxS, cache, method=Decoder.decode_prelude)
  new = {name: [] for name in ('k', 'v')}
  for b in range(loops):
    def coda(h_next, b=b, cache=cache):
      return model.apply(variables, h_next, positions_BxS, cache, b, method=Decoder.decode_coda)

    slots = {name: loop_slots(cache[name], b) for name in ('k', 'v')}
    step = loop_step(model, loop_variables(variables, b), variables, h, h, positions_BxS, slots, _NO_EXIT,
                     coda=coda if unique and (every_coda or b == loops - 1) else None, head=False)
    if step.coda_aux is not None:
      cache = step.coda_aux
    for name in new:
      new[name].append(step.slots[name])
    h = step.h
  rest = range(loops, model.rec.loops)  # Loops the draft does not run keep their slots.
  cache = {**cache, **{name: join_loop_slots(new[name] + [loop_slots(cache[name], b) for b in rest])
                       for name in new}}
  logits = model.apply(variables, step.out, method=Decoder.logits)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


class SpeculativeDecoder:
  """Jitted prefill and on-device draft+verify rounds for one (model, draft_loops, draft_len); reuse it across
  calls to reuse compilations (`speculative_generate` keeps one per setting)."""

  def __init__(self, model: Decoder, draft_loops: int = 1, draft_len: int = 4):
    check_speculative(model, draft_loops, draft_len)
    self.model, self.draft_loops, self.draft_len = model, draft_loops, draft_len
    self.prefill = generator_for(model, _NO_EXIT).prefill  # Full-depth greedy first token.
    self.decode = jax.jit(self._decode, static_argnames=('max_new_tokens', 'stop_tokens'))

  def _round(self, variables: dict, state: dict, max_new_tokens: int, stop_tokens: tuple[int, ...]) -> dict:
    """One draft+verify round for every row; rows already done keep their state (their compute is wasted)."""
    model = with_layer_layout(self.model, variables, layer_layout(variables))[0]  # The variables' layout.
    k = self.draft_len
    last, pos, cache = state['last'], state['pos'], state['cache']
    if k:
      def draft_step(carry, _):
        token, p, cache = carry
        nxt, cache = _forward(model, variables, token[:, None], p[:, None], cache, self.draft_loops, False)
        return (nxt[:, 0], p + 1, cache), nxt[:, 0]

      (_, _, cache), drafts_KxB = jax.lax.scan(draft_step, (last, pos, cache), None, length=k)
      drafts_BxK = drafts_KxB.T
    else:
      drafts_BxK = jnp.zeros((last.shape[0], 0), jnp.int32)
    inputs = jnp.concatenate([last[:, None], drafts_BxK], axis=1)  # [B, k+1]
    greedy_BxK1, cache = _forward(model, variables, inputs, pos[:, None] + jnp.arange(k + 1), cache,
                                  model.rec.loops, True)
    n_B = jnp.sum(jnp.cumprod(drafts_BxK == greedy_BxK1[:, :k], axis=1), axis=1).astype(jnp.int32)
    active = ~state['done']
    count = state['count']
    write = lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new, at, axis=0)  # noqa: E731
    out = jnp.where(active[:, None], jax.vmap(write)(state['out'], greedy_BxK1, count), state['out'])
    emitted = (jnp.arange(k + 1) <= n_B[:, None]) & (count[:, None] + jnp.arange(k + 1) < max_new_tokens)
    hit = jnp.any(emitted & jnp.isin(greedy_BxK1, jnp.asarray(stop_tokens, jnp.int32)), axis=1) \
        if stop_tokens else jnp.zeros_like(active)
    new_count = jnp.where(active, count + n_B + 1, count)
    done = state['done'] | (active & (hit | (new_count >= max_new_tokens)))
    advance = active & ~done  # A finished row's position stays put, so its later writes stay inside the cache.
    r = state['round']
    return dict(
        last=jnp.where(advance, jnp.take_along_axis(greedy_BxK1, n_B[:, None], axis=1)[:, 0], last),
        pos=jnp.where(advance, pos + n_B + 1, pos), cache=cache, out=out, count=new_count, done=done,
        rounds=state['rounds'] + active, accepted=state['accepted'].at[r].set(jnp.where(active, n_B, -1)),
        round=r + 1)

  def _decode(self, variables: dict, first_B: jax.Array, lengths_B: jax.Array, cache, max_new_tokens: int,
              stop_tokens: tuple[int, ...]) -> dict:
    """Rounds until every row has max_new_tokens tokens or emitted a stop token -> the final state: out [B, N]
    (the first `count` are the row's greedy tokens, the prefill's first), rounds [B], accepted [max_new, B]
    (-1 where the row was done)."""
    rows, k = first_B.shape[0], self.draft_len
    out = jnp.zeros((rows, max_new_tokens + k + 1), jnp.int32).at[:, 0].set(first_B)
    first_stops = jnp.isin(first_B, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else \
        jnp.zeros(rows, bool)
    if layer_layout(variables) == LayerLayout.PER_LAYER:  # Each layer's K/V in its own buffer, written in place.
      cache = per_layer_cache(cache)
    state = dict(last=first_B, pos=lengths_B, cache=cache, out=out, count=jnp.ones(rows, jnp.int32),
                   done=first_stops | (max_new_tokens <= 1), rounds=jnp.zeros(rows, jnp.int32),
                   accepted=jnp.full((max_new_tokens, rows), -1, jnp.int32), round=jnp.int32(0))
    # Every round emits >= 1 token per active row, so max_new_tokens rounds always suffice.
    return jax.lax.while_loop(lambda s: ~jnp.all(s['done']) & (s['round'] < max_new_tokens),
                              lambda s: self._round(variables, s, max_new_tokens, stop_tokens), state)

  def __call__(self, variables: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
               stop_tokens: Sequence[int] = (), max_len: int | None = None) -> SpeculativeGeneration:
    cfg = self.model.cfg
    validate_prompts(prompts, cfg.vocab_size, max_new_tokens, min(max_len or cfg.max_seq_len, cfg.max_seq_len))
    lengths = np.array([len(p) for p in prompts], np.int32)
    needed = cache_len_needed(lengths.tolist(), max_new_tokens, self.draft_len)
    if max_len is not None and max_len < needed:
      raise ValueError(f'max_len={max_len} is too short for self-speculation: the longest prompt '
                       f'({lengths.max()}) + max_new_tokens ({max_new_tokens}) + draft_len ({self.draft_len}, the '
                       f'positions a last round drafts past the budget) = {needed}: raise max_len or lower '
                       'draft_len.')
    width = bucket(int(lengths.max()))
    cache_len = max(max_len or bucket(needed), width)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    cache = init_cache(cfg, self.model.rec, len(prompts), cache_len)
    variables = serving_variables(self.model, variables)[1]  # One buffer per layer, as generate() reads them.
    key = jax.random.key(0)  # Greedy: the key is unused.
    first, _, cache = self.prefill(variables, jnp.asarray(tokens), jnp.asarray(lengths), cache, key)
    stops = tuple(sorted({int(t) for t in stop_tokens}))
    state = self.decode(variables, first, jnp.asarray(lengths), cache, max_new_tokens=max_new_tokens,
                        stop_tokens=stops)
    return self._read_out(state, max_new_tokens, set(stops))

  def _read_out(self, state: dict, max_new_tokens: int, stops: set[int]) -> SpeculativeGeneration:
    out, count = np.asarray(state['out']), np.asarray(state['count'])
    accepted = np.asarray(state['accepted']).T  # [B, max_new]
    tokens = []
    for row, n in zip(out, count, strict=True):
      seq = row[:min(int(n), max_new_tokens)].tolist()
      cut = next((i for i, t in enumerate(seq) if t in stops), len(seq))
      tokens.append(seq[:cut])
    return SpeculativeGeneration(tokens, np.asarray(state['rounds']).tolist(),
                                 [[int(a) for a in row if a >= 0] for row in accepted], self.draft_len,
                                 self.draft_loops)


@functools.lru_cache(maxsize=16)
def speculative_decoder(model: Decoder, draft_loops: int = 1, draft_len: int = 4) -> SpeculativeDecoder:
  """One compiled SpeculativeDecoder per (model, draft_loops, draft_len)."""
  return SpeculativeDecoder(model, draft_loops, draft_len)


def speculative_generate(model: Decoder, variables: dict, prompts: Sequence[Sequence[int]],
                         max_new_tokens: int = 32, draft_loops: int = 1, draft_len: int = 4,
                         stop_tokens: Sequence[int] = (), max_len: int | None = None,
                         sampling: SamplingConfig | None = None) -> SpeculativeGeneration:
  """Greedy no-exit generation of `model` for prompts of any lengths, drafted by its first `draft_loops` loops
  `draft_len` tokens at a time and verified by the full depth (see the module docstring). The tokens equal
  `generate(model, variables, prompts, max_new_tokens, exit_cfg=ExitConfig(threshold=1.0))`'s. max_len: cache
  slots (default: the power of two >= longest prompt + max_new_tokens + draft_len). sampling: greedy only."""
  check_speculative(model, draft_loops, draft_len, sampling)
  return speculative_decoder(model, draft_loops, draft_len)(variables, prompts, max_new_tokens, stop_tokens,
                                                            max_len)


__all__ = ['SpeculativeDecoder', 'SpeculativeGeneration', 'cache_len_needed', 'check_speculative',
           'speculative_decoder', 'speculative_generate']
