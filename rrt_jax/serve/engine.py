"""Continuous depth-wise batching (CDB): a serving engine whose batch mixes loop depths. The device side (every
slot's state and the jitted prefill / insert / step) is rrt_jax.serve.decode_state; the host scheduler is
rrt_jax.serve.scheduler; this module checks what can be served and puts the two together.

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

Cache layout: [R, K, N slots, kv_heads, T, head_dim] (shape letters: see model/decoder.py). A step gathers each
slot's [K, T] slice at its own loop, runs the block on the gathered copy and scatters only the new entries back.

Sharded (`mesh`): the variables by the training rule table and the slot cache and slot states over the mesh
(rrt_jax.serve.sharding: slots over data x fsdp, heads / kv / MLP / vocab over tensor). The jitted prefill and
step return the cache and states in the shardings they take them in, so the donated cache is updated in place and
nothing is moved between steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jax.sharding import Mesh

from rrt_jax.config import Looping
from rrt_jax.model import Decoder
from rrt_jax.model.exits import ExitConfig
from rrt_jax.serve.decode_state import DecodeState, SlotDecoder
from rrt_jax.serve.generate import SamplingConfig
from rrt_jax.serve.scheduler import Completion, EngineStats, Request, serve


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  slots: int = 8  # Max batch: requests decoded at once.
  max_len: int = 256  # Cache positions per slot: prompt + generated tokens must fit.
  depthwise: bool = True  # False: continuous sequence-wise batching (the baseline).
  exit: ExitConfig = ExitConfig()
  sampling: SamplingConfig = SamplingConfig()
  stop_tokens: tuple[int, ...] = ()


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
    self.model, self.config, self.mesh = model, config, mesh
    self.max_len = min(config.max_len, model.cfg.max_seq_len)
    self.slots = SlotDecoder(model, variables, config.slots, self.max_len, config.exit, config.sampling, mesh,
                             sequencewise=not config.depthwise)
    self.variables = self.slots.variables

  def initial_state(self) -> DecodeState:
    return self.slots.init_state()

  def run(self, requests: Sequence[Request], progress: bool = False) -> tuple[list[Completion], EngineStats]:
    """Serves `requests` (arrival times in seconds from now) to completion; one Completion per request."""
    config = self.config
    return serve(self.slots, requests, config.depthwise, config.stop_tokens, config.sampling.seed, progress)


__all__ = ['Completion', 'DecodeState', 'Engine', 'EngineConfig', 'EngineStats', 'Request']
