r"""Training throughput and MFU: recursive/relaxed vs the vanilla model of the same shape, in one run.

  python -m experiments.bench_train --steps=8 --rounds=2
  python -m experiments.bench_train --models=gemma_2b --data=synthetic --batch=8 --seq_len=2048   # on a GPU/TPU

gemma_2b: Gemma-2B-shaped random models in bf16 (vanilla, recursive B=2, relaxed B=2 r=512; remat dots_no_batch,
chunked losses), on synthetic token streams at Gemma's 256k vocabulary (rrt_jax/data/synthetic.py): the step time
and MFU of the paper's shapes, on any machine, with no checkpoint or text.

Each variant trains `--steps` steps with the same config (KD from the original model, aggressive early-exit
losses); variants alternate for `--rounds` rounds (ABAB...) and the median tokens/s over logged steps (the
compile step excluded) is reported, with MFU against the chip's peak (rrt_jax.train.flops: the spec table on
TPUs/GPUs, the measured matmul on CPUs).
"""

from __future__ import annotations

import json
import statistics
import tempfile

from absl import app, flags

from experiments.configs import gemma_2b, smollm2, tiny_cpu
from rrt_jax.data.synthetic import synthetic_source
from rrt_jax.train import flops
from rrt_jax.train.loop import train
from rrt_jax.utils.timing import machine_description

_STEPS = flags.DEFINE_integer('steps', 8, 'Steps per variant per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternating rounds.')
_MODELS = flags.DEFINE_list('models', ['tiny', 'smollm2'], 'Which model families to run: tiny, smollm2, gemma_2b.')
_DATA = flags.DEFINE_enum('data', 'real', ['real', 'synthetic'], 'real: the packaged validation text; synthetic: '
                          'random ids at the model\'s vocabulary (random models only).')
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch (0: the model\'s default: tiny 8, smollm2 4, gemma_2b 8).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, 'Sequence length (0: tiny/smollm2 128, gemma_2b 2048).')
_CHUNK = flags.DEFINE_integer('chunk_size', -1, 'loss.chunk_size (-1: the config\'s).')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON output.')

VARIANTS = {'vanilla': (1, 0), 'recursive B=3': (3, 0), 'relaxed B=3 r=64': (3, 64)}
PAPER_VARIANTS = {'vanilla': (1, 0), 'recursive B=2': (2, 0), 'relaxed B=2 r=512': (2, 512)}
SYNTHETIC_VOCAB = {'tiny': 512, 'gemma_2b': 256_000}


def variants_of(model: str) -> dict:
  return PAPER_VARIANTS if model == 'gemma_2b' else VARIANTS


def config_for(model: str, loops: int, rank: int, steps: int, data: str = 'real', batch: int = 0, seq_len: int = 0,
               chunk_size: int = -1):
  if model == 'gemma_2b':
    c = gemma_2b.get_config()
    c.model.source = 'random'
    c.data.seq_len, c.data.global_batch = seq_len or 2048, batch or 8
    if data != 'synthetic':
      c.data.tokenizer = 'smollm2'  # A random model's vocabulary follows its tokenizer.
  elif model == 'tiny':
    c = tiny_cpu.get_config()
    c.model.preset = 'tiny_llama'
    c.data.seq_len, c.data.global_batch = seq_len or 128, batch or 8
  elif model == 'smollm2':
    c = smollm2.get_config()
    c.data.seq_len, c.data.global_batch = seq_len or 128, batch or 4
  else:
    raise ValueError(f'Unknown model {model!r}: choose tiny, smollm2 or gemma_2b.')
  if data == 'synthetic':
    if c.model.source != 'random':
      raise ValueError(f'--data=synthetic is for random models (tiny, gemma_2b), not {model}.')
    c.data.tokenizer = f'synthetic:{SYNTHETIC_VOCAB[model]}'
  if chunk_size >= 0:
    c.loss.chunk_size = chunk_size
  c.recursion.loops, c.recursion.lora_rank = loops, rank or None  # (Rank 0 in VARIANTS: no LoRA.)
  c.recursion.init = 'average' if rank else 'stepwise'
  c.recursion.lora_init, c.healing.steps_per_layer = 'svd', 0  # Step time only: no calibration or healing.
  c.loss.kd_weight, c.loss.early_exit = 1.0, 'aggressive'
  c.train.steps, c.log_every, c.checkpoint.every_steps = steps, 1, 0
  c.data.split = 'validation'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return c


def main(argv):
  del argv
  peak, source = flops.peak_flops('float32')
  results = {'machine': machine_description(), 'peak_flops': peak, 'peak_source': source}
  print(f'# {results["machine"]}; MFU against {peak / 1e9:.1f} GFLOP/s per device ({source})', flush=True)
  for model in _MODELS.value:
    variants = variants_of(model)
    samples = {name: {'tokens_per_s': [], 'mfu': []} for name in variants}
    for _ in range(_ROUNDS.value):
      for name, (loops, rank) in variants.items():
        c = config_for(model, loops, rank, _STEPS.value, _DATA.value, _BATCH.value, _SEQ_LEN.value, _CHUNK.value)
        source_override = synthetic_source() if _DATA.value == 'synthetic' else None
        with tempfile.TemporaryDirectory() as workdir:
          history = train(c, workdir, source=source_override)
        for h in history[1:]:  # The first logged step includes compilation.
          samples[name]['tokens_per_s'].append(h['tokens_per_s'])
          samples[name]['mfu'].append(h['mfu'])
    base = statistics.median(samples['vanilla']['tokens_per_s'])
    print(f'\n{model}: {"variant":<20}{"tokens/s":>10}{"/ vanilla":>11}{"MFU":>8}')
    for name, s in samples.items():
      tps, mfu = statistics.median(s['tokens_per_s']), statistics.median(s['mfu'])
      results[f'{model}/{name}'] = {'tokens_per_s': tps, 'mfu': mfu, 'ratio_to_vanilla': tps / base}
      print(f'{"":<7}{name:<20}{tps:>10,.0f}{tps / base:>11.2f}{mfu:>8.1%}', flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main)
