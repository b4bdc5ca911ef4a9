"""BatchNorm statistics: global and class-wise, and the standalone statistics artifact.

* global: the teacher's `batch_stats` collection itself (running mean and
  variance of every BN layer's input).
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

import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import serialization, traverse_util

from bnsynth_jax import artifacts, fileio, input_pipeline, models, parallel, pipeline, report
from bnsynth_jax.errors import UserError

STATS_FILE = 'statistics.msgpack'
KINDS = ('global', 'classwise')


def _path_key(path: tuple[str, ...]) -> str:
  return '/'.join(path)


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


def global_statistics(variables) -> dict[str, dict[str, np.ndarray]]:
  """{'mean': {layer: [ch]}, 'var': {layer: [ch]}} from the teacher's batch_stats."""
  flat = traverse_util.flatten_dict(variables['batch_stats'])
  out = {'mean': {}, 'var': {}}
  for path, value in flat.items():
    out[path[-1]][_path_key(path[:-1])] = np.asarray(value, np.float64)
  return out


def _classwise_sums_step(variables, batch, *, model, num_classes, shift, mean, std):
  """Per-class shifted sums of every BN input over one (global, sharded) batch."""
  x = (batch['images'].astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
  _, captured = models.capture_bn_inputs(model, variables, x)
  weights = jax.nn.one_hot(batch['labels'], num_classes) * batch['mask'][:, None]  # [N, C]
  sums = {}
  for path, a in captured.items():
    a = a.astype(jnp.float32) - shift[_path_key(path)]
    s1 = jnp.einsum('nc,nk->ck', weights, jnp.sum(a, axis=(1, 2)))
    s2 = jnp.einsum('nc,nk->ck', weights, jnp.sum(jnp.square(a), axis=(1, 2)))
    sums[_path_key(path)] = (s1, s2)
  return sums, jnp.sum(weights, axis=0)


def classwise_statistics(model, variables, partitions, split_size: int, num_partitions: int,
                         num_classes: int, mean, std, batch_size: int):
  """Exact per-class moments of every BN input over a whole split (all processes)."""
  mesh = parallel.make_mesh()
  batch_size = parallel.round_up_batch(batch_size, mesh)
  shift = {k: jnp.asarray(v, jnp.float32)
           for k, v in global_statistics(variables)['mean'].items()}
  step = functools.partial(_classwise_sums_step, model=model, num_classes=num_classes,
                           shift=shift, mean=tuple(mean), std=tuple(std))
  hw = {_path_key(p): s[1] * s[2] for p, s in
        bn_input_shapes(model, variables, partitions[0].images.shape[1:]).items()}
  jitted = jax.jit(step,
                   in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))
  variables = parallel.replicate(mesh, variables)
  s1 = {k: np.zeros((num_classes, v.shape[-1]), np.float64) for k, v in shift.items()}
  s2 = {k: np.zeros_like(v) for k, v in s1.items()}
  counts = np.zeros(num_classes, np.float64)
  for batch in input_pipeline.eval_batches(partitions, split_size, num_partitions,
                                           jax.process_count(), batch_size):
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


# ----------------------------------------------------------------------------
# The artifact


def save_artifact(directory, *, kind, statistics, class_counts, teacher_manifest, layers):
  directory = fileio.path(directory)
  payload = {'mean': statistics['mean'], 'var': statistics['var'],
             'class_counts': np.asarray(class_counts, np.float64)}
  data = serialization.msgpack_serialize(
      jax.tree.map(lambda a: np.asarray(a, np.float32) if np.ndim(a) else a, payload))
  manifest = {
      'kind': kind,
      'class_names': teacher_manifest['class_names'],
      'num_classes': teacher_manifest['num_classes'],
      'image_shape': teacher_manifest['image_shape'],
      'mean': teacher_manifest['mean'], 'std': teacher_manifest['std'],
      'model': teacher_manifest['model'],
      'teacher_sha256': teacher_manifest['variables_sha256'],
      'layers': [_path_key(p) for p in layers],
      'statistics_sha256': hashlib.sha256(data).hexdigest(),
      'class_counts': np.asarray(class_counts).tolist(),
  }
  if parallel.is_main_process():
    fileio.atomic_write_bytes(directory / STATS_FILE, data)
    fileio.atomic_write_json(directory / 'manifest.json', manifest)
  return manifest


def load_artifact(directory, teacher_manifest=None, teacher_variables=None):
  """Returns (statistics, manifest); refuses altered files or a different teacher."""
  directory = fileio.path(directory)
  if not (directory / 'manifest.json').exists():
    raise UserError(f'{directory} holds no statistics artifact (manifest.json is missing): run '
                    'the stats stage or point synthesis.stats_dir at its folder')
  manifest = fileio.read_json(directory / 'manifest.json')
  data = (directory / STATS_FILE).read_bytes()
  if hashlib.sha256(data).hexdigest() != manifest['statistics_sha256']:
    raise UserError(f'{directory / STATS_FILE} does not match its manifest: the file was '
                    'altered or half-copied; copy the statistics folder again')
  statistics = serialization.msgpack_restore(data)
  if teacher_manifest is not None:
    if teacher_manifest['variables_sha256'] != manifest['teacher_sha256']:
      raise UserError(
          f'the statistics in {directory} were computed with teacher sha256 '
          f'{manifest["teacher_sha256"][:12]} but the teacher given has '
          f'{teacher_manifest["variables_sha256"][:12]}: use the teacher checkpoint the '
          'statistics came from, or recompute the statistics (stats stage)')
    for key in ('class_names', 'image_shape', 'model'):
      if teacher_manifest[key] != manifest[key]:
        raise UserError(f'statistics and teacher disagree on {key} ({manifest[key]} vs '
                        f'{teacher_manifest[key]}): use matching artifacts')
  if teacher_variables is not None:
    expected = global_statistics(teacher_variables)['mean']
    lead = (manifest['num_classes'],) if manifest['kind'] == 'classwise' else ()
    for name, value in expected.items():
      got = statistics['mean'].get(name)
      if got is None or tuple(got.shape) != lead + value.shape:
        raise UserError(f'statistics layer {name} has shape '
                        f'{None if got is None else got.shape}, the teacher needs '
                        f'{lead + value.shape}: the statistics belong to another model')
  return statistics, manifest


# ----------------------------------------------------------------------------
# The stage


def validate(config) -> None:
  if config.stats.kind not in KINDS:
    raise UserError(f"unknown stats.kind {config.stats.kind!r}: use 'global' or 'classwise'")


def run(config, workdir, data: pipeline.PrivateData) -> dict:
  teacher_dir = pipeline.stage_dir(workdir, 'teacher')
  model, variables, teacher_manifest = artifacts.load_model(teacher_dir)
  image_shape = teacher_manifest['image_shape']
  layers = layer_order(model, variables, image_shape)
  kind = config.stats.kind
  if kind == 'global':
    statistics = global_statistics(variables)
    counts = np.zeros(teacher_manifest['num_classes'])
  else:
    statistics, counts = classwise_statistics(
        model, variables, data.split('train'), data.split_size('train'), data.num_partitions,
        teacher_manifest['num_classes'], teacher_manifest['mean'], teacher_manifest['std'],
        config.stats.batch_size)
  manifest = save_artifact(pipeline.stage_dir(workdir, 'stats'), kind=kind,
                           statistics=statistics, class_counts=counts,
                           teacher_manifest=teacher_manifest, layers=layers)
  logging.info('stats: %s statistics of %d BN layers written', kind, len(layers))
  values = {'kind': kind, 'num_layers': len(layers),
            'statistics_sha256': manifest['statistics_sha256']}
  report.update(workdir, {'stats': values})
  return values


pipeline.register(pipeline.Stage('stats', run, validate))
