"""Run by test_sharded_serving.py in a subprocess with 8 emulated CPU devices (the count is fixed when jax starts):
serves a tiny relaxed model unsharded and over a mesh and prints both results as one JSON line.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharded_serving.py quick
"""

from __future__ import annotations

import json
import logging
import sys
import time

import jax
import jax.numpy as jnp
from unroll import perturb

from rrt_jax import Decoder, RecursionConfig, presets
from rrt_jax.config import Looping
from rrt_jax.model import init_variables
from rrt_jax.serve.engine import Engine, EngineConfig, Request
from rrt_jax.serve.generate import ExitConfig, generate
from rrt_jax.serve.sharding import cache_shardings
from rrt_jax.sharding import make_mesh

jax.config.update('jax_default_matmul_precision', 'highest')  # As tests/conftest.py: fp32 on both sides.

CFG = presets.TINY_LLAMA  # heads 4, kv_heads 2, mlp 128, vocab 512.
PROMPTS = [[5, 17, 3], [9, 2, 44, 101, 7, 8, 300], [11], list(range(4, 18)), [7, 8]]  # One length bucket.
NEW_TOKENS = [8, 5, 10, 6, 9]
EXIT = ExitConfig(threshold=0.025)  # Mixes exit loops 1-3 on this random model (see test_engine.py).
RELAXED = RecursionConfig(loops=3, lora_rank=4)
BAD = [Request([], 4), Request([1, CFG.vocab_size + 3], 4), Request([1] * 60, 10)]


class Warnings(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def relaxed(rec: RecursionConfig = RELAXED) -> tuple[Decoder, dict]:
  variables = jax.tree.map(jnp.asarray, perturb(init_variables(CFG, rec, jax.random.key(0)), 0, 0.02))
  return Decoder(CFG, rec), variables


def generations(model, variables, mesh, prompts, **kw) -> dict:
  out = {}
  for name, m in (('plain', None), ('sharded', mesh)):
    g = generate(model, variables, prompts, max_new_tokens=8, exit_cfg=EXIT, max_len=64, mesh=m, **kw)
    out[name] = {'tokens': g.tokens, 'exit_loops': g.exit_loops}
  return out


def engine_runs(model, variables, mesh, config: EngineConfig) -> dict:
  """Good requests interleaved with bad ones, unsharded and sharded."""
  good = [Request(p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
  mixed = [good[0], BAD[0], good[1], good[2], BAD[1], good[3], BAD[2], good[4]]
  out = {}
  for name, m in (('plain', None), ('sharded', mesh)):
    engine = Engine(model, variables, config, mesh=m)
    completions, stats = engine.run(mixed)
    out[name] = {'tokens': [c.tokens for c in completions], 'exit_loops': [c.exit_loops for c in completions],
                 'errors': [c.error for c in completions], 'tokens_served': stats.tokens,
                 'step_compiles': step_compiles(engine)}  # 1: every step took the same shardings.
  out['placement'] = step_placement(engine)
  return out


def step_compiles(engine: Engine) -> float:
  """Compilations per step program: the depth-wise step, or each loop's sequence-wise step (one per loop run)."""
  if engine.config.depthwise:
    return engine.slots.step._cache_size()
  return engine.slots.uniform_step._cache_size() / engine.model.rec.loops


def step_placement(engine: Engine) -> dict:
  """One engine step from the initial state: do the cache and states come back in the shardings they went in?
  (Sequence-wise: loop 0's step and cache buffer.)"""
  state = engine.initial_state()
  running = jnp.ones(engine.config.slots, bool)
  slots, key = engine.slots, jax.random.key(0)
  if engine.config.depthwise:
    cache, h = state.cache, state.h
    _, _, _, out = slots.step(engine.variables, slots.step_variables, state, running, key)
    cache_out = out.cache
  else:
    cache, h = state.cache[0], state.h
    _, _, _, out = slots.uniform_step(slots.loop_views[0], engine.variables, state, running, key, loop=0)
    cache_out = out.cache[0]
  cache_in, h_in = cache['k'].sharding, h.sharding
  h_out = out.h
  return {'cache_kept': cache_out['k'].sharding.is_equivalent_to(cache_in, cache['k'].ndim),
          'h_kept': h_out.sharding.is_equivalent_to(h_in, 3),
          'cache_shard': list(cache_out['k'].addressable_shards[0].data.shape), 'cache': list(cache_out['k'].shape)}


def logits_diff(model, variables, mesh) -> float:
  """Largest |sharded - unsharded| of the full forward pass's logits (tensor-parallel sums reorder fp32 adds)."""
  from rrt_jax.serve.sharding import shard_variables
  tokens = jnp.asarray([PROMPTS[3][:16]] * 4)
  plain = jax.jit(model.apply)(variables, tokens)[0]
  sharded = jax.jit(model.apply)(shard_variables(model, variables, mesh), tokens)[0]
  return float(jnp.max(jnp.abs(sharded - plain)))


def timed(**parts) -> dict:
  out, seconds = {}, {}
  for name, part in parts.items():
    start = time.perf_counter()
    out[name] = part()
    seconds[name] = round(time.perf_counter() - start, 1)
  return {**out, 'seconds': seconds}


def quick() -> dict:
  """data=4 x tensor=2: every dimension divides (4 rows / slots over data, heads and kv_heads over tensor)."""
  model, variables = relaxed()
  mesh = make_mesh(data=4, tensor=2)
  return timed(logits_diff=lambda: logits_diff(model, variables, mesh),
               generate=lambda: generations(model, variables, mesh, PROMPTS[:4]),
               engine=lambda: engine_runs(model, variables, mesh, EngineConfig(slots=4, max_len=64, exit=EXIT)))


def uneven() -> dict:
  """data=2 x tensor=4: kv_heads=2 and 3 rows / slots do not divide (replicated there, with a warning);
  sequence-wise engine; MIDDLE_CYCLE (prelude and per-exit coda caches) through generate()."""
  model, variables = relaxed()
  mesh = make_mesh(data=2, tensor=4)
  spec = cache_shardings(model, mesh, 3)['k'].spec
  middle = relaxed(RecursionConfig(loops=2, lora_rank=4, looping=Looping.MIDDLE_CYCLE, unique_layers=1))
  config = EngineConfig(slots=3, max_len=64, exit=EXIT, depthwise=False)
  return timed(cache_spec=lambda: [list(a) if isinstance(a, tuple) else a for a in spec],
               generate=lambda: generations(model, variables, mesh, PROMPTS[:3]),
               middle_cycle=lambda: generations(*middle, mesh, PROMPTS[:4]),
               engine=lambda: engine_runs(model, variables, mesh, config))


if __name__ == '__main__':
  assert jax.device_count() == 8, 'run with XLA_FLAGS=--xla_force_host_platform_device_count=8'
  caught = Warnings()
  logging.getLogger('rrt_jax.serve.sharding').addHandler(caught)
  result = {'quick': quick, 'uneven': uneven}[sys.argv[1]]()
  print(json.dumps({**result, 'warnings': caught.messages}))
