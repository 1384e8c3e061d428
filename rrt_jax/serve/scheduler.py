"""The host side of the depth-wise batching engine: which request goes in which slot, and when.

A fixed pool of slots each holds one request. Each engine step (rrt_jax.serve.decode_state.SlotDecoder.step) runs
the shared block once over all slots, each at its own loop; a slot whose token exits emits it, and a finished
request frees its slot for the next arrived request in the queue. With `depthwise=False` the same scheduler is
continuous sequence-wise batching (CSB, Orca-style): all slots run the same loop, a token that exits early leaves
its slot idle until the batch's token finishes (or until every slot has exited), and requests join only at token
boundaries. Per step the host sends which slots run and reads back the tokens, their loops and which exited.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rrt_jax.serve.decode_state import SlotDecoder
from rrt_jax.serve.generate import check_seed, token_keys, validate_prompts
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


def validate_request(request: Request, vocab_size: int, max_len: int) -> str | None:
  """Why the request cannot be served (the checks generate() makes, and a finite arrival), or None."""
  try:
    validate_prompts([request.prompt], vocab_size, request.max_new_tokens, max_len)
    if request.seed is not None:
      check_seed(request.seed, 'Request seed')
    arrival = request.arrival
    if isinstance(arrival, bool) or not isinstance(arrival, int | float) or not 0 <= arrival < math.inf:
      raise ValueError(f'Request arrival must be a finite number of seconds >= 0, got {arrival!r}.')
  except ValueError as e:
    return str(e).replace('Prompt 0', 'The prompt')
  return None


def serve(slots: SlotDecoder, requests: Sequence[Request], depthwise: bool, stop_tokens: Sequence[int],
          sampling_seed: int, progress: bool = False) -> tuple[list[Completion], EngineStats]:
  """Serves `requests` (arrival times in seconds from now) to completion through `slots`; one Completion per
  request (rejected ones carry their error)."""
  loops, n = slots.model.rec.loops, slots.slots
  completions = [Completion(arrival=r.arrival) for r in requests]
  seeds = {}  # Request index -> sampling seed, for accepted requests.
  for i, r in enumerate(requests):  # List order, not arrival order: a request's default seed is its own.
    error = validate_request(r, slots.model.cfg.vocab_size, slots.max_len)
    if error:
      completions[i].error = error
    else:
      seeds[i] = len(seeds) if r.seed is None else r.seed
  queue = deque(sorted(seeds, key=lambda i: requests[i].arrival))
  stats = EngineStats(exit_loop_counts=[0] * loops)
  stop = set(int(t) for t in stop_tokens)
  state = slots.init_state()
  request = np.full(n, -1)  # Request index per slot; -1 = free.
  waiting = np.zeros(n, bool)  # CSB only: exited early, idle until the batch's token boundary.
  phase = 0  # CSB only: the loop every running slot is at.
  base_key = jax.random.key(sampling_seed)
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
    if depthwise or phase == 0:
      for s in np.flatnonzero(request < 0):
        if not queue or requests[queue[0]].arrival > now():
          break
        i = queue.popleft()
        request[s] = i
        t0 = time.perf_counter()
        prompt = list(requests[i].prompt)
        padded = np.zeros((1, min(bucket(len(prompt)), slots.max_len)), np.int32)  # Fits the cache.
        padded[0, :len(prompt)] = prompt
        key = token_keys(base_key, jnp.asarray([seeds[i]], jnp.int32), jnp.zeros(1, jnp.int32))
        token, exit_loop, row = slots.prefill(slots.variables, jnp.asarray(padded),
                                              jnp.asarray([len(prompt)], jnp.int32), key)
        token, exit_loop = int(token), int(exit_loop)
        if emit(s, token, exit_loop):
          state = slots.insert(state, s, row, token, len(prompt), seeds[i])
          waiting[s] = False
        else:
          request[s] = -1
        stats.prefill_s += time.perf_counter() - t0
    running = (request >= 0) & ~waiting
    if not running.any():
      if not queue:
        break
      time.sleep(max(0.0, min(requests[queue[0]].arrival - now(), 0.01)))  # Idle until the next arrival.
      continue
    arrived_waiting = bool(queue) and requests[queue[0]].arrival <= now()
    stats.idle_while_waiting += int(arrived_waiting) * int(n - running.sum())
    if depthwise:
      token_d, loop_d, exits_d, state = slots.step(slots.variables, slots.step_variables, state,
                                                   jnp.asarray(running), base_key)
    else:  # Every running slot is at loop `phase`: that loop's compiled step.
      token_d, loop_d, exits_d, state = slots.uniform_step(slots.loop_views[phase], slots.variables, state,
                                                           jnp.asarray(running), base_key, loop=phase)
    stats.steps += 1
    stats.slot_steps += n
    stats.busy_slot_steps += int(running.sum())
    if not (depthwise or slots.emits_at(phase)):  # No token can exit here: nothing to read, no host sync.
      phase += 1
      continue
    token_np, loop_np, exits_np = np.asarray(token_d), np.asarray(loop_d), np.asarray(exits_d)
    for s in np.flatnonzero(running & exits_np):
      if emit(s, int(token_np[s]), int(loop_np[s])):
        waiting[s] = not depthwise
      else:
        request[s], waiting[s] = -1, False
    if not depthwise:  # Token boundary when the loops are done or every running slot has exited.
      still = (request >= 0) & ~waiting
      phase = phase + 1 if still.any() and phase < loops - 1 else 0
      if phase == 0:
        waiting[:] = False
  stats.wall_s = now()
  bar.close()
  return completions, stats


__all__ = ['Completion', 'EngineStats', 'Request', 'serve', 'validate_request']
