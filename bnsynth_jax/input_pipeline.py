"""Partitions and batches of in-memory images: the same on any process or device count.

A split is cut into `num_partitions` strided partitions (example i goes to
partition i % S after a fixed shuffle); process p loads only its own partitions,
so on a pod each host reads 1/P of the data. A global batch is the concatenation
of one sub-batch per partition, each drawn from that partition's own per-epoch
permutation. The batch at step t therefore depends on (seed, t, S) alone -- not on
how many processes or devices run it -- which is what makes resume exact and 1x8
equal 2x4.

This module holds no data source: the private readers are in sources.py, which
the public stages (synthesize, student) never import.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from bnsynth_jax.errors import UserError


@dataclasses.dataclass
class Partition:
  """One partition of a split, in host memory. Extra per-example arrays
  (soft labels, per-view labels) may ride along in `extras`."""
  index: int
  images: np.ndarray                          # uint8 (n, H, W, C)
  labels: np.ndarray                          # int32 (n,)
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self):
    return len(self.labels)


# ----------------------------------------------------------------------------
# Partitioning


def partition_ids_for_process(num_partitions: int, process_index: int,
                              process_count: int) -> list[int]:
  if num_partitions % process_count:
    raise UserError(
        f'data.num_partitions={num_partitions} is not divisible by the process count '
        f'{process_count}: set --config.data.num_partitions to a multiple of it (0 = one '
        'per process)')
  per = num_partitions // process_count
  return list(range(process_index * per, (process_index + 1) * per))


def partition_members(num_examples: int, num_partitions: int, partition: int) -> np.ndarray:
  """Indices (into the source order) of one partition: a fixed shuffle, then strided."""
  order = np.random.RandomState(0).permutation(num_examples)
  return np.sort(order[partition::num_partitions])


def resolve_num_partitions(data_config, process_count: int) -> int:
  return int(data_config.get('num_partitions', 0) or process_count)


def local_partitions(data_config) -> tuple[int, list[int]]:
  """(partition count, this process's partition ids): the one place both are resolved."""
  import jax
  n = resolve_num_partitions(data_config, jax.process_count())
  return n, partition_ids_for_process(n, jax.process_index(), jax.process_count())


# ----------------------------------------------------------------------------
# Normalisation


def channel_sums(partitions: Sequence[Partition]) -> np.ndarray:
  """[3, C] float64: per-channel sum, sum of squares and count of pixel values in [0,1]."""
  c = partitions[0].images.shape[-1]
  sums = np.zeros((3, c), np.float64)
  for part in partitions:
    for start in range(0, len(part), 4096):
      x = part.images[start:start + 4096].astype(np.float64) / 255.0
      x = x.reshape(-1, c)
      sums[0] += x.sum(0)
      sums[1] += np.square(x).sum(0)
      sums[2] += x.shape[0]
  return sums


def moments_from_sums(sums: np.ndarray):
  mean = sums[0] / sums[2]
  var = np.maximum(sums[1] / sums[2] - mean ** 2, 0.0)
  return mean, np.sqrt(var)


# ----------------------------------------------------------------------------
# Batching


class PartitionedBatches:
  """Deterministic training batches from this process's partitions.

  `get(step)` returns the process-local slice of global batch `step`: the
  concatenation, over local partitions in order, of `global_batch / S` examples
  drawn from each partition's permutation for epoch `step // steps_per_epoch`.
  """

  def __init__(self, partitions: Sequence[Partition], num_partitions: int,
               split_size: int, global_batch: int, seed: int):
    if global_batch % num_partitions:
      raise UserError(f'batch size {global_batch} is not divisible by data.num_partitions='
                      f'{num_partitions}: choose a batch size that is a multiple of it')
    self.partitions = list(partitions)
    self.num_partitions = num_partitions
    self.sub_batch = global_batch // num_partitions
    min_partition = split_size // num_partitions   # smallest strided partition
    self.steps_per_epoch = min_partition // self.sub_batch
    if self.steps_per_epoch < 1:
      raise UserError(f'batch size {global_batch} is larger than the training split '
                      f'({split_size} examples): lower the batch size')
    self.seed = seed
    self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

  def _perm(self, part: Partition, epoch: int) -> np.ndarray:
    key = (part.index, epoch)
    if key not in self._perm_cache:
      self._perm_cache.clear()   # one epoch in memory at a time
      rng = np.random.default_rng([self.seed, epoch, part.index])
      self._perm_cache[key] = rng.permutation(len(part))
    return self._perm_cache[key]

  def indices(self, part: Partition, step: int) -> np.ndarray:
    """The (sorted) examples of `part` in global batch `step`."""
    epoch, within = divmod(step, self.steps_per_epoch)
    perm = self._perm(part, epoch)
    return np.sort(perm[within * self.sub_batch:(within + 1) * self.sub_batch])

  def get(self, step: int) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {}
    for part in self.partitions:
      idx = self.indices(part, step)
      fields = {'images': part.images, 'labels': part.labels, **part.extras}
      for name, arr in fields.items():
        out.setdefault(name, []).append(arr[idx])
    return {k: np.concatenate(v) for k, v in out.items()}


def eval_batches(partitions: Sequence[Partition], split_size: int, num_partitions: int,
                 process_count: int, global_batch: int) -> Iterator[dict[str, np.ndarray]]:
  """Process-local eval batches, padded; every process yields the same number.

  Each batch has a float `mask` (1 = real example). The local batch is
  global_batch / process_count.
  """
  local_batch = global_batch // process_count
  parts_per_process = num_partitions // process_count
  # Largest number of examples any process holds (strided partitions differ by <= 1).
  largest = sum(len(range(p, split_size, num_partitions)) for p in range(parts_per_process))
  num_batches = -(-largest // local_batch)
  images = np.concatenate([p.images for p in partitions])
  labels = np.concatenate([p.labels for p in partitions])
  for b in range(num_batches):
    sl = slice(b * local_batch, (b + 1) * local_batch)
    x, y = images[sl], labels[sl]
    pad = local_batch - len(y)
    mask = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
    if pad:
      x = np.concatenate([x, np.zeros((pad, *images.shape[1:]), images.dtype)])
      y = np.concatenate([y, np.zeros((pad,), labels.dtype)])
    yield {'images': x, 'labels': y, 'mask': mask}


def balanced_subset(partitions: Sequence[Partition], split_size: int, num_partitions: int,
                    per_class: int, num_classes: int, seed: int):
  """A class-balanced random subset of a split, re-partitioned; the same on any process count.

  Returns (this process's partitions of the subset, the chosen indices into the split).
  """
  from bnsynth_jax import parallel
  local_idx = np.concatenate([partition_members(split_size, num_partitions, p.index)
                              for p in partitions])
  local_labels = np.concatenate([p.labels for p in partitions])
  all_idx = parallel.allgather_rows(local_idx)
  all_labels = parallel.allgather_rows(local_labels)
  labels = np.full(split_size, -1, np.int64)
  labels[all_idx] = all_labels
  rng = np.random.default_rng(seed)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise UserError(f'class {c} has only {len(members)} training images, fewer than the '
                      f'{per_class} per class asked for: lower synthesis.images_per_class')
    chosen.append(rng.permutation(members)[:per_class])
  chosen = np.sort(np.concatenate(chosen))
  local_images = np.concatenate([p.images for p in partitions])
  keep = np.isin(local_idx, chosen)
  idx = parallel.allgather_rows(local_idx[keep])
  images = parallel.allgather_rows(local_images[keep])
  order = np.argsort(idx)
  images, subset_labels = images[order], labels[idx[order]].astype(np.int32)
  n = len(chosen)
  parts = [Partition(p.index, images[m], subset_labels[m])
           for p in partitions for m in [partition_members(n, num_partitions, p.index)]]
  return parts, chosen
