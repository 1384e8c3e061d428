"""KV-cached generation with confidence-based early exit per token, inside jit.

The exit rule itself (confidences, thresholds, first exit) lives in rrt_jax.model.exits.

Prefill runs every loop over the (length-bucketed) prompts. Each decode step then runs the recursive block
loop by loop: after loop b the shared final norm + head give a confidence; a token whose confidence reaches the
threshold exits and emits its token from that loop. The (loop, layer) cache entries it skips are filled either
by propagating its exit hidden state through those layers' K/V projections (kv_fill='propagate', CALM-style)
or by computing the skipped loops in full (kv_fill='full', the oracle). threshold >= 1 disables exiting, which
gives exactly the no-exit output.

Two decodes give the same outputs: 'vmapped' (the default; serve/vmapped_decode.py) runs each row's loops as a
while_loop that stops at its exit, vmapped over the batch, so a step runs as many loops as its deepest row;
'unrolled' runs every loop for every row and selects each row's exit, so exiting saves no compute. Without early
exit (threshold >= 1) both run the unrolled step, whose exit head then reads the vocabulary matrix at the last loop
only, and generate()'s on-device loop carries the per-layer model's cache as one buffer per layer
(`per_layer_cache`).

MIDDLE_CYCLE: the prelude runs once per token before the loops; after every loop b the coda runs on the middle's
output against exit b's own coda slots (the cache has one coda per exit, see model/decoder.py) and the head reads
its result. Exit b's coda slots of a token thus hold the coda K/V of its state after loop b, except that under
kv_fill='propagate' a token that exited before loop b has the coda run on its frozen exit state (the same state
the propagated middle K/V come from), so every exit's coda sees each earlier token at the depth it really
reached. With kv_fill='full' or threshold >= 1 every slot is the no-exit one (exact against full recompute).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rrt_jax.config import LayerLayout
from rrt_jax.model import (
    Decoder,
    init_cache,
    layer_layout,
    loop_variables,
    per_layer_cache,
    propagate_kv,
    with_layer_layout,
)
from rrt_jax.model.exits import ExitConfig, confidence, exits_at, first_exit, select_exit
from rrt_jax.serve.loop_step import join_loop_slots, loop_slots, loop_step, write_token_kv
from rrt_jax.serve.sharding import shard_variables, sharded_cache
from rrt_jax.serve.vmapped_decode import vmapped_step
from rrt_jax.utils.buckets import bucket

# How a decode step runs the loops: 'vmapped' (per-sequence while_loop, vmapped: a batch that exits early runs
# fewer loops; serve/vmapped_decode.py) or 'unrolled' (every loop for every row, the exit selected after).
DECODES = ('vmapped', 'unrolled')


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Checked here, so a bad value fails where it is written (the vocabulary bound of top_k: check_sampling)."""

  temperature: float = 0.0  # 0 = greedy.
  top_k: int = 0  # 0 = no top-k filter.
  top_p: float = 1.0  # 1 = no nucleus filter.
  seed: int = 0  # Base seed; each row / request folds in its own seed (see token_keys).

  def __post_init__(self):
    # NaN compares False with everything, so each check is written to reject it.
    if not (_is_real(self.temperature) and 0 <= self.temperature < math.inf):
      raise ValueError(f'SamplingConfig temperature must be a finite number >= 0 (0 = greedy), got '
                       f'{self.temperature!r}.')
    if not (_is_int(self.top_k) and self.top_k >= 0):
      raise ValueError(f'SamplingConfig top_k must be an integer >= 0 (0 = no top-k filter), got {self.top_k!r}.')
    if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
      raise ValueError(f'SamplingConfig top_p must be a number in (0, 1] (1 = no nucleus filter), got '
                       f'{self.top_p!r}.')
    if not _is_int(self.seed):
      raise ValueError(f'SamplingConfig seed must be an integer, got {self.seed!r}.')


def check_sampling(sampling: SamplingConfig, vocab_size: int) -> None:
  """The checks of a SamplingConfig that need the model: top_k at most the vocabulary."""
  if sampling.top_k > vocab_size:
    raise ValueError(f'SamplingConfig top_k must be in [0, vocab_size={vocab_size}] (0 = no top-k filter), got '
                     f'{sampling.top_k}.')


def check_seed(seed, name: str = 'seed') -> None:
  """Row / request seeds travel as int32 on device."""
  if not (_is_int(seed) and 0 <= seed < 2**31):
    raise ValueError(f'{name} must be an integer in [0, 2**31), got {seed!r}.')


@jax.jit
def token_keys(base_key: jax.Array, seeds_B: jax.Array, token_index_B: jax.Array) -> jax.Array:
  """[B] sampling keys: row b's key for its token_index-th generated token (0 = the prefill's). A function of
  (base seed, row seed, token index) only, so a row's samples do not depend on the other rows of its batch, on
  its slot or on the engine's schedule."""
  row_key = lambda s, t: jax.random.fold_in(jax.random.fold_in(base_key, s), t)  # noqa: E731
  return jax.vmap(row_key)(seeds_B, token_index_B)


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # Generated ids per prompt (stop token excluded).
  exit_loops: list[list[int]]  # 1-based loop at which each generated token exited.


def sample(logits_BxV: jax.Array, sampling: SamplingConfig, rng: jax.Array) -> jax.Array:
  """[B] tokens. rng: one key for the batch, or [B] keys, one per row (see token_keys)."""
  if sampling.temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    cutoff_index = jnp.sum(cum < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  if rng.ndim == 1:
    return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Generator:
  """Jitted prefill and early-exit decode step for one model; reuse it across calls to reuse compilations.

  step(variables, tokens_B, positions_B, cache, rng) -> (tokens, 1-based exit loops, cache); counted_step also
  returns the loops each row ran [B] (the batch ran their max). decode: one of DECODES; both give the same
  outputs."""

  def __init__(self, model: Decoder, exit_cfg: ExitConfig = ExitConfig(), sampling: SamplingConfig = SamplingConfig(),
               decode: str = 'vmapped'):
    if decode not in DECODES:
      raise ValueError(f'Unknown decode {decode!r}: choose one of {DECODES}.')
    if exit_cfg.threshold < 1.0 and not model.rec.loops_are_exits:
      raise ValueError("Early exit needs looping='cycle' or 'middle_cycle': under SEQUENCE a loop does not end in a "
                       'full state.')
    check_sampling(sampling, model.cfg.vocab_size)  # The one check both generate() and the Engine go through.
    self.model, self.exit_cfg, self.sampling, self.decode = model, exit_cfg, sampling, decode
    self.prefill = jax.jit(self._in_layout(self._prefill))
    self.step = jax.jit(self._in_layout(self._step), donate_argnums=(3,))
    self.counted_step = jax.jit(self._in_layout(self._counted_step), donate_argnums=(3,))
    self.decode_loop = jax.jit(self._in_layout(self._decode_loop))

  def _in_layout(self, fn):
    """fn(model, variables, ...) run with self.model in the layer layout of the variables given (stacked as
    trained, or the per-layer serving layout that generate() and the Engine pass: `serving_variables`)."""
    def run(variables, *args):
      return fn(with_layer_layout(self.model, variables, layer_layout(variables))[0], variables, *args)
    return run

  def _choose(self, logits_RxBxV: jax.Array, conf_RxB: jax.Array, rng) -> tuple[jax.Array, jax.Array]:
    """The exit rule on every loop's logits and confidences -> (token, 1-based exit loop)."""
    exit_loop = first_exit(conf_RxB, self.exit_cfg.threshold)
    return sample(select_exit(logits_RxBxV, exit_loop), self.sampling, rng), exit_loop + 1

  def _prefill(self, model, variables, tokens_BxS, lengths_B, cache, rng):
    positions = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
    hidden, cache = model.apply(variables, tokens_BxS, positions, cache=cache, method=Decoder.hidden_states)
    last = jnp.take_along_axis(hidden, (lengths_B - 1)[None, :, None, None], axis=2)[:, :, 0]  # [E, B, D]
    logits = [model.apply(variables, last[b], method=Decoder.logits) for b in range(last.shape[0])]
    prev = [model.apply(variables, tokens_BxS, method=Decoder.embed)[jnp.arange(tokens_BxS.shape[0]),
                                                                      lengths_B - 1]] + list(last[:-1])
    conf = [confidence(self.exit_cfg.confidence, logits[b], last[b], prev[b]) for b in range(len(logits))]
    token, exit_loop = self._choose(jnp.stack(logits), jnp.stack(conf), rng)
    return token, exit_loop, cache

  def _step(self, model, variables, tokens_B, positions_B, cache, rng):
    return self._counted_step(model, variables, tokens_B, positions_B, cache, rng)[:3]

  def _counted_step(self, model, variables, tokens_B, positions_B, cache, rng):
    """One token per row at its own position -> (token, 1-based exit loop, cache, loops run per row)."""
    if not model.rec.loops_are_exits:  # SEQUENCE: no loop ends in a full state; the model's own cached call.
      return (*self._full_step(model, variables, tokens_B, positions_B, cache, rng),
              jnp.full(tokens_B.shape, model.rec.loops, jnp.int32))
    if self.decode == 'unrolled' or not self.exit_cfg.early:  # No row can exit: nothing for a while_loop to save.
      token, exit_loop, cache = self._unrolled_step(model, variables, tokens_B, positions_B, cache, rng)
      return token, exit_loop, cache, jnp.full(tokens_B.shape, model.rec.loops, jnp.int32)
    logits_BxV, exit_loop, cache, loops_B = vmapped_step(model, variables, self.exit_cfg, tokens_B, positions_B,
                                                         cache)
    return sample(logits_BxV, self.sampling, rng), exit_loop + 1, cache, loops_B

  def _decode_loop(self, model, variables, tokens_NxB, exits_NxB, positions_B, cache, base_key, seeds_B,
                   stop_S, steps):
    """Decode steps on device, fed back in a lax.while_loop: no host round trip per token. tokens_NxB / exits_NxB
    hold the prefill's token and exit loop at index 0 (the rest is overwritten); step i (1 <= i < steps) feeds
    token i-1 at position positions_B + i - 1 and writes token i, sampling with row b's key for its i-th token
    (`token_keys`, as the host loop did). Stops after `steps` tokens, or once every row has emitted one of stop_S
    ([S] int32, may be empty). -> (tokens [N, B], exit loops [N, B], tokens written)."""
    def stopped(tokens_B):
      return jnp.any(tokens_B[:, None] == stop_S[None, :], axis=1)

    def cond(carry):
      i, _, _, _, done_B = carry
      return (i < steps) & ~jnp.all(done_B)

    def body(carry):
      i, tokens, exits, cache, done_B = carry
      keys = token_keys(base_key, seeds_B, jnp.full_like(seeds_B, i))
      token, exit_loop, cache, _ = self._counted_step(model, variables, tokens[i - 1], positions_B + i - 1, cache,
                                                      keys)
      return i + 1, tokens.at[i].set(token), exits.at[i].set(exit_loop), cache, done_B | stopped(token)

    if self._plain(model):  # Each layer's K/V in its own carried buffer, written in place (see LayerList).
      cache = per_layer_cache(cache)
    init = (jnp.int32(1), tokens_NxB, exits_NxB, cache, stopped(tokens_NxB[0]))
    count, tokens, exits, _, _ = jax.lax.while_loop(cond, body, init)
    return tokens, exits, count

  def _plain(self, model: Decoder) -> bool:
    """Whether decode steps run every loop with no exit (the unrolled step without early exit), in the per-layer
    layout: the step that takes a per-layer cache (`per_layer_cache`)."""
    return (model.rec.loops_are_exits and not self.exit_cfg.early
            and model.cfg.layer_layout == LayerLayout.PER_LAYER)

  def _full_step(self, model, variables, tokens_B, positions_B, cache, rng):
    """Every layer in the model's own depth order through its cached forward (SEQUENCE looping, whose loop-by-loop
    block would run the layers in CYCLE order)."""
    hidden, cache = model.apply(variables, tokens_B[:, None], positions_B[:, None], cache=cache,
                                method=Decoder.hidden_states)
    logits = model.apply(variables, hidden[-1][:, -1], method=Decoder.logits)
    return sample(logits, self.sampling, rng), jnp.full(tokens_B.shape, model.rec.loops, jnp.int32), cache

  def _unrolled_step(self, model, variables, tokens_B, positions_B, cache, rng):
    """One token per row at its own position: every loop for every row (`loop_step`), each row's exit selected
    after. Under kv_fill='propagate' an exited row's K/V in each later loop are replaced by `propagate_kv` of its
    exit state (what the vmapped step and the engine write). Without early exit only the last loop runs the exit
    head (one read of the vocabulary matrix per token, not R)."""
    rec, early = model.rec, self.exit_cfg.early
    propagate = early and self.exit_cfg.kv_fill == 'propagate'
    tokens, positions = tokens_B[:, None], positions_B[:, None]
    h = model.apply(variables, tokens, method=Decoder.embed)
    prev = h  # The previous exit's hidden state (the embedding before the first), for saturation.
    h, cache = model.apply(variables, h, positions, cache, method=Decoder.decode_prelude)
    exited = jnp.zeros(tokens_B.shape, bool)
    exit_h = jnp.zeros_like(h)  # The middle's state at each row's exit.
    logits_per_loop, conf_per_loop, new_k, new_v = [], [], [], []
    for b in range(rec.loops):
      loop_vars = loop_variables(variables, b)

      def coda(h_next, b=b, cache=cache, exited=exited, exit_h=exit_h):
        coda_in = jnp.where(exited[:, None, None], exit_h, h_next) if propagate else h_next
        return model.apply(variables, coda_in, positions, cache, b, method=Decoder.decode_coda)

      slots = {name: loop_slots(cache[name], b) for name in ('k', 'v')}
      step = loop_step(model, loop_vars, variables, h, prev, positions, slots, self.exit_cfg,
                       coda=coda if rec.unique_layers else None, head=early or b == rec.loops - 1)
      slots = step.slots
      if rec.unique_layers:
        cache = step.coda_aux
      if propagate and b > 0:  # Rows that exited before loop b: their K/V here come from their exit state.
        fill = propagate_kv(model, loop_vars, exit_h, positions, (0,))  # Loop b's LoRA sits at index 0.
        slots = jax.tree.map(
            lambda kv, new, rows=exited: jnp.where(rows[None, None, :, None, None, None],
                                                   write_token_kv(kv, new, positions_B), kv), slots, fill)
      if early:
        newly = ~exited & exits_at(step.conf, self.exit_cfg.threshold)
        exit_h = jnp.where(newly[:, None, None], step.h, exit_h)
        exited |= newly
        logits_per_loop.append(step.logits)
        conf_per_loop.append(step.conf)
      new_k.append(slots['k'])
      new_v.append(slots['v'])
      h, prev = step.h, step.out
    cache = {**cache, 'k': join_loop_slots(new_k), 'v': join_loop_slots(new_v)}
    if not early:
      return sample(step.logits, self.sampling, rng), jnp.full(tokens_B.shape, rec.loops, jnp.int32), cache
    token, exit_loop = self._choose(jnp.stack(logits_per_loop), jnp.stack(conf_per_loop), rng)
    return token, exit_loop, cache


def generator_for(model: Decoder, exit_cfg: ExitConfig = ExitConfig(), sampling: SamplingConfig | None = None,
                  decode: str = 'vmapped') -> Generator:
  """One compiled Generator per (model, exit rule, sampling, decode), shared by every RRTLM (and its at_exit
  views) and by whoever else generates with the same settings."""
  return _generator(model, exit_cfg, sampling or SamplingConfig(), decode)


@functools.lru_cache(maxsize=16)
def _generator(model: Decoder, exit_cfg: ExitConfig, sampling: SamplingConfig, decode: str) -> Generator:
  return Generator(model, exit_cfg, sampling, decode)


def serving_variables(model: Decoder, variables: dict,
                      layout: LayerLayout | str = LayerLayout.PER_LAYER) -> tuple[Decoder, dict]:
  """(model, variables) in the layer layout decoding runs in: by default one buffer per layer (LayerLayout), which
  generate() and the Engine convert to once per call; the values are unchanged. A copy of the looped weights
  while both layouts are alive."""
  return with_layer_layout(model, variables, layout)


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_new_tokens: int,
                     max_len: int) -> None:
  """Clear errors for requests the model cannot serve; generate() and the Engine's per-request check use it."""
  if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
    raise ValueError(f'max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.')
  if not prompts:
    raise ValueError('No prompts given.')
  for i, p in enumerate(prompts):
    ids = np.asarray(p)
    if ids.ndim != 1:
      raise ValueError(f'Prompt {i} must be a flat sequence of token ids, got shape {ids.shape}.')
    if len(ids) == 0:
      raise ValueError(f'Prompt {i} is empty: give at least one token (e.g. the BOS token).')
    if ids.dtype.kind not in 'iu':  # int() would silently truncate 3.7 to 3.
      raise ValueError(f'Prompt {i} must hold integer token ids in [0, {vocab_size}), got {ids.dtype} values '
                       f'{ids[:5].tolist()}.')
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
      raise ValueError(f'Prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5].tolist()}.')
    if len(ids) + max_new_tokens > max_len:
      raise ValueError(f'Prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it needs '
                       f'{len(ids) + max_new_tokens} cache slots but max_len is {max_len}: shorten the prompt, '
                       'generate fewer tokens or raise max_len.')


def generate(model: Decoder, variables: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
             sampling: SamplingConfig = SamplingConfig(), exit_cfg: ExitConfig = ExitConfig(),
             stop_tokens: Sequence[int] = (), max_len: int | None = None,
             generator: Generator | None = None, decode: str = 'vmapped', mesh: Mesh | None = None,
             layer_layout: LayerLayout | str = LayerLayout.PER_LAYER) -> Generation:
  """Generates for a batch of prompts of different lengths; see the module docstring. Row i samples with seed i
  folded into sampling.seed (token_keys), as the Engine's i-th accepted request does by default. decode: how
  the steps run the loops (DECODES); ignored when a generator is given. mesh: a jax.sharding.Mesh to run on, the
  variables and the cache sharded by rrt_jax.serve.sharding (rows over data, heads over tensor). layer_layout:
  the layout decoding reads the weights in (`serving_variables`; 'stacked' keeps the training layout). The
  decode steps run in one on-device loop (`Generator.decode_loop`); the host reads the tokens once."""
  cfg = model.cfg
  validate_prompts(prompts, cfg.vocab_size, max_new_tokens, min(max_len or cfg.max_seq_len, cfg.max_seq_len))
  max_len = max_len or bucket(max(len(p) for p in prompts) + max_new_tokens)
  gen = generator or Generator(model, exit_cfg, sampling, decode)
  model, variables = serving_variables(model, variables, layer_layout)
  rows = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = bucket(int(lengths.max()))
  tokens = np.zeros((rows, width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  if mesh is None:
    cache = init_cache(cfg, model.rec, rows, max(max_len, width))
  else:
    variables = shard_variables(model, variables, mesh)
    cache = sharded_cache(model, mesh, rows, max(max_len, width))
  base, seeds = jax.random.key(sampling.seed), jnp.arange(rows, dtype=jnp.int32)
  token, exit_loop, cache = gen.prefill(variables, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                        token_keys(base, seeds, jnp.zeros(rows, jnp.int32)))
  buffer = bucket(max_new_tokens)  # The on-device loop's output length: one compilation per bucket.
  tokens_NxB = jnp.zeros((buffer, rows), jnp.int32).at[0].set(token)
  exits_NxB = jnp.zeros((buffer, rows), jnp.int32).at[0].set(exit_loop)
  stop = np.asarray(sorted(set(int(t) for t in stop_tokens)), np.int32)
  tokens_NxB, exits_NxB, count = gen.decode_loop(variables, tokens_NxB, exits_NxB, jnp.asarray(lengths), cache,
                                                 base, seeds, jnp.asarray(stop), jnp.int32(max_new_tokens))
  count = int(count)
  token_np, exit_np = np.asarray(tokens_NxB)[:count], np.asarray(exits_NxB)[:count]
  out, exits = [], []
  for i in range(rows):  # Each row up to its first stop token (excluded).
    ends = np.flatnonzero(np.isin(token_np[:, i], stop))
    end = int(ends[0]) if ends.size else count
    out.append(token_np[:end, i].tolist())
    exits.append(exit_np[:end, i].tolist())
  return Generation(out, exits)


__all__ = ['DECODES', 'ExitConfig', 'Generation', 'Generator', 'SamplingConfig', 'check_sampling', 'check_seed',
           'generate', 'generator_for', 'sample', 'serving_variables', 'token_keys', 'validate_prompts']
