"""Run by test_scale.py in a subprocess with 8 emulated CPU devices (the count is fixed when jax starts): checks of
the mesh, the optimizer state's shardings, the activation constraints and the memory plan, printed as one JSON line.

  JAX_PLATFORMS=cpu python tests/scale_checks.py
"""

from __future__ import annotations

import json
import math
import re

import jax

jax.config.update('jax_num_cpu_devices', 8)

import numpy as np  # noqa: E402
from tiny_config import tiny_config  # noqa: E402

from rrt_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from rrt_jax.train import setup  # noqa: E402
from rrt_jax.train.loop import jit_train_step, train_state_shardings  # noqa: E402
from rrt_jax.train.plan import abstract_batch, memory_plan, model_shapes  # noqa: E402
from rrt_jax.train.step import init_state  # noqa: E402


def _mesh_checks() -> dict:
  plain = make_mesh(data=2, fsdp=2, tensor=2)
  multi = make_mesh(data=1, fsdp=-1, tensor=1, dcn=2)
  return {
      'names': list(plain.axis_names), 'shape': dict(plain.shape), 'dcn_shape': dict(multi.shape),
      'axis_types': sorted({str(t) for t in plain.axis_types}),
      'batch_spec': str(batch_sharding(multi).spec),
      # Emulated slices are consecutive device groups: slice 0 holds devices 0-3.
      'dcn_slice0': sorted(d.id for d in np.asarray(multi.devices)[0].ravel()),
  }


def _real_state(c, cfg, rec, mesh):
  """The run's state and teacher, built the way train() builds them (random preset weights)."""
  student, teacher = setup.initial_variables(c, cfg, rec, None, mesh, True)
  _, tx = setup.optimizer(c)
  trainable = setup.trainable(c)
  shardings = train_state_shardings(student, tx, trainable, mesh)
  state = jax.jit(lambda v: init_state(v, tx, trainable), out_shardings=shardings)(student)
  return state, teacher, tx, trainable, shardings


def _device0_bytes(tree) -> int:
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device.id == 0)


def main() -> None:
  c = tiny_config(**{'data.global_batch': 8, 'mesh.data': 2, 'mesh.fsdp': 4, 'model.preset': 'tiny_llama',
                     'loss.kd_weight': 1.0})
  cfg, rec = model_shapes(c), setup.recursion_config(c)
  mesh = make_mesh(2, 4, 1)
  state, teacher, tx, trainable, shardings = _real_state(c, cfg, rec, mesh)
  mu = state.opt_state[1][0].mu if hasattr(state.opt_state[1][0], 'mu') else None
  moments_sharded = []
  if mu is not None:
    for (path, m), v in zip(jax.tree_util.tree_flatten_with_path(mu)[0], jax.tree.leaves(state.variables),
                            strict=True):
      moments_sharded.append([jax.tree_util.keystr(path), m.sharding.spec == v.sharding.spec])

  # The compiled executable of the real run (concrete arrays) against the plan (ShapeDtypeStructs only).
  batch = {k: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding) for k, x in abstract_batch(c, mesh).items()}
  lowered = jit_train_step(c, cfg, rec, tx, trainable, shardings, mesh).lower(state, teacher, batch)
  real = lowered.compile().memory_analysis()
  plan = memory_plan(c, cfg, mesh)
  constraints = re.findall(r'sharding_constraint[^\n]*', lowered.as_text())
  print(json.dumps({
      'mesh': _mesh_checks(),
      'moments': moments_sharded,
      'real': {'temp': int(real.temp_size_in_bytes), 'arguments': int(real.argument_size_in_bytes),
               'outputs': int(real.output_size_in_bytes), 'alias': int(real.alias_size_in_bytes)},
      'plan': {'temp': plan.temp_bytes, 'arguments': plan.argument_bytes, 'outputs': plan.output_bytes,
               'alias': plan.alias_bytes, 'params': plan.param_bytes, 'optimizer': plan.optimizer_bytes,
               'teacher': plan.teacher_bytes, 'batch': plan.batch_bytes, 'peak': plan.peak_bytes},
      'device0': {'params': _device0_bytes(state.variables), 'optimizer': _device0_bytes(state.opt_state),
                  'teacher': _device0_bytes(teacher), 'batch': _device0_bytes(batch)},
      'full_params': sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state.variables)),
      'constraints': {'residual': sum('"data", "fsdp"}, {}, {}]' in s for s in constraints),
                      'vocab': sum('{"tensor"}]' in s or '"tensor"}]>' in s for s in constraints)},
  }))


if __name__ == '__main__':
  main()
