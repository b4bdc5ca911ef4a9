"""The ScatterNet teachers (bnsynth_jax/scatternet.py): the public front end has no
parameters, and DP-SGD computing it once per batch gives the gradients of the whole model."""

from unittest import mock

import jax
import numpy as np
import optax
import pytest

from bnsynth_jax import config_lib, models, parallel, privacy, scatternet, train


def _model(name='scatternet_linear_pool2'):
  return models.create_model(name, 3, norm='group')


@pytest.mark.versions
def test_the_front_end_has_no_parameters_and_the_model_is_front_then_rest():
  model = _model('scatternet_cnn_tiny')
  variables = models.init_variables(model, jax.random.key(0), (16, 16, 1))
  assert not any('scatter' in '/'.join(map(str, k)) and 'norm' not in '/'.join(map(str, k))
                 for k, _ in jax.tree_util.tree_flatten_with_path(variables['params'])[0])
  x = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
  s = scatternet.scattering(x)
  assert s.shape == (4, 4, 4, 81)
  whole = model.apply(variables, x)
  split = model.apply(variables, model.public_front_end(x), method='from_front_end')
  np.testing.assert_allclose(np.asarray(whole), np.asarray(split), rtol=1e-6, atol=1e-6)
  _, captured = models.capture_bn_inputs(model, variables, x)
  assert list(captured)[0] == ('scatter_norm',)        # the coefficients' moments are matched


def test_an_image_size_the_transform_cannot_take_is_one_clear_error():
  from bnsynth_jax.errors import UserError
  with pytest.raises(UserError, match='divisible by 4'):
    scatternet.scattering(np.zeros((1, 10, 10, 1), np.float32))


def _step(model, use_front_end: bool, cached: bool = False):
  cfg = config_lib.train_config(batch_size=8, crop_padding=0, flip=False, learning_rate=1.0,
                                momentum=0.0, nesterov=False, weight_decay=0.0)
  rng = np.random.default_rng(0)
  batch = {'images': rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8),
           'labels': rng.integers(0, 3, 8).astype(np.int32)}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  dp = {'clip_norm': 1e-2, 'noise_multiplier': 1.0, 'augmult': 2,
        'noise_key': jax.random.PRNGKey(0)}
  state = train.create_train_state(jax.random.key(0), model, (16, 16, 1),
                                   train.dp_optimizer(cfg, optax.constant_schedule(1.0), dp),
                                   mesh)
  if cached:     # chunks of 3: two full ones and a padded one
    batch['images'] = privacy.front_end_features(model.public_front_end, batch['images'],
                                                 (0.4,), (0.2,), chunk=3)
  new, _ = jax.jit(lambda s, b: train.dp_train_step(
      s, b, 0, base_key=jax.random.key(1), cfg=cfg, mean=(0.4,), std=(0.2,), num_classes=3,
      clip_norm=1e-2, augmult=2, model=model if use_front_end else None,
      front_end_cached=cached))(state, parallel.to_global(mesh, batch))
  return jax.tree.map(lambda a, b: np.asarray(a - b), new.params, state.params)


@pytest.mark.versions
def test_dp_sgd_with_the_front_end_outside_the_per_example_gradients_is_the_same_step():
  model = _model()
  outside, inside = _step(model, True), _step(model, False)
  for a, b in zip(jax.tree.leaves(outside), jax.tree.leaves(inside)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert max(float(np.abs(a).max()) for a in jax.tree.leaves(outside)) > 0
  for a, b in zip(jax.tree.leaves(_step(model, True, cached=True)), jax.tree.leaves(outside)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_cached_front_end_batches_are_the_draws_of_the_whole_split_batches():
  """privacy.FrontEndBatches: the same rows at every step as WholeSplitBatches, each the
  front end of its image; used only where every DP-SGD view is the image itself."""
  from bnsynth_jax.input_pipeline import Partition
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, 10).astype(np.int32)
  parts = [Partition(index=0, images=images, labels=labels)]
  plain = privacy.WholeSplitBatches(parts, 10, 4, seed=5)
  model = _model()
  cached = privacy.FrontEndBatches(plain, model.public_front_end, (0.4,), (0.2,), chunk=4)
  whole = np.asarray(model.public_front_end((images / 255.0 - 0.4) / 0.2))
  for step in (0, 7):
    got, want = cached.get(step), plain.get(step)
    np.testing.assert_array_equal(got['labels'], want['labels'])
    np.testing.assert_allclose(got['images'], whole[plain.local_indices(step)], atol=1e-5)
  config = config_lib.default_config()
  config.teacher.crop_padding, config.teacher.flip = 0, False
  assert privacy.caches_front_end(config, model, images)
  assert not privacy.caches_front_end(config, models.create_model('resnet_tiny', 3), images)
  config.teacher.flip = True                 # augmented views: each step's own transform
  assert not privacy.caches_front_end(config, model, images)
  config.teacher.flip, config.privacy.cache_front_end = False, False
  assert not privacy.caches_front_end(config, model, images)
  config.privacy.cache_front_end = True      # outputs over the host-memory bound: per step
  assert privacy.caches_front_end(config, model, images)
  assert privacy.front_end_bytes(model.public_front_end, images) == 10 * 4 * 4 * 81 * 4
  with mock.patch.object(privacy, 'FRONT_END_CACHE_MAX_BYTES', 10 * 4 * 4 * 81 * 4 - 1):
    assert not privacy.caches_front_end(config, model, images)


def test_the_epsilon_one_variant_is_the_dp_default_with_its_recipe_only():
  """configs/cifar10.py:cpu_dp_eps1 passes the DP and synthesis checks and differs from
  cpu_dp in exactly the settings its docstring names."""
  from bnsynth_jax import privacy, synthesis
  from bnsynth_jax.configs import cifar10

  def flat(node, prefix=''):
    for key, value in node.items():
      if hasattr(value, 'items'):
        yield from flat(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value

  base, eps1 = (cifar10.get_config(v) for v in ('cpu_dp', 'cpu_dp_eps1'))
  for c in (base, eps1):
    privacy.validate(c)
    synthesis.validate(c)
  a, b = dict(flat(base)), dict(flat(eps1))
  assert {k for k in a if a[k] != b[k]} == {
      'privacy.epsilon', 'teacher.epochs', 'model.name', 'student.model.name',
      'synthesis.method', 'synthesis.generator.steps', 'synthesis.images_per_class'}
  assert b['privacy.epsilon'] == 1 and b['model.name'] == 'scatternet_linear_pool8'
