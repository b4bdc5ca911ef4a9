"""DP mode with a public prior (bnsynth_jax/privacy/prior.py)."""

import functools
import json

import jax
import numpy as np
import optax
import pytest

from bnsynth_jax import artifacts, models, parallel, privacy, train
from bnsynth_jax.errors import UserError
from bnsynth_jax.privacy import prior
from conftest import run_main


def save_prior(folder, norm='group', classes=('a', 'b', 'c', 'd'), seed=1):
  """A prior folder of resnet_tiny weights for 8x8x1 images (random: what a prior holds
  does not matter to these tests, only that it is used)."""
  from bnsynth_jax.configs import digits
  model_config = digits.get_config().model
  model_config.update(name='resnet_tiny', norm=norm)
  model = models.from_config(model_config, len(classes))
  variables = models.init_variables(model, jax.random.key(seed), (8, 8, 1))
  artifacts.save_model(folder, model_config=model_config, variables=variables,
                       class_names=list(classes), image_shape=[8, 8, 1], mean=[0.5],
                       std=[0.5], extra={'command': 'a test'})
  return variables


def dp_config(prior_dir, norm='group', **overrides):
  from bnsynth_jax.configs import digits
  c = digits.get_config()
  c.model.update(name='resnet_tiny', norm=norm)
  c.privacy.update(**{'epsilon': 8.0, 'prior': str(prior_dir), 'prior_is_public': True,
                      **overrides})
  return c


def test_the_prior_must_be_declared_public_and_fit_the_model(tmp_path):
  save_prior(tmp_path / 'p')
  privacy.validate(dp_config(tmp_path / 'p'))
  with pytest.raises(UserError, match='prior_is_public=True'):
    privacy.validate(dp_config(tmp_path / 'p', prior_is_public=False))
  with pytest.raises(UserError, match='prior_trainable'):
    privacy.validate(dp_config(tmp_path / 'p', prior_trainable='some'))
  with pytest.raises(UserError, match='no manifest.json'):
    privacy.validate(dp_config(tmp_path / 'none'))
  # A BatchNorm model is allowed with a prior (frozen), refused from scratch.
  privacy.validate(dp_config(tmp_path / 'p', norm='batch'))
  with pytest.raises(UserError, match='norm=group'):
    privacy.validate(dp_config('', norm='batch', prior_is_public=False))
  model = models.create_model('resnet_tiny', 3, norm='batch')
  with pytest.raises(UserError, match="model.norm='group'"):
    prior.initial_variables(dp_config(tmp_path / 'p', norm='batch'), model, (8, 8, 1),
                            jax.random.key(0))


def test_the_prior_starts_every_layer_but_a_head_of_another_class_count(tmp_path):
  held = save_prior(tmp_path / 'p', classes=('a', 'b', 'c', 'd'))
  model = models.create_model('resnet_tiny', 3, norm='group')
  start = prior.initial_variables(dp_config(tmp_path / 'p'), model, (8, 8, 1),
                                  jax.random.key(0))
  fresh = models.init_variables(model, jax.random.key(0), (8, 8, 1))
  for name in held['params']:
    for a, b, c in zip(jax.tree.leaves(start['params'][name]),
                       jax.tree.leaves(held['params'][name]),
                       jax.tree.leaves(fresh['params'][name])):
      np.testing.assert_array_equal(a, c if name == prior.HEAD else b)
  assert start['params']['head']['kernel'].shape[-1] == 3


def test_a_student_starts_from_the_public_prior_only_when_asked_and_declared(tmp_path):
  from bnsynth_jax import student
  held = save_prior(tmp_path / 'p', classes=('a', 'b', 'c', 'd'))
  config = dp_config(tmp_path / 'p')
  config.student.model.update(name='resnet_tiny', norm='group')
  assert prior.student_start(config, 3, (8, 8, 1), seed=0) is None       # off by default
  assert prior.student_record(config) is None
  config.student.init_from_prior = True
  student.validate(config)
  start = prior.student_start(config, 3, (8, 8, 1), seed=0)
  for name in held['params']:
    if name != prior.HEAD:
      for a, b in zip(jax.tree.leaves(start['params'][name]), jax.tree.leaves(held['params'][name])):
        np.testing.assert_array_equal(a, b)
  assert start['params']['head']['kernel'].shape == (held['params']['head']['kernel'].shape[0], 3)
  assert prior.student_record(config) == {'prior': str(tmp_path / 'p'), 'declared_public': True,
                                          'variables_sha256': prior.weights_sha256(tmp_path / 'p')}
  config.student.model.norm = 'batch'                    # the student's model must be the prior's
  with pytest.raises(UserError, match='student.model.norm=group'):
    prior.student_start(config, 3, (8, 8, 1), seed=0)
  config.privacy.prior_is_public = False
  with pytest.raises(UserError, match='prior_is_public=True'):
    student.validate(config)
  config.privacy.prior = ''
  with pytest.raises(UserError, match='privacy.prior'):
    student.validate(config)


def test_trainable_masks():
  model = models.create_model('resnet_tiny', 3, norm='group')
  params = models.init_variables(model, jax.random.key(0), (8, 8, 1))['params']
  tops = lambda which: sorted(k for k, v in prior.trainable_mask(params, which).items()
                              if all(jax.tree.leaves(v)))
  assert tops('head') == ['head']
  assert tops('last_stage') == ['head'] + sorted(k for k in params if k.startswith('stage3_'))
  assert tops('all') == sorted(params)


def _dp_update(state, batch, frozen_bn, trainable='all', dp_step=True):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  new, _ = _jitted_step(frozen_bn, trainable, dp_step)(state, parallel.to_global(mesh, batch))
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), new.params,
                      state.params)


@functools.lru_cache(maxsize=None)
def _jitted_step(frozen_bn, trainable, dp_step):
  """The DP step (or, dp_step=False, the non-private step: BatchNorm on the batch's
  statistics), compiled once per setting."""
  cfg = train_config()
  common = dict(base_key=jax.random.key(1), cfg=cfg, mean=(0.5,), std=(0.5,), num_classes=3)
  if dp_step:
    return jax.jit(lambda s, b: train.dp_train_step(
        s, b, 0, clip_norm=1e3, augmult=1, frozen_bn=frozen_bn, trainable=trainable, **common))
  return jax.jit(lambda s, b: train.train_step(s, b, 0, labels='hard', **common))


def train_config():
  from bnsynth_jax.configs import digits
  cfg = digits.get_config().teacher
  cfg.update(optimizer='sgd', momentum=0.0, nesterov=False, weight_decay=0.0, crop_padding=0,
             flip=False, label_smoothing=0.0, batch_size=8)
  return cfg


def _state(tmp_path, noise=0.0, trainable='all'):
  variables = save_prior(tmp_path / 'p', norm='batch', classes=('a', 'b', 'c'))
  # Running statistics other than a batch's own (what a prior trained elsewhere holds).
  variables['batch_stats'] = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 1.5 if path[-1].key == 'var' else a - 0.1, variables['batch_stats'])
  model = models.create_model('resnet_tiny', 3, norm='batch')
  cfg = train_config()
  dp = {'clip_norm': 1e3, 'noise_multiplier': noise, 'augmult': 1,
        'noise_key': jax.random.PRNGKey(3), 'trainable': trainable}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  return train.create_train_state(jax.random.key(0), model, (8, 8, 1),
                                  train.dp_optimizer(cfg, optax.constant_schedule(1.0), dp),
                                  mesh, init=variables)


@pytest.mark.versions
def test_a_frozen_batchnorm_fine_tune_keeps_each_examples_gradient_its_own(tmp_path):
  """The update's change when example 0 is replaced is g(x0) - g(x0') over the batch: the
  same whatever the other 7 examples are, with BatchNorm frozen; not so for BatchNorm on
  batch statistics (the non-private step), which the test tells apart."""
  state = _state(tmp_path)
  rng = np.random.default_rng(0)
  x0, x0b = rng.integers(0, 256, (2, 1, 8, 8, 1), dtype=np.uint8)
  others = rng.integers(0, 256, (2, 7, 8, 8, 1), dtype=np.uint8)
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
  batch = lambda first, rest: {'images': np.concatenate([first, rest]), 'labels': labels}

  def effect_of_example_0(**kw):
    return [jax.tree.map(np.subtract, _dp_update(state, batch(x0, rest), **kw),
                         _dp_update(state, batch(x0b, rest), **kw)) for rest in others]

  frozen = effect_of_example_0(frozen_bn=True)
  for a, b in zip(jax.tree.leaves(frozen[0]), jax.tree.leaves(frozen[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert max(np.abs(a).max() for a in jax.tree.leaves(frozen[0])) > 1e-4
  mixed = effect_of_example_0(frozen_bn=False, dp_step=False)
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(mixed[0]),
                                                 jax.tree.leaves(mixed[1]))) > 1e-4


@pytest.mark.versions
def test_only_the_trainable_parameters_move_noise_included(tmp_path):
  state = _state(tmp_path, noise=1.0, trainable='head')
  rng = np.random.default_rng(0)
  batch = {'images': rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8),
           'labels': np.arange(8, dtype=np.int32) % 3}
  delta = _dp_update(state, batch, frozen_bn=True, trainable='head')
  for name, moved in delta.items():
    biggest = max(np.abs(a).max() for a in jax.tree.leaves(moved))
    assert (biggest > 0) == (name == 'head'), (name, biggest)


def test_a_dp_run_with_a_prior_names_it_in_every_manifest_and_pays_only_its_steps(tmp_path):
  save_prior(tmp_path / 'prior', classes=('a', 'b', 'c', 'd'))
  workdir = tmp_path / 'w'
  args = ('--config=configs/digits.py', '--config.model.norm=group',
          '--config.model.name=resnet_tiny', '--config.privacy.epsilon=8',
          f'--config.privacy.prior={tmp_path / "prior"}', '--config.privacy.prior_is_public=True',
          '--config.privacy.prior_trainable=last_stage',
          '--config.privacy.teacher_noise_multiplier=2',
          '--config.privacy.stats_noise_multiplier=4', '--config.teacher.num_steps=3',
          '--config.teacher.batch_size=128', '--config.synthesis.images_per_class=4',
          '--config.synthesis.batch_size=40', '--config.synthesis.iterations=2',
          '--config.student.model.name=resnet_tiny', '--config.student.model.norm=group',
          '--config.student.init_from_prior=True', '--config.student.num_steps=2',
          '--config.student.batch_size=40',
          f'--workdir={workdir}', '--stages=teacher,stats,synthesize,student')
  result = run_main(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  expected = prior.weights_sha256(tmp_path / 'prior')
  manifests = [workdir / d / 'manifest.json' for d in ('teacher', 'stats', 'synthetic')]
  for path in manifests + [workdir / 'student' / 'synthetic' / 'manifest.json']:
    record = json.loads(path.read_text())['privacy']
    assert record['prior']['variables_sha256'] == expected, path
    assert record['prior']['declared_public'] is True and record['private'] is True
  # The student started from the same public prior (student.init_from_prior), recorded.
  start = json.loads((workdir / 'student' / 'manifest.json').read_text())['synthetic']['init']
  assert start['variables_sha256'] == expected and start['declared_public'] is True
  # The prior costs nothing: the budget is the one of the same private steps from scratch.
  from bnsynth_jax.configs import digits
  scratch = digits.get_config()
  scratch.model.norm = 'group'
  scratch.privacy.update(epsilon=8.0, teacher_noise_multiplier=2.0, stats_noise_multiplier=4.0)
  scratch.teacher.update(num_steps=3, batch_size=128)
  teacher = json.loads(manifests[0].read_text())
  assert teacher['privacy']['epsilon'] == pytest.approx(
      privacy.plan(scratch, teacher['train_examples'])['epsilon'], rel=1e-9)
  assert teacher['privacy']['teacher']['steps'] == 3


def test_the_data_free_generator_is_deterministic_and_public_by_construction():
  from bnsynth_jax import procedural, sources
  from bnsynth_jax.configs import procedural_prior
  kwargs = dict(num_classes=5, size=8, channels=1, seed=1)
  images, labels = procedural.generate('train', range(20), **kwargs)
  again, _ = procedural.generate('train', range(20), **kwargs)
  np.testing.assert_array_equal(images, again)                     # same command, same images
  other, _ = procedural.generate('train', range(20), **{**kwargs, 'seed': 2})
  assert not np.array_equal(images, other)
  assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(20) % 5)
  assert images.std() > 20                                         # strokes, not blank
  colour, _ = procedural.generate('test', range(4), **{**kwargs, 'size': 32, 'channels': 3})
  assert colour.shape == (4, 32, 32, 3)
  # The source: partitions of the same images, on any partition count.
  config = procedural_prior.get_config('digits')
  config.data.update(procedural_classes=5, procedural_per_class=6)
  source = sources.create_source(config.data)
  assert source.info().num_examples == {'train': 30, 'test': 5}
  whole = source.load('train', [0], 1)[0]
  parts = source.load('train', [0, 1], 2)
  assert sorted(x.tobytes() for p in parts for x in p.images) == sorted(
      x.tobytes() for x in whole.images)


def test_the_shipped_data_free_prior_fits_the_digits_dp_teacher_from_any_folder(tmp_path,
                                                                                monkeypatch):
  from bnsynth_jax.configs import digits_dp
  monkeypatch.chdir(tmp_path)                      # the config names it relative to the repo
  config = digits_dp.get_config()
  from bnsynth_jax.privacy import class_means
  assert config.privacy.prior_is_public and class_means.enabled(config)
  assert prior.problems(config) == [] and class_means.problems(config) == []
  assert (prior.folder(config) / 'variables.msgpack').is_file()
  model = models.from_config(config.model, 10)
  start = prior.initial_variables(config, model, (8, 8, 1), jax.random.key(0))
  _, held, manifest = artifacts.load_model(prior.folder(config))
  assert manifest['num_classes'] == 1024 and start['params']['head']['kernel'].shape[-1] == 10
  for a, b in zip(jax.tree.leaves(start['params']['stem_conv']),
                  jax.tree.leaves(held['params']['stem_conv'])):
    np.testing.assert_array_equal(a, b)
  assert prior.record(config)['variables_sha256'] == manifest['variables_sha256']
