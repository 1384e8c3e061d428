"""KV-cached generation with confidence-based early exit per token, inside jit.

The exit rule itself (confidences, thresholds, first exit) lives in rrt_jax.model.exits.

Prefill runs every loop over the (length-bucketed) prompts. Each decode step then runs the recursive block
loop by loop: after loop b the shared final norm + head give a confidence; a token whose confidence reaches the
threshold exits and emits its token from that loop. The (loop, layer) cache entries it skips are filled either
by propagating its exit hidden state through those layers' K/V projections (kv_fill='propagate', CALM-style)
or by computing the skipped loops in full (kv_fill='full', the oracle). threshold >= 1 disables exiting, which
gives exactly the no-exit output.

MIDDLE_CYCLE: the prelude runs once per token before the loops; after every loop b the coda runs on the middle's
output against exit b's own coda slots (the cache has one coda per exit, see model/decoder.py) and the head reads
its result. Exit b's coda slots of a token thus hold the coda K/V of its state after loop b, except that under
kv_fill='propagate' a token that exited before loop b has the coda run on its frozen exit state (the same state
the propagated middle K/V come from), so every exit's coda sees each earlier token at the depth it really
reached. With kv_fill='full' or threshold >= 1 every slot is the no-exit one (exact against full recompute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rrt_jax.model import Decoder, init_cache, loop_variables, one_loop
from rrt_jax.model.exits import ExitConfig, confidence, exits_at, first_exit, select_exit
from rrt_jax.utils.buckets import bucket


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0  # 0 = greedy.
  top_k: int = 0  # 0 = no top-k filter.
  top_p: float = 1.0  # 1 = no nucleus filter.
  seed: int = 0


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # Generated ids per prompt (stop token excluded).
  exit_loops: list[list[int]]  # 1-based loop at which each generated token exited.


def sample(logits_BxV: jax.Array, sampling: SamplingConfig, rng: jax.Array) -> jax.Array:
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
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Generator:
  """Jitted prefill and early-exit decode step for one model; reuse it across calls to reuse compilations."""

  def __init__(self, model: Decoder, exit_cfg: ExitConfig = ExitConfig(), sampling: SamplingConfig = SamplingConfig()):
    if exit_cfg.threshold < 1.0 and not model.rec.loops_are_exits:
      raise ValueError("Early exit needs looping='cycle' or 'middle_cycle': under SEQUENCE a loop does not end in a "
                       'full state.')
    self.model, self.exit_cfg, self.sampling = model, exit_cfg, sampling
    self.one_loop = one_loop(model)
    self.prefill = jax.jit(self._prefill)
    self.step = jax.jit(self._step, donate_argnums=(3,))

  def _choose(self, logits_RxBxV: jax.Array, conf_RxB: jax.Array, rng) -> tuple[jax.Array, jax.Array]:
    """The exit rule on every loop's logits and confidences -> (token, 1-based exit loop)."""
    exit_loop = first_exit(conf_RxB, self.exit_cfg.threshold)
    return sample(select_exit(logits_RxBxV, exit_loop), self.sampling, rng), exit_loop + 1

  def _prefill(self, variables, tokens_BxS, lengths_B, cache, rng):
    positions = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
    hidden, cache = self.model.apply(variables, tokens_BxS, positions, cache=cache,
                                     method=Decoder.hidden_states)
    last = jnp.take_along_axis(hidden, (lengths_B - 1)[None, :, None, None], axis=2)[:, :, 0]  # [E, B, D]
    logits = [self.model.apply(variables, last[b], method=Decoder.logits) for b in range(last.shape[0])]
    prev = [self.model.apply(variables, tokens_BxS, method=Decoder.embed)[jnp.arange(tokens_BxS.shape[0]),
                                                                           lengths_B - 1]] + list(last[:-1])
    conf = [confidence(self.exit_cfg.confidence, logits[b], last[b], prev[b]) for b in range(len(logits))]
    token, exit_loop = self._choose(jnp.stack(logits), jnp.stack(conf), rng)
    return token, exit_loop, cache

  def _step(self, variables, tokens_B, positions_B, cache, rng):
    """One token per row at its own position: loop-by-loop with early exit."""
    model, rec = self.model, self.model.rec
    propagate = self.exit_cfg.kv_fill == 'propagate'
    tokens, positions = tokens_B[:, None], positions_B[:, None]
    h = model.apply(variables, tokens, method=Decoder.embed)
    prev = h  # The previous exit's hidden state (the embedding before the first), for saturation.
    h, cache = model.apply(variables, h, positions, cache, method=Decoder.decode_prelude)
    exited = jnp.zeros(tokens_B.shape, bool)
    exit_h = jnp.zeros_like(h)  # The middle's state at each row's exit.
    logits_per_loop, conf_per_loop, new_k, new_v = [], [], [], []
    for b in range(rec.loops):
      kv_state = (exit_h, exited) if propagate else None
      loop_cache = {'k': cache['k'][b:b + 1], 'v': cache['v'][b:b + 1]}
      hidden, loop_cache = self.one_loop.apply(loop_variables(variables, b), h, positions, loop_cache,
                                               kv_state, method=Decoder.decode_stack)
      h_next = hidden[-1]
      coda_in = jnp.where(exited[:, None, None], exit_h, h_next) if propagate and rec.unique_layers else h_next
      out, cache = model.apply(variables, coda_in, positions, cache, b, method=Decoder.decode_coda)
      logits = model.apply(variables, out, method=Decoder.logits)[:, -1]
      conf = confidence(self.exit_cfg.confidence, logits, out[:, -1], prev[:, -1])
      newly = ~exited & exits_at(conf, self.exit_cfg.threshold)
      exit_h = jnp.where(newly[:, None, None], h_next, exit_h)
      exited |= newly
      logits_per_loop.append(logits)
      conf_per_loop.append(conf)
      new_k.append(loop_cache['k'])
      new_v.append(loop_cache['v'])
      h, prev = h_next, out
    token, exit_loop = self._choose(jnp.stack(logits_per_loop), jnp.stack(conf_per_loop), rng)
    return token, exit_loop, {**cache, 'k': jnp.concatenate(new_k), 'v': jnp.concatenate(new_v)}


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_new_tokens: int,
                     max_len: int) -> None:
  """Clear errors for requests the model cannot serve."""
  if not prompts:
    raise ValueError('No prompts given.')
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f'Prompt {i} is empty: give at least one token (e.g. the BOS token).')
    bad = [t for t in p if not 0 <= int(t) < vocab_size]
    if bad:
      raise ValueError(f'Prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.')
    if len(p) + max_new_tokens > max_len:
      raise ValueError(f'Prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs '
                       f'{len(p) + max_new_tokens} cache slots but max_len is {max_len}: shorten the prompt, '
                       'generate fewer tokens or raise max_len.')


def generate(model: Decoder, variables: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
             sampling: SamplingConfig = SamplingConfig(), exit_cfg: ExitConfig = ExitConfig(),
             stop_tokens: Sequence[int] = (), max_len: int | None = None,
             generator: Generator | None = None) -> Generation:
  """Generates for a batch of prompts of different lengths; see the module docstring."""
  cfg = model.cfg
  max_len = max_len or bucket(max(len(p) for p in prompts) + max_new_tokens) if prompts else 0
  validate_prompts(prompts, cfg.vocab_size, max_new_tokens, min(max_len, cfg.max_seq_len))
  gen = generator or Generator(model, exit_cfg, sampling)
  rows = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = bucket(int(lengths.max()))
  tokens = np.zeros((rows, width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  cache = init_cache(cfg, model.rec, rows, max(max_len, width))
  rng = jax.random.key(sampling.seed)
  token, exit_loop, cache = gen.prefill(variables, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                        jax.random.fold_in(rng, 0))
  out = [[] for _ in range(rows)]
  exits = [[] for _ in range(rows)]
  done = np.zeros(rows, bool)
  positions = lengths.copy()
  stop = set(int(t) for t in stop_tokens)
  for step in range(max_new_tokens):
    token_np, exit_np = np.asarray(token), np.asarray(exit_loop)
    for i in range(rows):
      if done[i]:
        continue
      if int(token_np[i]) in stop:
        done[i] = True
        continue
      out[i].append(int(token_np[i]))
      exits[i].append(int(exit_np[i]))
    if done.all() or step == max_new_tokens - 1:
      break
    token, exit_loop, cache = gen.step(variables, token, jnp.asarray(positions), cache,
                                       jax.random.fold_in(rng, step + 1))
    positions += 1
  return Generation(out, exits)


__all__ = ['ExitConfig', 'Generation', 'Generator', 'SamplingConfig', 'generate', 'sample', 'validate_prompts']
