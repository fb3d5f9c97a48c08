"""Device mesh, logical-axis rules and the shardings of the train state and batches.

One device is a 1x1x1 mesh: there is no unsharded code path.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from effjax.errors import EffjaxError

AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves the (data, fsdp, tensor) sizes; one of them may be -1 (= the remaining devices)."""
  sizes = [int(mesh_config[a]) for a in AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise EffjaxError(
      f'mesh (data, fsdp, tensor)={tuple(sizes)} is invalid; use positive sizes and at most '
      'one -1 (= the remaining devices)'
    )
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise EffjaxError(f'mesh (data, fsdp, tensor)={tuple(sizes)} does not divide the {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise EffjaxError(
      f'mesh (data, fsdp, tensor)={tuple(sizes)} uses {math.prod(sizes)} devices but '
      f'{num_devices} are available; make the product equal or use -1 for one axis'
    )
  return tuple(sizes)


CPU_DEVICES_MAX = 8  # auto split measured on 2 cores only; every device holds a data-parallel replica of the state


def cpu_device_count(config, cores: int) -> int:
  """How many XLA:CPU devices a single-process training run splits `cores` into (`config.mesh.cpu_devices`; 0 is
  auto): one per core, so that each core trains a data-parallel shard of the batch, instead of one device
  splitting every small op over all cores (on 2 cores the 6L/384d and 4L/128d steps ran 1.18x and 1.46x faster
  so; experiments/results/bench.md). Auto takes the most devices, at most CPU_DEVICES_MAX, that the mesh sizes
  allow and that split each micro-batch evenly; 1 where none does (e.g. an odd batch)."""
  requested = config.mesh.get('cpu_devices', 0)
  if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
    raise EffjaxError(
      f'mesh.cpu_devices={requested!r} is invalid; use 0 (one device per core, chosen automatically) or a '
      'positive number of CPU devices'
    )
  if requested:
    return requested
  micro = config.train.batch_size // max(int(config.train.get('grad_accum', 1)), 1)
  logical_rules = rules(config.mesh)
  for n in range(min(cores, CPU_DEVICES_MAX), 1, -1):
    try:
      sizes = mesh_shape(config.mesh, n)
    except EffjaxError:
      continue
    if micro % batch_divisor(jax.sharding.AbstractMesh(sizes, AXES), logical_rules) == 0:
      return n
  return 1


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def rules(mesh_config) -> tuple:
  out = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in mesh_config.rules)
  for name, axes in out:
    unknown = [a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a not in AXES]
    if unknown:
      raise EffjaxError(
        f'mesh.rules maps {name!r} to mesh axis {unknown[0]!r}, which does not exist; the mesh '
        f'axes are {", ".join(AXES)}'
      )
  return out


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Keeps, for each dimension, the mesh axes (in rule order) that divide it: a dimension they do not divide
  (e.g. a char vocabulary of 97 over tensor=2) is replicated over them instead of failing. Size-1 axes are
  dropped, so specs read the same on any mesh. (flax's logical_to_mesh already gave each mesh axis to at most
  one dimension, trying a name's rules in order: see configs/base.py for the fallbacks that make FSDP cover
  every parameter.)"""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    kept = []
    for a in (axes,) if isinstance(axes, str) else tuple(axes or ()):
      if mesh.shape[a] > 1 and dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
        kept.append(a)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def logical_specs(abstract_boxed, mesh, logical_rules):
  """Mesh PartitionSpecs for a pytree whose leaves may be flax LogicallyPartitioned boxes (from an eval_shape'd
  init). `mesh` may be a jax.sharding.AbstractMesh: only its axis sizes are read (memory planning, no devices)."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), logical_rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_boxed))
  return jax.tree.map(lambda spec, shape: _fit(spec, shape, mesh), specs, shapes, is_leaf=lambda x: isinstance(x, P))


def logical_shardings(abstract_boxed, mesh: Mesh, logical_rules):
  """Shardings for a pytree whose leaves may be flax LogicallyPartitioned boxes (from an eval_shape'd init)."""
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec),
    logical_specs(abstract_boxed, mesh, logical_rules),
    is_leaf=lambda x: isinstance(x, P),
  )


def shard_shape(shape, spec: P, mesh) -> tuple[int, ...]:
  """The per-device block shape of an array of `shape` laid out by `spec` (axes in spec divide their dims)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    out.append(dim // math.prod(mesh.shape[a] for a in names))
  return tuple(out)


def batch_sharding(mesh: Mesh, logical_rules) -> NamedSharding:
  spec = nn.logical_to_mesh(P('batch', None), logical_rules)
  return NamedSharding(mesh, spec)


def batch_divisor(mesh: Mesh, logical_rules) -> int:
  spec = batch_sharding(mesh, logical_rules).spec[0]
  names = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in names)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles each process's local numpy batch into one global, sharded jax.Array."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
