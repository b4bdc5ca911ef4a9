"""The one place that builds meshes and shardings.

One Mesh with a single 'data' axis over every device of every process. Batches
are sharded along 'data' (P('data')), parameters and optimiser state are
replicated (P()). Under `jax.jit`, XLA inserts the collectives (BatchNorm batch
moments, gradient all-reduce); explicit per-device code uses `jax.shard_map`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnsynth_jax.errors import UserError

DATA_AXIS = 'data'


def initialize_distributed(coordinator: str = '', num_processes: int = 0,
                           process_id: int = -1, cpu_collectives: str = '') -> None:
  """Opt-in multi-host start. With no arguments, JAX auto-detects (Cloud TPU, SLURM)."""
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  kwargs = {}
  if coordinator:
    kwargs['coordinator_address'] = coordinator
  if num_processes:
    kwargs['num_processes'] = num_processes
  if process_id >= 0:
    kwargs['process_id'] = process_id
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


@functools.lru_cache(maxsize=None)
def _mesh_for(devices: tuple) -> Mesh:
  axis_types = (jax.sharding.AxisType.Auto,)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=axis_types,
                       devices=list(devices))


_DEVICE_OVERRIDE: list[tuple] = []


@contextlib.contextmanager
def restrict_devices(num_devices: int) -> Iterator[None]:
  """Within the block, make_mesh() uses only the first `num_devices` devices.

  For tests and benchmarks that compare 1 device with N in one process.
  """
  _DEVICE_OVERRIDE.append(tuple(jax.devices()[:num_devices]))
  try:
    yield
  finally:
    _DEVICE_OVERRIDE.pop()


def make_mesh() -> Mesh:
  """A 1-D 'data' mesh over all devices (cached: the same object every call)."""
  return _mesh_for(_DEVICE_OVERRIDE[-1] if _DEVICE_OVERRIDE else tuple(jax.devices()))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, what: str, mesh: Mesh | None = None) -> None:
  """Raises UserError unless the global batch splits evenly over devices."""
  n = (mesh or make_mesh()).devices.size
  if global_batch % n:
    raise UserError(
        f'{what}={global_batch} is not divisible by the {n} devices: set it to a multiple '
        f'of {n}')


def round_up_batch(batch: int, mesh: Mesh | None = None) -> int:
  """For batches that are padded and masked (evaluation, statistics): the next multiple
  of the device count, so any configured size works on any number of devices."""
  n = (mesh or make_mesh()).devices.size
  return -(-batch // n) * n


def to_global(mesh: Mesh, local: Any) -> Any:
  """Process-local numpy arrays (leading batch axis) -> global arrays sharded on 'data'."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Host or device values -> arrays replicated on every device of the mesh."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  # Multi-process: every process holds the same value; build the global array from it.
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
      tree)


def broadcast_from_main(value: Any) -> Any:
  """Process 0's value (a small picklable Python object) on every process."""
  if jax.process_count() == 1:
    return value
  import pickle
  from jax.experimental import multihost_utils
  data = np.frombuffer(pickle.dumps(value), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int64)))
  buf = np.zeros(size, np.uint8)
  buf[:len(data)] = data
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return pickle.loads(buf.astype(np.uint8).tobytes())


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every process (fully replicated or gathered)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def sum_across_processes(x: np.ndarray) -> np.ndarray:
  """Sums a host numpy array over processes (identity on one process)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(np.asarray(x))
  return np.asarray(gathered).sum(0)


def is_main_process() -> bool:
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across processes (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def describe_devices() -> str:
  d = jax.devices()[0]
  return (f'{jax.device_count()} x {d.device_kind} ({d.platform}), '
          f'{jax.process_count()} process(es), jax {jax.__version__}, '
          f'host {os.uname().nodename}')


def allgather_rows(x: np.ndarray) -> np.ndarray:
  """Concatenates a host array's rows over processes (rows may differ in number)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(x)], np.int32)))
  counts = counts.reshape(-1)
  padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
  padded[:len(x)] = x
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([gathered[p, :counts[p]] for p in range(len(counts))])
