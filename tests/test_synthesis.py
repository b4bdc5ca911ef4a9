import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bnsynth_jax import (artifacts, augment, config_lib, input_pipeline, models, parallel,
                         sources, stats,
                         synthesis, synthetic_data)
from bnsynth_jax.errors import UserError


# ----------------------------------------------------------------------------
# The BN matching loss


def moments_as_targets(captured, labels=None, num_classes=3):
  out = {'mean': {}, 'var': {}}
  for path, a in captured.items():
    a = np.asarray(a, np.float64)
    name = '/'.join(path)
    if labels is None:
      flat = a.reshape(-1, a.shape[-1])
      out['mean'][name], out['var'][name] = flat.mean(0), flat.var(0)
    else:
      out['mean'][name] = np.stack([a[labels == c].reshape(-1, a.shape[-1]).mean(0)
                                    for c in range(num_classes)])
      out['var'][name] = np.stack([a[labels == c].reshape(-1, a.shape[-1]).var(0)
                                   for c in range(num_classes)])
  return out


@pytest.mark.parametrize('classwise', [False, True])
def test_bn_loss_is_zero_at_the_target_and_positive_elsewhere(classwise):
  model = models.create_model('resnet_tiny', 3)
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  x = jax.random.normal(jax.random.key(1), (12, 8, 8, 3))
  labels = np.arange(12) % 3
  _, captured = models.capture_bn_inputs(model, variables, x)
  targets = moments_as_targets(captured, labels if classwise else None)
  weights = {'/'.join(p): 1.0 for p in captured}
  loss, per_layer = synthesis.bn_matching_loss(captured, targets, weights,
                                               jnp.asarray(labels) if classwise else None, 3)
  assert float(loss) < 1e-3 * len(per_layer)
  _, other = models.capture_bn_inputs(model, variables, x * 1.5 + 0.2)
  loss2, _ = synthesis.bn_matching_loss(other, targets, weights,
                                        jnp.asarray(labels) if classwise else None, 3)
  assert float(loss2) > 0.1


@pytest.mark.parametrize('classwise,norm', [(False, 'l2'), (True, 'l2'), (True, 'squared_l2')])
def test_bn_loss_gradient_matches_finite_differences(classwise, norm):
  from jax.test_util import check_grads
  with jax.enable_x64(True):
    rng = np.random.RandomState(0)
    w = jnp.asarray(rng.randn(3, 4))
    labels = jnp.asarray(np.arange(6) % 2) if classwise else None
    lead = (2,) if classwise else ()
    targets = {'mean': {'a': jnp.asarray(rng.randn(*lead, 3)), 'b': jnp.asarray(rng.randn(*lead, 4))},
               'var': {'a': jnp.asarray(rng.rand(*lead, 3) + 0.5),
                       'b': jnp.asarray(rng.rand(*lead, 4) + 0.5)}}

    def loss(x):
      captured = {('a',): x, ('b',): jnp.tanh(x @ w)}
      return synthesis.bn_matching_loss(captured, targets, {'a': 3.0, 'b': 1.0}, labels, 2,
                                        norm)[0]

    x = jnp.asarray(rng.randn(6, 4, 4, 3))
    check_grads(loss, (x,), order=1, modes=['rev'], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_total_variation_of_a_constant_image_is_zero():
  l2, l1 = synthesis.total_variation(jnp.ones((2, 5, 5, 3)))
  assert float(l2) == 0 and float(l1) == 0


def test_augmentations_keep_shape():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  assert augment.jitter_flip(jax.random.key(1), x, 2, True).shape == x.shape
  y = augment.random_resized_crop(jax.random.key(1), x, 0.3, True)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  rolled = augment.jitter_flip(jax.random.key(2), x, 1, False)
  shifts = set()
  for a, b in zip(np.asarray(rolled), np.asarray(x)):   # each image is a roll of its original
    found = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
             if np.allclose(a, np.roll(b, (dy, dx), (0, 1)))]
    assert found, 'an image is not a roll of its original'
    shifts.update(found)
  assert shifts != {(0, 0)}, 'jitter moved nothing'   # fails if the jitter is a no-op


# ----------------------------------------------------------------------------
# Small artifacts: a random tiny teacher on 8x8x1 and its statistics


def make_artifacts(tmp_path, kind='classwise', num_classes=4):
  model_cfg = ml_collections.ConfigDict({'name': 'resnet_tiny', 'stem': 'cifar',
                                         'dtype': 'float32'})
  model = models.create_model('resnet_tiny', num_classes)
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
  mean, std = [0.3], [0.35]
  manifest = artifacts.save_model(tmp_path / 'teacher', model_config=model_cfg,
                                  variables=variables,
                                  class_names=[f'c{i}' for i in range(num_classes)],
                                  image_shape=(8, 8, 1), mean=mean, std=std)
  layers = stats.layer_order(model, variables, (8, 8, 1))
  if kind == 'global':
    statistics, counts = artifacts.global_statistics(variables), np.zeros(num_classes)
  else:
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (64, 8, 8, 1)).astype(np.uint8)
    labels = (np.arange(64) % num_classes).astype(np.int32)
    statistics, counts = stats.classwise_statistics(
        model, variables, [input_pipeline.Partition(0, images, labels)], 64, 1, num_classes,
        mean, std, batch_size=16)
  artifacts.save_statistics(tmp_path / 'stats', kind=kind, statistics=statistics,
                      class_counts=counts, teacher_manifest=manifest, layers=layers)
  return tmp_path / 'teacher', tmp_path / 'stats'


def synth_config(**kw):
  cfg = config_lib.default_config().synthesis
  cfg.update(dict(images_per_class=4, batch_size=16, iterations=6, log_every_iterations=3,
                  checkpoint_every_iterations=0))
  cfg.update(kw)
  return cfg


def make_stepper(inputs, cfg, n_steps, batch_index=0):
  """(initial state of the batch, step(state, lowres=False) -> (state, terms))."""
  problem = inputs.problem
  mesh = parallel.make_mesh()
  tx = synthesis.create_optimizer(cfg, n_steps)
  init_fn, sharding = synthesis.make_init(problem, tx, mesh, cfg.batch_size, seed=0)
  steps = {lowres: synthesis.make_step(problem, cfg, tx, mesh, sharding, seed=0, lowres=lowres)
           for lowres in (False, True)}
  labels = parallel.to_global(mesh, synthesis.target_labels(cfg.batch_size, problem.num_classes))
  rep = lambda t: parallel.replicate(mesh, t)
  student_vars = None if inputs.student_vars is None else rep(inputs.student_vars)
  args = (labels, np.int32(batch_index), rep(inputs.teacher_vars), rep(inputs.targets),
          student_vars)
  return init_fn(np.int32(batch_index)), lambda state, lowres=False: steps[lowres](state, *args)


def run_steps(inputs, cfg, n_steps, batch_index=0):
  state, step = make_stepper(inputs, cfg, n_steps, batch_index)
  for _ in range(n_steps):
    state, terms = step(state)
  return np.asarray(state.x), {k: float(v) for k, v in terms.items()}


def assert_eight_devices_equal_one(run, inputs, cfg):
  """run(inputs, cfg, steps) -> (images, loss terms): the same on 8 devices as on 1."""
  with parallel.restrict_devices(1):
    x1, t1 = run(inputs, cfg, 4)
  x8, t8 = run(inputs, cfg, 4)
  np.testing.assert_allclose(x8, x1, rtol=1e-4, atol=1e-4)
  for k in t1:
    np.testing.assert_allclose(t8[k], t1[k], rtol=1e-4, atol=1e-5)
  assert t8['bn'] > 0


@pytest.mark.versions
@pytest.mark.parametrize('kind', ['global', 'classwise'])
def test_eight_device_step_equals_one_device(tmp_path, kind):
  teacher_dir, stats_dir = make_artifacts(tmp_path, kind)
  cfg = synth_config()
  assert_eight_devices_equal_one(run_steps, synthesis.load_inputs(cfg, teacher_dir, stats_dir),
                                 cfg)


def test_multires_warmup_iterates_are_never_the_kept_best(tmp_path):
  """keep_best compares full-resolution losses only: after low-resolution steps the best is
  still the initial placeholder (loss inf); the first full-resolution step replaces it."""
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'classwise')
  cfg = synth_config(multires_iterations=3, iterations=2)
  state, step = make_stepper(synthesis.load_inputs(cfg, teacher_dir, stats_dir), cfg, 5)
  x0 = np.asarray(state.x)
  for _ in range(3):
    state, terms = step(state, lowres=True)
  assert np.isfinite(terms['loss']) and float(state.best_loss) == np.inf
  np.testing.assert_array_equal(np.asarray(state.best_x), x0)
  x_before = np.asarray(state.x)
  state, terms = step(state)
  assert float(state.best_loss) == float(terms['loss'])
  np.testing.assert_array_equal(np.asarray(state.best_x), x_before)


@pytest.mark.versions
def test_diversity_term_is_the_mean_same_class_cosine_and_shards_like_one_device(tmp_path):
  f = jnp.asarray([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
  # Pairs of one class: (0, 1) cos 1 and (2, 3) cos 1/sqrt(2); other pairs do not count.
  got = float(synthesis.feature_similarity(f, jnp.asarray([0, 0, 1, 1])))
  np.testing.assert_allclose(got, (1.0 + 2 ** -0.5) / 2, rtol=1e-6)
  assert float(synthesis.feature_similarity(f, jnp.asarray([0, 1, 2, 3]))) == 0.0
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'classwise')
  cfg = synth_config(diversity_weight=1.0)
  inputs = synthesis.load_inputs(cfg, teacher_dir, stats_dir)
  with parallel.restrict_devices(1):
    x1, t1 = run_steps(inputs, cfg, 3)
  x8, t8 = run_steps(inputs, cfg, 3)
  np.testing.assert_allclose(x8, x1, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(t8['diversity'], t1['diversity'], rtol=1e-4, atol=1e-5)
  assert -1.0 <= t8['diversity'] <= 1.0
  # The term steers the images: without it they end elsewhere.
  x0, t0 = run_steps(inputs, synth_config(), 3)
  assert 'diversity' not in t0 and not np.allclose(x0, x8, atol=1e-4)


@pytest.mark.versions
def test_per_device_scope(tmp_path):
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'global')
  inputs = synthesis.load_inputs(synth_config(), teacher_dir, stats_dir)
  # On one device, per-device matching is global matching.
  with parallel.restrict_devices(1):
    x_global, _ = run_steps(inputs, synth_config(), 3)
    x_local, _ = run_steps(inputs, synth_config(stats_scope='per_device'), 3)
  np.testing.assert_allclose(x_local, x_global, rtol=1e-5, atol=1e-5)
  # On 8 devices each matches its own slice: a different objective, still finite.
  x8, terms = run_steps(inputs, synth_config(stats_scope='per_device'), 3)
  assert np.all(np.isfinite(x8)) and not np.allclose(x8, x_global, atol=1e-3)


@pytest.mark.versions
def test_generate_writes_a_loadable_dataset_and_exports_png(tmp_path):
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'classwise')
  cfg = synth_config(multires_iterations=2, iterations=4)
  inputs = synthesis.load_inputs(cfg, teacher_dir, stats_dir)
  summary = synthesis.generate(inputs, cfg, tmp_path / 'synthetic', seed=0)
  assert summary['num_images'] == 16 and summary['iterations'] == 6
  assert summary['bn_loss_final'] < summary['bn_loss_initial']
  ds = synthetic_data.load_synthetic(tmp_path / 'synthetic')
  assert ds.images.shape == (16, 8, 8, 1) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(ds.labels), [4, 4, 4, 4])
  np.testing.assert_allclose(ds.soft_labels.sum(-1), 1.0, rtol=1e-5)
  assert (tmp_path / 'synthetic' / 'samples.png').exists()
  n = synthetic_data.export_image_folder(tmp_path / 'synthetic', tmp_path / 'png')
  assert n == 16
  cfg_data = config_lib.default_config().data
  cfg_data.update(source='imagefolder', root=str(tmp_path / 'png'), test_split='train')
  [part] = sources.create_source(cfg_data).load('train', [0], 1)
  key = lambda imgs, labs: sorted((x.tobytes(), int(y)) for x, y in zip(imgs, labs))
  assert key(part.images, part.labels) == key(ds.images, ds.labels)   # lossless
  with pytest.raises(UserError, match='exists already'):
    synthetic_data.export_image_folder(tmp_path / 'synthetic', tmp_path / 'png')


def test_non_finite_loss_names_the_batch_and_writes_nothing(tmp_path):
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'global')
  cfg = synth_config()
  inputs = synthesis.load_inputs(cfg, teacher_dir, stats_dir)
  first = next(iter(inputs.targets['var']))
  inputs.targets['var'][first] = inputs.targets['var'][first] * np.nan
  with pytest.raises(UserError, match='batch 0'):
    synthesis.generate(inputs, cfg, tmp_path / 'synthetic', seed=0)
  assert not list((tmp_path / 'synthetic').glob('shards/*.npz'))
  assert not (tmp_path / 'synthetic' / 'manifest.json').exists()


def test_altered_shard_is_refused(tmp_path):
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'global')
  cfg = synth_config(iterations=2)
  synthesis.generate(synthesis.load_inputs(cfg, teacher_dir, stats_dir), cfg,
                     tmp_path / 'synthetic', seed=0)
  shard = synthetic_data.shard_path(tmp_path / 'synthetic', 0)
  data = bytearray(shard.read_bytes())
  data[-100] ^= 0xFF
  shard.write_bytes(bytes(data))
  with pytest.raises(UserError, match='altered'):
    synthetic_data.load_synthetic(tmp_path / 'synthetic')


def test_per_view_soft_labels_are_the_teachers_labels_of_the_replayed_views(tmp_path):
  from bnsynth_jax import train
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'global')
  cfg = synth_config(iterations=2, view_epochs=3, view_crop_padding=1, view_flip=True,
                     soft_label_temperature=2.0)
  inputs = synthesis.load_inputs(cfg, teacher_dir, stats_dir)
  synthesis.generate(inputs, cfg, tmp_path / 'synthetic', seed=5)
  ds = synthetic_data.load_synthetic(tmp_path / 'synthetic')
  views = ds.manifest['views']
  assert ds.view_soft_labels.shape == (16, 3, 4) and views['epochs'] == 3
  # What the student step does for epoch 2 on images 3, 7, 11 (any batch composition):
  idx = np.array([3, 7, 11], np.int32)
  x = augment.view_crop_flip(jax.random.key(views['seed']), 2, idx,
                           ds.images[idx].astype(np.float32) / 255.0, 1, True)
  problem = inputs.problem
  logits = problem.eval_model.apply(inputs.teacher_vars,
                                    (x - np.asarray(problem.mean)) / np.asarray(problem.std))
  want = jax.nn.softmax(logits / 2.0)
  np.testing.assert_allclose(ds.view_soft_labels[idx, 2].astype(np.float32), want, atol=2e-3)
  # Views differ between epochs (different crops), and are not the plain soft labels.
  assert not np.allclose(ds.view_soft_labels[:, 0], ds.view_soft_labels[:, 1], atol=1e-3)


def test_student_trains_on_per_view_labels_and_refuses_mismatched_views(tmp_path):
  from bnsynth_jax import student, train
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'global')
  cfg = synth_config(iterations=2, view_epochs=2, view_crop_padding=1, view_flip=False)
  synthesis.generate(synthesis.load_inputs(cfg, teacher_dir, stats_dir), cfg,
                     tmp_path / 'synthetic', seed=0)
  ds = synthetic_data.load_synthetic(tmp_path / 'synthetic')
  recipe = config_lib.train_config(batch_size=8, epochs=4, crop_padding=1, flip=False,
                                   eval_every_epochs=0, log_every_steps=1,
                                   checkpoint_every_steps=100)
  views = student.check_views(recipe, ds.manifest)
  parts = student.synthetic_partitions(ds, 1, [0], with_views=True)
  batches = input_pipeline.PartitionedBatches(parts, 1, len(ds), 8, seed=0)
  variables, summary = train.fit(
      name='student', model=models.create_model('resnet_tiny', 4), cfg=recipe, batches=batches,
      image_shape=(8, 8, 1), num_classes=4, mean=[0.3], std=[0.35], workdir=tmp_path / 's',
      seed=0, labels='views', soft_temperature=1.0,
      views={'key': jax.random.key(views['seed']), 'epochs': views['epochs']})
  assert summary['steps'] == 8 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
  wrong = recipe.copy_and_resolve_references()
  wrong.update({'crop_padding': 4})
  with pytest.raises(UserError, match='differ from the views'):
    student.check_views(wrong, ds.manifest)
  mixed = recipe.copy_and_resolve_references()
  mixed.update({'cutmix_alpha': 1.0})   # mixed views: lambda-mix of the two views' labels
  assert student.check_views(mixed, ds.manifest) == views
  no_views = dict(ds.manifest, views=None)
  with pytest.raises(UserError, match='view_epochs'):
    student.check_views(recipe, no_views)


@pytest.mark.versions
def test_bfloat16_synthesis_keeps_float32_images_and_tracks_float32(tmp_path):
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'classwise')
  f32 = synthesis.load_inputs(synth_config(), teacher_dir, stats_dir)
  bf16 = synthesis.load_inputs(synth_config(dtype='bfloat16'), teacher_dir, stats_dir)
  with parallel.restrict_devices(1):
    x32, t32 = run_steps(f32, synth_config(), 1)
    x16, t16 = run_steps(bf16, synth_config(dtype='bfloat16'), 1)
  assert x16.dtype == np.float32
  np.testing.assert_allclose(t16['bn'], t32['bn'], rtol=0.05)
  np.testing.assert_allclose(t16['ce'], t32['ce'], rtol=0.05)


def test_adi_competition_term_against_a_student(tmp_path):
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'classwise')
  with pytest.raises(UserError, match='adi_student'):
    synthesis.load_inputs(synth_config(adi_weight=1.0), teacher_dir, stats_dir)
  # The teacher as its own competitor: JS = 0, so the term is exactly 1 - 0.
  same = synth_config(adi_weight=1.0, adi_student=str(teacher_dir))
  _, terms = run_steps(synthesis.load_inputs(same, teacher_dir, stats_dir), same, 1)
  np.testing.assert_allclose(terms['adi'], 1.0, atol=1e-6)
  # A different network disagrees somewhere: the term drops below 1 and changes the images.
  other = tmp_path / 'other'
  model = models.create_model('resnet_tiny', 4)
  artifacts.save_model(other, model_config=ml_collections.ConfigDict(
      {'name': 'resnet_tiny', 'stem': 'cifar', 'dtype': 'float32'}),
      variables=models.init_variables(model, jax.random.key(7), (8, 8, 1)),
      class_names=[f'c{i}' for i in range(4)], image_shape=(8, 8, 1), mean=[0.3], std=[0.35])
  adi = synth_config(adi_weight=1.0, adi_student=str(other))
  x_adi, terms = run_steps(synthesis.load_inputs(adi, teacher_dir, stats_dir), adi, 2)
  x_plain, _ = run_steps(synthesis.load_inputs(synth_config(), teacher_dir, stats_dir),
                         synth_config(), 2)
  assert 0.0 <= terms['adi'] < 1.0 and np.all(np.isfinite(x_adi))
  assert not np.allclose(x_adi, x_plain)
