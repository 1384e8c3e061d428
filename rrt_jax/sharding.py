"""Device mesh over ('dcn', 'data', 'fsdp', 'tensor') and the one table of logical-axis rules.

Every variable and the activations the model constrains (the residual stream, the logits) carry logical axis
names (rrt_jax.model.logical_axes, nn.with_logical_constraint in the model); RULES maps them to mesh axes, so the
same code shards on a TPU pod slice, several slices (multislice: 'dcn' is the axis across slices, over the data
centre network, and only the batch is split over it: one gradient all-reduce per step crosses it), a multi-GPU
node, or emulated CPU devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import logical_axes

MESH_AXES = ('dcn', 'data', 'fsdp', 'tensor')
BATCH_AXES = ('dcn', 'data', 'fsdp')
RULES = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv', 'tensor'),
    ('mlp', 'tensor'),
    ('norm', None),
    ('layers', None),
    ('loops', None),
    ('lora_rank', 'fsdp'),  # LoRA B [rank, out]: out is 'heads'/'mlp' (tensor), so FSDP shards the rank.
)


def mesh_shape(sizes: Sequence[int], num_devices: int, names: Sequence[str] = MESH_AXES[1:]) -> tuple[int, ...]:
  """Resolves one -1 ('auto') entry of `sizes` (over the axes `names`) to use all devices; checks the product."""
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may be -1 (auto), got {sizes}.')
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f'{num_devices} devices cannot be split into mesh {sizes}.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'Mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices, '
                     f'there are {num_devices}: set one axis to -1 to fill the rest.')
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, dcn: int = 1, devices=None) -> Mesh:
  """The ('dcn', 'data', 'fsdp', 'tensor') mesh. data/fsdp/tensor are sizes within a slice (one -1 fills it);
  dcn is the number of slices. The device order is topology-aware: jax.make_mesh within a slice (so 'tensor', the
  chattiest axis, lands on neighbouring chips), mesh_utils.create_hybrid_device_mesh across slices (devices
  grouped by their slice_index). Devices without slice_index (CPUs, one GPU node) emulate dcn slices as
  consecutive groups. Axis types are Auto: shardings come from the rule table and propagation."""
  devices = list(jax.devices() if devices is None else devices)
  if dcn < 1 or len(devices) % dcn:
    raise ValueError(f'mesh.dcn={dcn} must be >= 1 and divide the {len(devices)} devices (one entry per slice).')
  per_slice = mesh_shape((data, fsdp, tensor), len(devices) // dcn)
  shape, auto = (dcn,) + per_slice, (AxisType.Auto,) * len(MESH_AXES)
  if dcn == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  if all(hasattr(d, 'slice_index') for d in devices):
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_hybrid_device_mesh((1,) + per_slice, (dcn, 1, 1, 1), devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def batch_ways(mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the batch axes the mesh has."""
  return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def variable_shardings(cfg: ModelConfig, rec: RecursionConfig, mesh: Mesh) -> dict:
  """NamedSharding of every variable ({'params', 'lora'?}) from its logical axes and RULES."""
  return nn.logical_to_mesh_sharding(logical_axes(cfg, rec), mesh, RULES)


def check_divisible(cfg: ModelConfig, rec: RecursionConfig, mesh: Mesh) -> None:
  """Every variable dimension splits evenly over the mesh axes RULES give it; else one error naming the variables,
  the axes and the fix (instead of jax's IndivisibleError at placement)."""
  from rrt_jax.model import variable_shapes
  shapes, specs = variable_shapes(cfg, rec), nn.logical_to_mesh(logical_axes(cfg, rec), RULES)
  problems = []

  def check(path, shape, spec):
    for dim, axes in zip(shape.shape, spec, strict=False):
      names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh.shape.get(a, 1) for a in names)
      if dim % ways:
        problems.append(f'{jax.tree_util.keystr(path)} {tuple(shape.shape)}: {dim} over mesh {"x".join(names)}={ways}')

  jax.tree_util.tree_map_with_path(check, shapes, specs)  # (specs: PartitionSpec leaves at the shapes' leaves)
  if problems:
    raise ValueError(f'the model does not split over mesh {dict(mesh.shape)}: {"; ".join(problems[:4])}'
                     f'{" ..." if len(problems) > 4 else ""}. Choose mesh sizes that divide these dimensions '
                     '(e.g. mesh.tensor=1 and more mesh.data/fsdp).')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays: batch split over the batch axes (dcn, data, fsdp) the mesh has."""
  return NamedSharding(mesh, PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Each host's rows -> global arrays sharded over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def optimizer_shardings(opt_state_shapes, variables_shardings: dict, variables_shapes: dict, mesh: Mesh):
  """Shardings of an optimizer state: each leaf whose key path ends with a variable's path and has its shape (Adam's
  mu and nu, ...) gets that variable's sharding; the rest (counts, scalars) is replicated. Left to propagation,
  zeros_like(variables) came out replicated: every device held whole moments."""
  by_path = {}
  for (path, sharding), shape in zip(jax.tree_util.tree_flatten_with_path(variables_shardings)[0],
                                     jax.tree.leaves(variables_shapes), strict=True):
    by_path[tuple(str(k) for k in path)] = (sharding, tuple(shape.shape))

  def one(path, leaf):
    keys = tuple(str(k) for k in path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[1] == tuple(leaf.shape):
        return hit[0]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, opt_state_shapes)
