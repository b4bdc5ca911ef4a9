"""BatchNorm statistics: global and class-wise, and the standalone statistics artifact.

* global: the teacher's `batch_stats` collection itself (running mean and
  variance of every BN layer's input); for a teacher without running statistics
  (GroupNorm) or in DP mode, the moments of every normalisation input pooled over
  the whole training split (`pooled_global`): exact, or through the same Gaussian
  mechanism as the class-wise ones, with one row for all classes instead of one per
  class, so each noised mean averages ~C times more examples.
* classwise: for every class c and BN layer l, the exact per-channel mean and
  biased variance of layer l's input over all training images of class c, the
  teacher in inference mode. Accumulated as sums of (x - K) and (x - K)^2 with a
  per-channel shift K (the running mean: it keeps E[x^2] - E[x]^2 from cancelling),
  one-hot weighted so a batch may hold any classes, summed over the global batch
  on device and over batches in float64 on the host. Never an average of
  per-batch variances.

The artifact, WORKDIR/stats/: statistics.msgpack ({'mean': tree, 'var': tree,
'class_counts'}; trees shaped like batch_stats, with a leading class axis for
classwise) and manifest.json (kind, classes, image shape, normalisation, model,
the teacher's sha256, the BN layers in forward order). Together with the teacher
artifact it is everything synthesis needs: no private image is read after this
stage.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bnsynth_jax import (artifacts, augment, input_pipeline, metrics, models, parallel, privacy,
                         report)
from bnsynth_jax.errors import UserError
from bnsynth_jax.workdir import stage_dir
from bnsynth_jax.sources import PrivateData

KINDS = ('global', 'classwise')


def bn_input_shapes(model, variables, image_shape) -> dict[tuple[str, ...], tuple]:
  """{BN layer path: input shape for one image}, in forward (execution) order."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  order: list[tuple[str, ...]] = []

  def capture(v, x):
    captured = models.capture_bn_inputs(model, v, x)[1]
    order.extend(captured)   # JAX returns dicts with sorted keys: keep the trace order here
    return captured

  shapes = jax.eval_shape(capture, variables, x)
  return {path: tuple(shapes[path].shape) for path in order}


def layer_order(model, variables, image_shape) -> list[tuple[str, ...]]:
  """BN layer paths in forward (execution) order."""
  return list(bn_input_shapes(model, variables, image_shape))


def _classwise_sums_step(variables, batch, *, model, num_classes, shift, mean, std):
  """Per-class shifted sums of every BN input over one (global, sharded) batch."""
  x = augment.normalise(batch['images'], mean, std)
  _, captured = models.capture_bn_inputs(model, variables, x)
  weights = jax.nn.one_hot(batch['labels'], num_classes) * batch['mask'][:, None]  # [N, C]
  sums = {}
  for path, a in captured.items():
    a = a.astype(jnp.float32) - shift[artifacts.layer_key(path)]
    s1 = jnp.einsum('nc,nk->ck', weights, jnp.sum(a, axis=(1, 2)))
    s2 = jnp.einsum('nc,nk->ck', weights, jnp.sum(jnp.square(a), axis=(1, 2)))
    sums[artifacts.layer_key(path)] = (s1, s2)
  return sums, jnp.sum(weights, axis=0)


def classwise_statistics(model, variables, partitions, split_size: int, num_partitions: int,
                         num_classes: int, mean, std, batch_size: int):
  """Exact per-class moments of every BN input over a whole split (all processes)."""
  mesh = parallel.make_mesh()
  batch_size = parallel.round_up_batch(batch_size, mesh)
  shapes = {artifacts.layer_key(p): s for p, s in
            bn_input_shapes(model, variables, partitions[0].images.shape[1:]).items()}
  running = artifacts.global_statistics(variables)['mean']   # none for GroupNorm
  shift = {k: jnp.asarray(running.get(k, np.zeros(s[-1])), jnp.float32)
           for k, s in shapes.items()}
  step = functools.partial(_classwise_sums_step, model=model, num_classes=num_classes,
                           shift=shift, mean=tuple(mean), std=tuple(std))
  hw = {k: s[1] * s[2] for k, s in shapes.items()}
  jitted = jax.jit(step,
                   in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))
  variables = parallel.replicate(mesh, variables)
  s1 = {k: np.zeros((num_classes, v.shape[-1]), np.float64) for k, v in shift.items()}
  s2 = {k: np.zeros_like(v) for k, v in s1.items()}
  counts = np.zeros(num_classes, np.float64)
  local = sum(len(p) for p in partitions)
  tick = metrics.progress('stats: class-wise moments', local, 'img')
  for b, batch in enumerate(input_pipeline.eval_batches(partitions, split_size, num_partitions,
                                                        jax.process_count(), batch_size)):
    tick(min(local, (b + 1) * len(batch['labels'])))
    sums, batch_counts = parallel.to_host(jitted(variables, parallel.to_global(mesh, batch)))
    for k, (a, b) in sums.items():
      s1[k] += a
      s2[k] += b
    counts += batch_counts
  if np.any(counts == 0):
    missing = np.flatnonzero(counts == 0).tolist()
    raise UserError(f'classes {missing} have no training images: class-wise statistics need '
                    'every class, use stats.kind=global or add images')
  out = {'mean': {}, 'var': {}}
  for k in s1:
    n = counts[:, None] * hw[k]
    centred_mean = s1[k] / n
    out['mean'][k] = centred_mean + np.asarray(shift[k], np.float64)[None]
    out['var'][k] = np.maximum(s2[k] / n - np.square(centred_mean), 0.0)
  return out, counts


def _dp_sums_step(variables, batch, *, model, num_classes, clip_norm, scales, mean, std):
  x = augment.normalise(batch['images'], mean, std)
  _, captured = models.capture_bn_inputs(model, variables, x)
  vectors = privacy.moment_vectors({artifacts.layer_key(p): a for p, a in captured.items()},
                                   scales)
  return privacy.clipped_class_sums(vectors, batch['labels'], batch['mask'], num_classes,
                                    clip_norm)


def dp_classwise_statistics(model, variables, partitions, split_size: int, num_partitions: int,
                            num_classes: int, mean, std, batch_size: int, *, clip_norm: float,
                            noise_multiplier: float, rng: np.random.Generator):
  """Class-wise moments released by the Gaussian mechanism (privacy/): per-example moment
  vectors clipped to `clip_norm`, summed per class with a count coordinate, noised."""
  mesh = parallel.make_mesh()
  batch_size = parallel.round_up_batch(batch_size, mesh)
  image_shape = partitions[0].images.shape[1:]
  channels = {artifacts.layer_key(p): s[-1] for p, s in
              bn_input_shapes(model, variables, image_shape).items()}
  scales = privacy.public_scales(model, variables, image_shape)
  step = functools.partial(_dp_sums_step, model=model, num_classes=num_classes,
                           clip_norm=float(clip_norm), scales=scales, mean=tuple(mean),
                           std=tuple(std))
  jitted = jax.jit(step,
                   in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))
  variables = parallel.replicate(mesh, variables)
  sums = np.zeros((num_classes, 2 * sum(channels.values()) + 1), np.float64)
  local = sum(len(p) for p in partitions)
  tick = metrics.progress('stats: clipped class-wise moments', local, 'img')
  for b, batch in enumerate(input_pipeline.eval_batches(partitions, split_size, num_partitions,
                                                        jax.process_count(), batch_size)):
    tick(min(local, (b + 1) * len(batch['labels'])))
    # (The count of clipped examples is not logged: an unnoised statistic of private data.)
    batch_sums, _ = parallel.to_host(jitted(variables, parallel.to_global(mesh, batch)))
    sums += np.asarray(batch_sums, np.float64)
  clip_norm = clip_norm or math.sqrt(sums.shape[1] - 1)
  statistics, counts = privacy.noised_moments(sums, channels, scales, clip_norm,
                                              noise_multiplier, rng)
  return statistics, counts, {'clip_norm': clip_norm, 'sensitivity': 2.0 * clip_norm,
                              'vector_length': int(sums.shape[1] - 1)}


# ----------------------------------------------------------------------------
# The stage


def validate(config) -> None:
  if config.stats.kind not in KINDS:
    raise UserError(f"unknown stats.kind {config.stats.kind!r}: use 'global' or 'classwise'")


def pooled_global(config) -> bool:
  """stats.kind=global measured on the private split (GroupNorm has no running statistics;
  in DP mode a prior's running statistics are of public data): the stage reads images."""
  return config.stats.kind == 'global' and (config.model.get('norm', 'batch') == 'group'
                                            or privacy.enabled(config))


def reads_images(config) -> bool:
  return config.stats.kind != 'global' or pooled_global(config)


def _one_class(partitions):
  """The split with every label 0: pooled moments are class-wise ones of a single class."""
  return [dataclasses.replace(p, labels=np.zeros_like(p.labels)) for p in partitions]


def _train_partitions(data, pooled: bool):
  return _one_class(data.split('train')) if pooled else data.split('train')


def _pooled(statistics):
  return {m: {k: v[0] for k, v in layers.items()} for m, layers in statistics.items()}


def run(config, workdir, data: PrivateData) -> dict:
  teacher_dir = stage_dir(workdir, 'teacher')
  model, variables, teacher_manifest = artifacts.load_model(teacher_dir)
  image_shape = teacher_manifest['image_shape']
  layers = layer_order(model, variables, image_shape)
  kind, num_classes = config.stats.kind, teacher_manifest['num_classes']
  pooled = pooled_global(config)
  rows = 1 if pooled else num_classes
  if not reads_images(config):          # a BatchNorm teacher's running statistics
    statistics = artifacts.global_statistics(variables)
  elif privacy.enabled(config):
    record = teacher_manifest['privacy']
    statistics, counts, applied = dp_classwise_statistics(
        model, variables, _train_partitions(data, pooled), data.split_size('train'),
        data.num_partitions, rows, teacher_manifest['mean'], teacher_manifest['std'],
        config.stats.batch_size, clip_norm=float(config.privacy.stats_clip_norm),
        noise_multiplier=record['stats']['noise_multiplier'], rng=privacy.statistics_rng(config))
    teacher_manifest = {**teacher_manifest, 'privacy': {
        **record, 'stats': {**record['stats'], **applied}}}
  else:
    statistics, counts = classwise_statistics(
        model, variables, _train_partitions(data, pooled), data.split_size('train'),
        data.num_partitions, rows, teacher_manifest['mean'], teacher_manifest['std'],
        config.stats.batch_size)
  if kind == 'global':
    statistics = _pooled(statistics) if pooled else statistics
    counts = np.zeros(num_classes)       # (a global artifact holds no class counts)
  manifest = artifacts.save_statistics(stage_dir(workdir, 'stats'), kind=kind,
                           statistics=statistics, class_counts=counts,
                           teacher_manifest=teacher_manifest, layers=layers)
  logging.info('stats: %s statistics of %d BN layers written', kind, len(layers))
  values = {'kind': kind, 'num_layers': len(layers),
            'statistics_sha256': manifest['statistics_sha256']}
  report.update(workdir, {'stats': values})
  if 'privacy' in manifest:
    report.update(workdir, {'privacy': manifest['privacy']})
  return values
