r"""Compiled memory of the SmolLM2-135M relaxed KD train step: the full loss against the chunked loss
(loss.chunk_size), per remat policy. Lowers and compiles only (shapes from eval_shape; nothing runs), so the
figures are XLA's buffer assignment for this machine's backend: temp = activations, logits, gradients.

  python -m experiments.loss_memory --seq_len=256 --remats=none,full --chunks=0,64,128
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from rrt_jax import presets
from rrt_jax.config import RecursionConfig
from rrt_jax.model import Decoder, variable_shapes
from rrt_jax.train.step import LossConfig, init_state, make_train_step
from rrt_jax.utils.timing import machine_description

_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per row.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Rows per step.')
_LOOPS = flags.DEFINE_integer('loops', 3, 'Loops B.')
_RANK = flags.DEFINE_integer('rank', 64, 'LoRA rank.')
_REMATS = flags.DEFINE_list('remats', ['none', 'full'], 'model.remat policies.')
_CHUNKS = flags.DEFINE_list('chunks', ['0', '64', '128'], 'loss.chunk_size values (0 = the full loss).')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file.')

MiB = 2 ** 20


def main(argv):
  del argv
  rec, seq, batch = RecursionConfig(loops=_LOOPS.value, lora_rank=_RANK.value), _SEQ.value, _BATCH.value
  rows = []
  print(f'# {machine_description()}; SmolLM2-135M B={rec.loops} r={rec.lora_rank}, batch {batch} x {seq}, KD from '
        'the vanilla model, aggressive exits, AdamW\n| remat | chunk_size | temp MiB | arguments MiB | x full |'
        '\n|---|---|---|---|---|', flush=True)
  for remat in _REMATS.value:
    cfg = presets.SMOLLM2_135M.replace(remat=remat)
    student, teacher = variable_shapes(cfg, rec), variable_shapes(cfg, RecursionConfig())
    tx = optax.adamw(3e-4, weight_decay=0.1)
    state = jax.eval_shape(lambda v, tx=tx: init_state(v, tx), student)
    ints = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = {k: ints for k in ('inputs', 'targets', 'positions', 'segment_ids')}
    data['loss_mask'] = jax.ShapeDtypeStruct((batch, seq), jnp.float32)
    full = None
    for chunk in map(int, _CHUNKS.value):
      step = make_train_step(Decoder(cfg, rec), Decoder(cfg), tx,
                             LossConfig(kd_weight=1.0, early_exit='aggressive', chunk_size=chunk))
      start = time.perf_counter()
      stats = jax.jit(step, donate_argnums=(0,)).lower(state, teacher, data).compile().memory_analysis()
      temp = stats.temp_size_in_bytes / MiB
      full = temp if chunk == 0 else full
      rows.append({'remat': remat, 'chunk_size': chunk, 'temp_mib': temp,
                   'argument_mib': stats.argument_size_in_bytes / MiB, 'compile_s': time.perf_counter() - start})
      ratio = f'{full / temp:.2f}x lower' if full and chunk else ''
      print(f'| {remat} | {chunk} | {temp:.1f} | {stats.argument_size_in_bytes / MiB:.1f} | {ratio} |', flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'machine': machine_description(), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
