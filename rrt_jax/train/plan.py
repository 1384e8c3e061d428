"""A memory plan for a training config: the train step compiled ahead of time, per-device memory by kind.

Nothing is allocated: the variables, optimizer state, teacher and batch are ShapeDtypeStructs with the run's
shardings; `loop.jit_train_step` (the function the run executes) is lowered and compiled for the mesh, and the
compiled executable's memory analysis gives the per-device temporaries (activations kept for the backward pass,
logits, gradients, collectives' buffers). On emulated CPU devices the compiler is XLA:CPU, whose buffer assignment
is not the TPU's or GPU's: it upcasts bf16 matmuls to fp32 and fuses differently, so treat `temp_bytes` as an
estimate (a pessimistic one for bf16 models); the argument bytes are exact.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rrt_jax import presets
from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import variable_shapes
from rrt_jax.sharding import batch_sharding, check_divisible, make_mesh, variable_shardings
from rrt_jax.train import flops, setup
from rrt_jax.train.loop import jit_train_step, train_state_shardings
from rrt_jax.train.step import init_state

HEADROOM = 0.9  # A plan fits a chip when its peak is at most this fraction of HBM (runtime, fragmentation).


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes of one train step. peak_bytes = arguments + outputs not aliased to them + temporaries."""
  devices: int
  mesh: dict
  param_bytes: int  # The student's variables (params and LoRA), this device's shards.
  optimizer_bytes: int
  teacher_bytes: int
  batch_bytes: int
  temp_bytes: int  # Activations, logits, gradients, collectives' buffers (compiled memory analysis).
  argument_bytes: int  # From the compiled memory analysis: param + optimizer + teacher + batch (+ step).
  output_bytes: int
  alias_bytes: int  # Outputs written in place of donated arguments (the state).
  peak_bytes: int
  compiler: str  # Where the analysis comes from (e.g. 'cpu' for emulated devices).

  def fits(self, chip: flops.Chip) -> bool:
    return self.peak_bytes <= HEADROOM * chip.hbm_bytes


def model_shapes(c: ml_collections.ConfigDict) -> ModelConfig:
  """The model config of a run from its preset (no checkpoint read: an HF run's shapes are its preset's)."""
  return presets.get(c.model.preset).replace(dtype=c.model.dtype, remat=c.model.remat, attention=c.model.attention)


def _shard_bytes(tree) -> int:
  """Bytes of this device's shard of every ShapeDtypeStruct (with .sharding) in `tree`."""
  def one(x) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return sum(one(x) for x in jax.tree.leaves(tree))


def _abstract(shapes: dict, shardings: dict) -> dict:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_batch(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
  """The global batch's ShapeDtypeStructs (rrt_jax/data/pipeline.py's keys and dtypes), sharded as the run's."""
  shape, sharding = (c.data.global_batch, c.data.seq_len), batch_sharding(mesh)
  ints = ('inputs', 'targets', 'positions', 'segment_ids')
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in ints}
  batch['loss_mask'] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
  return batch


def memory_plan(c: ml_collections.ConfigDict, cfg: ModelConfig | None = None,
                mesh: jax.sharding.Mesh | None = None) -> MemoryPlan:
  """Compiles c's train step for `mesh` (default: the config's mesh over jax's devices) without allocating and
  returns its per-device memory. cfg: the model's shapes (default: model_shapes(c))."""
  cfg = cfg or model_shapes(c)
  rec = setup.recursion_config(c)
  mesh = mesh or make_mesh(**c.mesh)
  check_divisible(cfg, rec, mesh)
  _, tx = setup.optimizer(c)
  trainable = setup.trainable(c)
  student = _abstract(variable_shapes(cfg, rec), variable_shardings(cfg, rec, mesh))
  teacher = None
  if c.loss.kd_weight > 0:
    vanilla = RecursionConfig()
    teacher = _abstract(variable_shapes(cfg, vanilla), variable_shardings(cfg, vanilla, mesh))
  state_shardings = train_state_shardings(student, tx, trainable, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(lambda v: init_state(v, tx, trainable), student), state_shardings)
  batch = abstract_batch(c, mesh)
  compiled = jit_train_step(c, cfg, rec, tx, trainable, state_shardings, mesh).lower(state, teacher, batch).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f'The {jax.default_backend()} compiler gives no memory analysis for this executable.')
  arguments, outputs, alias = (int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                               int(stats.alias_size_in_bytes))
  temp = int(stats.temp_size_in_bytes)
  return MemoryPlan(
      devices=mesh.size, mesh=dict(mesh.shape), param_bytes=_shard_bytes(state.variables),
      optimizer_bytes=_shard_bytes(state.opt_state), teacher_bytes=_shard_bytes(teacher) if teacher else 0,
      batch_bytes=_shard_bytes(batch), temp_bytes=temp, argument_bytes=arguments, output_bytes=outputs,
      alias_bytes=alias, peak_bytes=arguments + outputs - alias + temp, compiler=jax.devices()[0].platform)


__all__ = ['HEADROOM', 'MemoryPlan', 'abstract_batch', 'memory_plan', 'model_shapes']
