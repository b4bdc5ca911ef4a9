"""A DP teacher head from the noised class means of a public prior's features.

  --config.privacy.prior=DIR --config.privacy.prior_is_public=True \
      --config.privacy.head=class_means [--config.privacy.head_dims=16]

With a good public feature extractor, the class means of its features already make a good
classifier, and at small epsilon a head fitted from noised class means beats DP-SGD
(Mehta et al. 2023): it is one Gaussian mechanism on per-class sums, not hundreds of noised
steps. Here the prior (privacy.prior, declared public) is frozen whole (or, with no prior, a model
whose features need no data: scatternet_linear*, the scattering under GroupNorm at its
initial scale and offset), and:

1. a public projection, made without any data: the prior's features of uniform-noise
   images, their mean mu and their top `head_dims` principal directions P;
2. each private training example gives one unit vector u = P'(f - mu) / |P'(f - mu)| (f its
   features; u = 0 where that norm is 0), summed per class;
3. the [classes, head_dims] sums get Gaussian noise of standard deviation
   noise_multiplier x 2: replacing one example removes one unit vector from its class's
   row and adds one to another's (or the same) row, an L2 change of at most 2 (replace-one
   sensitivity). Nothing else of the private data is read: no count, no norm;
4. the head is the cosine classifier of the noised sums, as the model's linear head:
   logits_c = head_scale x w_c . P'(f - mu) / r, with w_c the unit vector of class c's noised
   sum and r the median |P'(f - mu)| over the noise images (public), so the logits have
   about head_scale's range.

The accountant composes one Gaussian mechanism (privacy.teacher_event) with the
statistics. The teacher folder has the model's usual format: every later stage (stats,
synthesis, labels, students) is unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bnsynth_jax import augment, input_pipeline, metrics, models, parallel
from bnsynth_jax.errors import UserError

HEADS = ('dpsgd', 'class_means')
SENSITIVITY = 2.0          # replace-one: one unit vector out of a row, one into a row
NUM_PROBES = 4096          # uniform-noise images of the public projection


def enabled(config) -> bool:
  return config.privacy.get('head', 'dpsgd') == 'class_means'


def problems(config) -> list[str]:
  """Config-only checks (privacy.validate reports them with the others)."""
  p = config.privacy
  if p.get('head', 'dpsgd') not in HEADS:
    return [f"privacy.head={p.head!r}: use one of {', '.join(HEADS)}"]
  if not enabled(config):
    return []
  out = []
  if not p.prior and not models.has_data_free_features(config.model.name):
    out.append(f'privacy.head=class_means fits a head on public features, which '
               f'model.name={config.model.name} does not have untrained: set '
               '--config.privacy.prior=DIR (e.g. a shipped pretrained/ prior) or use a '
               'data-free model (--config.model.name=scatternet_linear_pool8)')
  if int(p.get('head_dims', 0)) < 1:
    out.append(f'privacy.head_dims={p.get("head_dims")} must be at least 1 (e.g. 16)')
  if not float(p.get('head_scale', 0.0)) > 0:
    out.append(f'privacy.head_scale={p.get("head_scale")} must be positive (e.g. 10)')
  return out


def _features_fn(model, mean, std):
  def features(variables, images):
    _, f = model.apply(variables, augment.normalise(images, mean, std), train=False,
                       return_features=True)
    return f.astype(jnp.float32)
  return features


def public_projection(features_fn, variables, image_shape, dims: int,
                      num_probe: int = NUM_PROBES) -> dict[str, np.ndarray]:
  """mu, the top `dims` principal directions P ([D, dims]) and the median projected norm r
  of the prior's features of uniform-noise images (seeded: public, the same every run)."""
  rng = np.random.default_rng(0)
  probes = rng.integers(0, 256, (num_probe, *image_shape)).astype(np.uint8)
  jitted = jax.jit(features_fn)
  feats = np.concatenate([np.asarray(jitted(variables, jnp.asarray(probes[i:i + 512])),
                                     np.float64) for i in range(0, num_probe, 512)])
  mu = feats.mean(0)
  if dims > min(feats.shape):
    raise UserError(f'privacy.head_dims={dims} exceeds the prior\'s {feats.shape[1]} feature '
                    'dimensions: lower --config.privacy.head_dims')
  _, _, vt = np.linalg.svd(feats - mu, full_matrices=False)
  basis = vt[:dims].T
  radius = float(np.median(np.linalg.norm((feats - mu) @ basis, axis=1))) or 1.0
  return {'mean': mu, 'basis': basis, 'radius': radius}


def _unit_sums_step(variables, batch, *, features_fn, mu, basis, num_classes):
  """Per class, the sum of the batch's unit projected features ([C, dims])."""
  z = (features_fn(variables, batch['images']) - mu) @ basis
  norm = jnp.linalg.norm(z, axis=1, keepdims=True)
  u = jnp.where(norm > 0, z / jnp.maximum(norm, 1e-30), 0.0)
  weights = jax.nn.one_hot(batch['labels'], num_classes) * batch['mask'][:, None]
  return weights.T @ u


def class_unit_sums(features_fn, variables, partitions, split_size: int, num_partitions: int,
                    num_classes: int, projection: dict, batch_size: int) -> np.ndarray:
  """The exact per-class sums of unit vectors over the whole split ([C, dims], float64):
  what the Gaussian mechanism noises. Nothing else about the data leaves this function."""
  mesh = parallel.make_mesh()
  batch_size = parallel.round_up_batch(batch_size, mesh)
  step = functools.partial(_unit_sums_step, features_fn=features_fn,
                           mu=jnp.asarray(projection['mean'], jnp.float32),
                           basis=jnp.asarray(projection['basis'], jnp.float32),
                           num_classes=num_classes)
  jitted = jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))
  variables = parallel.replicate(mesh, variables)
  sums = np.zeros((num_classes, projection['basis'].shape[1]), np.float64)
  local = sum(len(p) for p in partitions)
  tick = metrics.progress('teacher: class sums of unit features', local, 'img')
  for b, batch in enumerate(input_pipeline.eval_batches(partitions, split_size, num_partitions,
                                                        jax.process_count(), batch_size)):
    tick(min(local, (b + 1) * len(batch['labels'])))
    sums += np.asarray(parallel.to_host(jitted(variables, parallel.to_global(mesh, batch))),
                       np.float64)
  return sums


def noised(sums: np.ndarray, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
  return sums + rng.normal(0.0, noise_multiplier * SENSITIVITY, sums.shape)


def head_params(noisy_sums: np.ndarray, projection: dict, scale: float) -> dict:
  """The linear head of the cosine classifier of the noised class sums (module docstring):
  kernel [D, C] = s P W', bias = -s W P' mu, s = scale / r."""
  w = noisy_sums / np.maximum(np.linalg.norm(noisy_sums, axis=1, keepdims=True), 1e-30)
  s = scale / projection['radius']
  kernel = s * projection['basis'] @ w.T
  bias = -s * w @ (projection['basis'].T @ projection['mean'])
  return {'kernel': kernel.astype(np.float32), 'bias': bias.astype(np.float32)}


def fit_teacher(config, data, start: dict, *, noise_multiplier: float,
                rng: np.random.Generator) -> tuple[object, dict, dict]:
  """The teacher: `start` (the prior's variables for config.model, its head fresh) with
  the class-means head. Returns (model, variables, what the manifest records)."""
  info = data.info
  mean, std = data.normalisation()
  model = models.from_config(config.model, info.num_classes)
  features_fn = _features_fn(model, tuple(map(float, mean)), tuple(map(float, std)))
  dims = int(config.privacy.head_dims)
  projection = public_projection(features_fn, start, info.image_shape, dims)
  sums = class_unit_sums(features_fn, start, data.split('train'), data.split_size('train'),
                         data.num_partitions, info.num_classes, projection,
                         int(config.stats.batch_size))
  head = head_params(noised(sums, noise_multiplier, rng), projection,
                     float(config.privacy.head_scale))
  if start['params']['head']['kernel'].shape != head['kernel'].shape:
    raise UserError(f'privacy.head=class_means: the model\'s head takes '
                    f'{start["params"]["head"]["kernel"].shape[0]} features, the prior gives '
                    f'{head["kernel"].shape[0]}: check --config.model against the prior')
  variables = jax.tree.map(lambda x: x, start)
  variables['params'] = {**start['params'], 'head': jax.tree.map(jnp.asarray, head)}
  logging.info('teacher: class-means head on %d public projections of the public features, '
               'noise multiplier %.4g (std %.4g)', dims, noise_multiplier,
               noise_multiplier * SENSITIVITY)
  return model, variables, {'head': 'class_means', 'head_dims': dims,
                            'head_scale': float(config.privacy.head_scale),
                            'projection_probes': NUM_PROBES}
