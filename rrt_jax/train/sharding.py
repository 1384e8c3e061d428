"""Device mesh over ('data', 'fsdp', 'tensor') and the one table of logical-axis rules.

Every variable carries logical axis names (rrt_jax.model.logical_axes); RULES maps them to mesh axes, so the
same code shards on a TPU pod slice, a multi-GPU node, or emulated CPU devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import logical_axes

MESH_AXES = ('data', 'fsdp', 'tensor')
RULES = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv', 'tensor'),
    ('mlp', 'tensor'),
    ('norm', None),
    ('layers', None),
    ('loops', None),
    ('lora_rank', None),
)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 ('auto') entry to use all devices; checks the product."""
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may be -1 (auto), got {sizes}.')
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f'{num_devices} devices cannot be split into mesh {sizes}.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'Mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, '
                     f'there are {num_devices}: set one axis to -1 to fill the rest.')
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape((data, fsdp, tensor), len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


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
      ways = math.prod(mesh.shape[a] for a in names)
      if dim % ways:
        problems.append(f'{jax.tree_util.keystr(path)} {tuple(shape.shape)}: {dim} over mesh {"x".join(names)}={ways}')

  jax.tree_util.tree_map_with_path(check, shapes, specs)  # (specs: PartitionSpec leaves at the shapes' leaves)
  if problems:
    raise ValueError(f'the model does not split over mesh {dict(mesh.shape)}: {"; ".join(problems[:4])}'
                     f'{" ..." if len(problems) > 4 else ""}. Choose mesh sizes that divide these dimensions '
                     '(e.g. mesh.tensor=1 and more mesh.data/fsdp).')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays: batch split over data and fsdp."""
  return NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Each host's rows -> global arrays sharded over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
