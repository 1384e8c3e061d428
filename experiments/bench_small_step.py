r"""Small-model train-step speed: our jitted step (CE + AdamW) at ahmedtaha100/RRT's test shape, scanned and
unrolled, against that implementation wrapped in the same jit + optax step, in one run.

  git -C /work/.mirror/ahmedtaha100+RRT/repo archive HEAD src | tar -x -C /tmp/rrtref   # its code, not ours
  python -m experiments.bench_small_step --reference=/tmp/rrtref --steps=20 --repeats=5

Shape (its configs/test_small.yaml): 4 layers, d 128, 4 heads / 1 kv head (head_dim 32), ffn 512, vocab 256, 2
shared layers x 2 loops, LoRA r 8, batch 8 x 64, tied embeddings. Per variant: compile seconds (lower + compile of
the step), then --repeats timed runs of --steps steps (dispatch included, block at the end) interleaved across
variants; median ms/step. Without --reference only our variants run. The reference is imported from the given
directory at run time (its code is not part of rrt_jax).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import Decoder, init_variables
from rrt_jax.train.step import LossConfig, init_state, make_train_step
from rrt_jax.utils.timing import machine_description

_REFERENCE = flags.DEFINE_string('reference', '', 'Directory holding ahmedtaha100/RRT\'s src/ (optional).')
_STEPS = flags.DEFINE_integer('steps', 20, 'Steps per timed run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per variant (median).')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file.')

BATCH, SEQ, VOCAB = 8, 64, 256
CFG = ModelConfig(family='llama', vocab_size=VOCAB, num_layers=4, d_model=128, num_heads=4, num_kv_heads=1,
                  head_dim=32, mlp_dim=512, max_seq_len=SEQ, norm='rms', norm_eps=1e-6, mlp='swiglu',
                  tie_embeddings=True)
REC = RecursionConfig(loops=2, init='average', lora_rank=8)


def _batch(seed: int = 0) -> dict:
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
          'segment_ids': np.ones((BATCH, SEQ), np.int32), 'loss_mask': np.ones((BATCH, SEQ), np.float32)}


def ours(unroll: bool):
  """(jitted step(state, batch) -> (state, loss), initial state)."""
  cfg = CFG.replace(scan_unroll=unroll)
  tx = optax.adamw(1e-3)
  step = make_train_step(Decoder(cfg, REC), None, tx, LossConfig())
  state = init_state(init_variables(cfg, REC, jax.random.key(0)), tx)
  return jax.jit(lambda s, b: (lambda out: (out[0], out[1]['loss']))(step(s, None, b)), donate_argnums=(0,)), state


def reference(path: str):
  """Its RelaxedRecursiveTransformer (get_test_config) in the same jit + optax.adamw step with the same CE."""
  sys.path.insert(0, path)
  from src.model.config import get_test_config
  from src.model.relaxed_recursive_transformer import RelaxedRecursiveTransformer
  model = RelaxedRecursiveTransformer.from_config(get_test_config())
  params = model.init(jax.random.key(0), jnp.zeros((BATCH, SEQ), jnp.int32))
  tx = optax.adamw(1e-3)

  def loss_fn(p, b):
    logp = jax.nn.log_softmax(model.apply(p, b['inputs']).astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, b['targets'][..., None], axis=-1))

  def step(s, b):
    p, opt = s
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  return jax.jit(step, donate_argnums=(0,)), (params, tx.init(params))


def _timed(step, state, batch, steps: int) -> tuple[float, object]:
  start = time.perf_counter()
  for _ in range(steps):
    state, loss = step(state, batch)
  jax.block_until_ready(loss)
  return (time.perf_counter() - start) / steps, state


def main(argv):
  del argv
  variants = {'ours (scan)': lambda: ours(False), 'ours (unrolled)': lambda: ours(True)}
  if _REFERENCE.value:
    variants['ahmedtaha100/RRT'] = lambda: reference(_REFERENCE.value)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  steps, states, compile_s = {}, {}, {}
  for name, build in variants.items():
    step, state = build()
    start = time.perf_counter()
    step = step.lower(state, batch).compile()
    compile_s[name] = time.perf_counter() - start
    _, states[name] = _timed(step, state, batch, 2)  # Warm-up.
    steps[name] = step
  times = {name: [] for name in variants}
  for _ in range(_REPEATS.value):
    for name in variants:
      seconds, states[name] = _timed(steps[name], states[name], batch, _STEPS.value)
      times[name].append(seconds)
  base = statistics.median(times['ours (scan)'])
  print(f'# {machine_description()}; batch {BATCH} x {SEQ}, median of {_REPEATS.value} x {_STEPS.value} steps\n'
        '| variant | ms/step | / ours (scan) | compile s |\n|---|---|---|---|')
  rows = {}
  for name, t in times.items():
    ms = statistics.median(t) * 1e3
    rows[name] = {'ms_per_step': ms, 'compile_s': compile_s[name]}
    print(f'| {name} | {ms:.2f} | {ms / base / 1e3:.2f}x | {compile_s[name]:.1f} |')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'machine': machine_description(), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
