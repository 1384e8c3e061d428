"""Continuous depth-wise batching (CDB): a serving engine whose batch mixes loop depths.

A fixed pool of slots each holds one request: its position, its loop index b and its hidden state. Every
engine step runs the shared block ONCE over all slots, each at its own loop (relaxed models select each slot's
LoRA by its loop inside one batched matmul, see model/lora.py), then the shared exit head. A slot whose token
exits (confidence >= threshold, or the last loop) emits it and starts its next token at loop 0 in the next step; a
finished request frees its slot for the next request in the queue. Exited tokens' skipped (loop, layer) K/V are
filled by propagating the exit state through those layers' K/V projections (CALM-style, as
`generate(..., ExitConfig(kv_fill='propagate'))` does), so greedy outputs equal sequential early-exit decoding.

With `depthwise=False` the same engine is continuous sequence-wise batching (CSB, Orca-style): all slots run
the same loop, a token that exits early leaves an idle slot until the batch's token finishes (or until every
slot has exited), and new requests join only at token boundaries. The vanilla model (R = 1) runs through it.

Cache layout: [R, K, N slots, T, kv_heads, head_dim] (shape letters: see model/decoder.py). A step gathers each
slot's [K, T] slice at its own loop, runs the block on the gathered copy and scatters only the new entries back.

Sharded (`mesh`): the variables by the training rule table and the slot cache and slot states over the mesh
(rrt_jax.serve.sharding: slots over data x fsdp, heads / kv / MLP / vocab over tensor). The jitted prefill and
step return the cache and states in the shardings they take them in, so the donated cache is updated in place and
nothing is moved between steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from rrt_jax.config import Looping
from rrt_jax.model import Decoder, init_cache, multi_lora_variables, one_loop, propagate_kv
from rrt_jax.model.exits import ExitConfig, confidence, exits_at
from rrt_jax.serve.generate import Generator, SamplingConfig, check_seed, sample, token_keys, validate_prompts
from rrt_jax.serve.sharding import cache_shardings, rows_sharding, shard_variables, sharded_cache
from rrt_jax.sharding import replicated
from rrt_jax.utils.buckets import bucket


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: Sequence[int]
  max_new_tokens: int
  arrival: float = 0.0  # Seconds after the engine starts; the engine does not see the request before.
  # Sampling seed, folded into EngineConfig.sampling.seed; with the token index it alone keys this request's
  # samples (token_keys), so they do not depend on its slot, the schedule or the other requests. None: the
  # request's index among the run's accepted requests (in list order), so a rejected request shifts no one's
  # samples, and the i-th accepted request samples as row i of generate() with the same SamplingConfig.
  seed: int | None = None


@dataclasses.dataclass
class Completion:
  tokens: list[int] = dataclasses.field(default_factory=list)  # Generated ids (stop token excluded).
  exit_loops: list[int] = dataclasses.field(default_factory=list)  # 1-based exit loop of each token.
  error: str | None = None  # Why the request was rejected (then tokens is empty).
  arrival: float = 0.0
  first_token: float | None = None  # Seconds after the engine started.
  finished: float | None = None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  slots: int = 8  # Max batch: requests decoded at once.
  max_len: int = 256  # Cache positions per slot: prompt + generated tokens must fit.
  depthwise: bool = True  # False: continuous sequence-wise batching (the baseline).
  exit: ExitConfig = ExitConfig()
  sampling: SamplingConfig = SamplingConfig()
  stop_tokens: tuple[int, ...] = ()


@dataclasses.dataclass
class EngineStats:
  wall_s: float = 0.0  # Whole run, prefill included.
  prefill_s: float = 0.0
  steps: int = 0  # Engine steps (one pass of the shared block each).
  tokens: int = 0  # Generated tokens, prefill tokens included.
  busy_slot_steps: int = 0  # Sum over steps of the slots doing useful work.
  slot_steps: int = 0  # Sum over steps of all slots.
  idle_while_waiting: int = 0  # Slot-steps left idle while an arrived request waited (CDB: must be 0).
  exit_loop_counts: list[int] = dataclasses.field(default_factory=list)

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / self.wall_s if self.wall_s else 0.0

  @property
  def decode_tokens_per_s(self) -> float:
    decode_s = self.wall_s - self.prefill_s
    return self.tokens / decode_s if decode_s > 0 else 0.0

  @property
  def utilisation(self) -> float:
    return self.busy_slot_steps / self.slot_steps if self.slot_steps else 0.0


class Engine:
  """Serves a stream of requests with continuous depth-wise (or sequence-wise) batching; see module doc. With
  `mesh`, the variables are placed sharded (a model that does not split over it is one error) and the slots are
  split over its data axes (replicated, with a warning, where config.slots does not divide)."""

  def __init__(self, model: Decoder, variables: dict, config: EngineConfig = EngineConfig(), mesh: Mesh | None = None):
    rec = model.rec
    if rec.unique_layers:  # Its slots step through loops of one block; a prelude and per-exit coda are not scheduled.
      raise ValueError(f"The depth-wise batching engine needs the whole depth to be the loop: looping='middle_cycle' "
                       f'with unique_layers={rec.unique_layers} has a prelude and a coda it cannot schedule. Use '
                       "looping='cycle' (unique_layers=0), or serve this model with rrt_jax.serve.generate.generate.")
    if rec.loops > 1 and rec.looping == Looping.SEQUENCE:
      raise ValueError('Depth-wise batching needs looping=cycle: under SEQUENCE a loop is not a full pass.')
    if config.exit.kv_fill != 'propagate':
      raise ValueError("The engine fills skipped K/V by propagation (ExitConfig(kv_fill='propagate')); the 'full' "
                       'oracle recomputes skipped loops and would defeat early exit.')
    if config.slots < 1:
      raise ValueError(f'slots must be >= 1, got {config.slots}.')
    self.model, self.config = model, config
    self.max_len = min(config.max_len, model.cfg.max_seq_len)
    self.generator = Generator(model, config.exit, config.sampling)
    self.one_loop = one_loop(model)
    self.mesh = mesh
    self.variables = variables if mesh is None else shard_variables(model, variables, mesh)
    self.step_variables = multi_lora_variables(self.variables)  # Every slot selects its own loop's LoRA.
    self.relaxed = len(self.step_variables) > 1
    prefill_out, step_out = {}, {}
    if mesh is not None:  # Outputs pinned to the inputs' shardings: the donated cache aliases, no per-step moves.
      cache, host = cache_shardings(model, mesh, config.slots), replicated(mesh)  # host: tokens the host reads.
      prefill_out = {'out_shardings': (host, host, cache)}
      step_out = {'out_shardings': (host, host, self._state_sharding(), cache)}
    self._prefill = jax.jit(self._prefill_into_slot, donate_argnums=(1,), **prefill_out)
    self._step = jax.jit(self._engine_step, donate_argnums=(2,), **step_out)

  def _state_sharding(self):
    return rows_sharding(self.mesh, (self.config.slots, 1, self.model.cfg.d_model))

  def _initial_state(self) -> tuple[dict, jax.Array]:
    """Zero slot cache [R, K, N, T, ...] and slot states [N, 1, D], in the step's shardings."""
    cfg, slots = self.model.cfg, self.config.slots
    h = jnp.zeros((slots, 1, cfg.d_model), jnp.dtype(cfg.dtype))
    if self.mesh is None:
      return init_cache(cfg, self.model.rec, slots, self.max_len), h
    return sharded_cache(self.model, self.mesh, slots, self.max_len), jax.device_put(h, self._state_sharding())

  # ---- Device functions -------------------------------------------------------------------------------------

  def _prefill_into_slot(self, variables, cache, slot, tokens_1xS, length_1, rng):
    """Prefills one request into its slot's cache rows (every loop); returns its first token and exit loop."""
    # A fresh row, not a slice of the slot's: its old entries are never read (every position a step attends to is
    # written first), and slicing slots split over the mesh would gather the whole cache onto every device.
    row = jax.tree.map(lambda c: jnp.zeros(c.shape[:2] + (1,) + c.shape[3:], c.dtype), cache)
    token, exit_loop, row = self.generator.prefill(variables, tokens_1xS, length_1, row, rng)
    cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=2), cache, row)
    return token[0], exit_loop[0], cache

  def _engine_step(self, variables, step_variables, cache, tokens_N, h_Nx1xD, loops_N, positions_N, write_N, base_key,
                   seeds_N, emitted_N):
    """One pass of the shared block over all N slots, each at its own loop. Returns (token, exits, h, cache).
    Slot s samples with its request's key for its next token (seeds_N, emitted_N: see token_keys)."""
    model, loops = self.model, self.model.rec.loops
    slots, max_len = tokens_N.shape[0], cache['k'].shape[3]
    slot_ids = jnp.arange(slots)
    head_vars = {'params': variables['params']}
    embedded = model.apply(head_vars, tokens_N[:, None], method=Decoder.embed)
    h_in = jnp.where((loops_N == 0)[:, None, None], embedded, h_Nx1xD)
    # Each slot's cache at its own loop: [N, K, T, ...] -> [1 loop, K, N, T, ...].
    gathered = jax.tree.map(lambda c: jnp.moveaxis(c[loops_N, :, slot_ids], 0, 1)[None], cache)
    onehot = jax.nn.one_hot(loops_N, loops, dtype=jnp.float32) if self.relaxed else None
    hidden, gathered = self.one_loop.apply(step_variables, h_in, positions_N[:, None], gathered, None, onehot,
                                           method=Decoder.decode_stack)
    h_out = hidden[-1]
    logits = model.apply(head_vars, h_out, method=Decoder.logits)[:, -1]
    exit_cfg = self.config.exit
    conf = confidence(exit_cfg.confidence, logits, h_out[:, -1], h_in[:, -1])
    exits = (loops_N == loops - 1) | exits_at(conf, exit_cfg.threshold)
    token = sample(logits, self.config.sampling, token_keys(base_key, seeds_N, emitted_N))
    # Scatter the new K/V: mode='drop' with an out-of-range position skips slots that must not write.
    write_pos = jnp.where(write_N, positions_N, max_len)
    cache = jax.tree.map(
        lambda c, g: c.at[loops_N, :, slot_ids, write_pos].set(jnp.swapaxes(g[0][:, slot_ids, positions_N], 0, 1),
                                                               mode='drop'), cache, gathered)
    if loops > 1 and exit_cfg.early:
      fill = write_N & exits & (loops_N < loops - 1)
      cache = jax.lax.cond(jnp.any(fill), self._fill_skipped_kv, lambda _, c, *__: c, variables, cache, h_out,
                           loops_N, positions_N, fill)
    return token, exits, h_out, cache

  def _fill_skipped_kv(self, variables, cache, h_Nx1xD, loops_N, positions_N, fill_N):
    """Writes K/V propagated from each exiting slot's exit state into every (loop, layer) after its exit loop."""
    loops, max_len = self.model.rec.loops, cache['k'].shape[3]
    later = range(1, loops)  # Loop 0 is never skipped.
    new = propagate_kv(self.model, variables, h_Nx1xD, positions_N[:, None], later)  # [R-1, K, N, 1, ...]
    later_R = jnp.arange(1, loops)[:, None]  # [R-1, 1]
    write_pos = jnp.where(fill_N[None] & (later_R > loops_N[None]), positions_N[None], max_len)  # [R-1, N]
    slot_ids = jnp.arange(loops_N.shape[0])[None]
    put = lambda c, x: c.at[later_R, :, slot_ids, write_pos].set(jnp.swapaxes(x[:, :, :, 0], 1, 2),  # noqa: E731
                                                                 mode='drop')
    return {'k': put(cache['k'], new['k']), 'v': put(cache['v'], new['v'])}

  # ---- Host scheduler --------------------------------------------------------------------------------------

  def run(self, requests: Sequence[Request], progress: bool = False) -> tuple[list[Completion], EngineStats]:
    """Serves `requests` (arrival times in seconds from now) to completion; one Completion per request."""
    config, loops = self.config, self.model.rec.loops
    slots = config.slots
    completions = [Completion(arrival=r.arrival) for r in requests]
    seeds = {}  # Request index -> sampling seed, for accepted requests.
    for i, r in enumerate(requests):  # List order, not arrival order: a request's default seed is its own.
      error = self._validate(r)
      if error:
        completions[i].error = error
      else:
        seeds[i] = len(seeds) if r.seed is None else r.seed
    queue = deque(sorted(seeds, key=lambda i: requests[i].arrival))
    stats = EngineStats(exit_loop_counts=[0] * loops)
    stop = set(int(t) for t in config.stop_tokens)
    cache, h = self._initial_state()
    request = np.full(slots, -1)  # Request index per slot; -1 = free.
    tokens, loop, pos = np.zeros(slots, np.int32), np.zeros(slots, np.int32), np.zeros(slots, np.int32)
    seed, emitted = np.zeros(slots, np.int32), np.zeros(slots, np.int32)  # Per slot: its request's seed, tokens out.
    waiting = np.zeros(slots, bool)  # CSB only: exited early, idle until the batch's token boundary.
    phase = 0  # CSB only: the loop every running slot is at.
    base_key = jax.random.key(config.sampling.seed)
    start = time.perf_counter()
    now = lambda: time.perf_counter() - start  # noqa: E731
    bar = tqdm(total=sum(requests[i].max_new_tokens for i in queue), desc='serving', unit='tok', disable=not progress)

    def emit(s: int, token: int, exit_loop: int) -> bool:
      """Records a token for the request in slot s; True if the request goes on."""
      done = completions[request[s]]
      if done.first_token is None:
        done.first_token = now()
      if token in stop:
        done.finished = now()
        return False
      done.tokens.append(token)
      done.exit_loops.append(exit_loop)
      stats.tokens += 1
      stats.exit_loop_counts[exit_loop - 1] += 1
      bar.update(1)
      if len(done.tokens) >= requests[request[s]].max_new_tokens:
        done.finished = now()
        return False
      return True

    while queue or (request >= 0).any():
      # Admission: free slots take arrived requests (CSB: only at a token boundary).
      if config.depthwise or phase == 0:
        for s in np.flatnonzero(request < 0):
          if not queue or requests[queue[0]].arrival > now():
            break
          i = queue.popleft()
          request[s] = i
          t0 = time.perf_counter()
          prompt = list(requests[i].prompt)
          padded = np.zeros((1, min(bucket(len(prompt)), self.max_len)), np.int32)  # Fits the cache.
          padded[0, :len(prompt)] = prompt
          seed[s], emitted[s] = seeds[i], 0
          token, exit_loop, cache = self._prefill(self.variables, cache, s, jnp.asarray(padded),
                                                  jnp.asarray([len(prompt)], jnp.int32),
                                                  token_keys(base_key, seed[s:s + 1], emitted[s:s + 1]))
          token, exit_loop = int(token), int(exit_loop)
          stats.prefill_s += time.perf_counter() - t0
          if emit(s, token, exit_loop):
            tokens[s], pos[s], loop[s], waiting[s], emitted[s] = token, len(prompt), phase, False, 1
          else:
            request[s] = -1
      running = (request >= 0) & ~waiting
      if not running.any():
        if not queue:
          break
        time.sleep(max(0.0, min(requests[queue[0]].arrival - now(), 0.01)))  # Idle until the next arrival.
        continue
      arrived_waiting = bool(queue) and requests[queue[0]].arrival <= now()
      stats.idle_while_waiting += int(arrived_waiting) * int(slots - running.sum())
      token_d, exits_d, h, cache = self._step(self.variables, self.step_variables, cache, jnp.asarray(tokens), h,
                                              jnp.asarray(loop), jnp.asarray(pos), jnp.asarray(running),
                                              base_key, jnp.asarray(seed), jnp.asarray(emitted))
      token_np, exits_np = np.asarray(token_d), np.asarray(exits_d)
      stats.steps += 1
      stats.slot_steps += slots
      stats.busy_slot_steps += int(running.sum())
      for s in np.flatnonzero(running):
        if not exits_np[s]:
          loop[s] += 1
          continue
        if emit(s, int(token_np[s]), int(loop[s]) + 1):
          tokens[s], pos[s], loop[s], emitted[s] = token_np[s], pos[s] + 1, 0, emitted[s] + 1
          waiting[s] = not config.depthwise
        else:
          request[s], waiting[s] = -1, False
      if not config.depthwise:  # Token boundary when the loops are done or every running slot has exited.
        still = (request >= 0) & ~waiting
        phase = phase + 1 if still.any() and phase < loops - 1 else 0
        if phase == 0:
          loop[:] = 0
          waiting[:] = False
    stats.wall_s = now()
    bar.close()
    return completions, stats

  def _validate(self, request: Request) -> str | None:
    """Why the request cannot be served (the checks generate() makes), or None."""
    try:
      validate_prompts([request.prompt], self.model.cfg.vocab_size, request.max_new_tokens, self.max_len)
      if request.seed is not None:
        check_seed(request.seed, 'Request seed')
    except ValueError as e:
      return str(e).replace('Prompt 0', 'The prompt')
    return None


__all__ = ['Completion', 'Engine', 'EngineConfig', 'EngineStats', 'Request']
