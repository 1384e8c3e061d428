r"""Memory plan: does a training config fit a chip? Compiles its train step ahead of time for a device count and
prints per-device memory (rrt_jax/train/plan.py) against the HBM of each chip in rrt_jax.train.flops.CHIPS.

  python -m experiments.plan --config=experiments/configs/gemma_2b.py:b2_r512_average --devices=64
  python -m experiments.plan --config=experiments/configs/gemma_2b.py:b2_r512_average --devices=32 \
      --config.train.grad_accum=8 --chips=v4
  python -m experiments.plan --config=experiments/configs/tiny_cpu.py --devices=8 --config.mesh.data=2 \
      --config.mesh.fsdp=-1 --out=/tmp/plan.json

The devices are emulated CPU devices by default (no accelerator needed: XLA:CPU's buffer assignment, an estimate
for bf16 models; see rrt_jax/train/plan.py); --noemulate compiles with this machine's own devices (run it on the
accelerator itself for its compiler's figures). Nothing is allocated, so a 2B-parameter model plans on a laptop.
Exit status 0 whether or not it fits; the table says which chips it fits.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
from absl import flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:variant], or a packaged config '
                                          'by name[:variant].', lock_config=True)
cli.accept_config_names(_CONFIG)
_DEVICES = flags.DEFINE_integer('devices', 0, 'Devices to plan for (0: the product of config.mesh, no -1 in it).')
_EMULATE = flags.DEFINE_bool('emulate', True, 'Plan on that many emulated CPU devices (else: this machine\'s).')
_CHIPS = flags.DEFINE_list('chips', [], 'Chips to check (default: every chip in the table).')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the plan.')
flags.mark_flags_as_required(['config'])

_GiB = 1024 ** 3


def _device_count(c) -> int:
  if _DEVICES.value:
    return _DEVICES.value
  sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
  if -1 in sizes:
    raise ValueError(f'config.mesh {dict(c.mesh)} has a -1 (auto) axis: pass --devices=N to plan for N devices.')
  return c.mesh.get('dcn', 1) * sizes[0] * sizes[1] * sizes[2]


def _table(plan, chips) -> str:
  rows = [('student variables', plan.param_bytes), ('optimizer state', plan.optimizer_bytes),
          ('teacher', plan.teacher_bytes), ('batch', plan.batch_bytes),
          ('temporaries (activations, logits, grads)', plan.temp_bytes),
          ('outputs not in place', plan.output_bytes - plan.alias_bytes), ('peak', plan.peak_bytes)]
  size = lambda b: f'{b / _GiB:.2f} GiB' if b >= 0.1 * _GiB else f'{b / 2 ** 20:.2f} MiB'  # noqa: E731
  lines = ['| per device | bytes |', '|---|---|'] + [f'| {name} | {size(b)} |' for name, b in rows]
  from rrt_jax.train.plan import HEADROOM
  lines += ['', f'| chip | HBM GiB | fits (peak <= {HEADROOM:.0%} of HBM) |', '|---|---|---|']
  lines += [f'| {ch.name} | {ch.hbm_bytes / _GiB:.1f} | {"yes" if plan.fits(ch) else "no"} |' for ch in chips]
  return '\n'.join(lines)


def main(argv):
  del argv
  c = _CONFIG.value
  devices = _device_count(c)
  if _EMULATE.value:  # Before anything initialises a jax backend.
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', devices)
  from rrt_jax.sharding import make_mesh
  from rrt_jax.train import flops
  from rrt_jax.train.plan import memory_plan
  if jax.device_count() < devices:
    raise ValueError(f'{devices} devices asked, this machine has {jax.device_count()}: drop --noemulate.')
  mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.get('dcn', 1), jax.devices()[:devices])
  chips = [flops.chip(n) for n in _CHIPS.value] if _CHIPS.value else list(flops.CHIPS)
  print(f'# memory plan: {c.model.preset} {c.recursion.loops} loops, rank {c.recursion.lora_rank}, '
        f'global batch {c.data.global_batch} x {c.data.seq_len}, grad_accum {c.train.grad_accum}, '
        f'remat {c.model.remat}, loss.chunk_size {c.loss.get("chunk_size", 0)}, mesh {dict(mesh.shape)} '
        f'({jax.devices()[0].platform} compiler)', flush=True)
  plan = memory_plan(c, mesh=mesh)
  print(_table(plan, chips))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({**dataclasses.asdict(plan), 'fits': {ch.name: plan.fits(ch) for ch in chips}}, f, indent=1)


if __name__ == '__main__':
  try:
    cli.run(main)
  except ValueError as e:
    print(f'plan: {e}', file=sys.stderr)
    sys.exit(2)
