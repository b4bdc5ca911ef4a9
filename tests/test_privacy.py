"""DP mode (bnsynth_jax/privacy/): the statistics mechanism, accounting, DP-SGD."""


import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnsynth_jax import config_lib, models, privacy, train
from bnsynth_jax.errors import UserError
from conftest import run_main


def dp_config(**privacy_overrides):
  from bnsynth_jax.configs import digits
  c = digits.get_config()
  c.model.norm = 'group'
  c.privacy.epsilon = 8.0
  c.teacher.batch_size = 64
  c.teacher.num_steps = 20
  c.privacy.update(privacy_overrides)
  return c


# ----------------------------------------------------------------------------
# The statistics mechanism


@pytest.mark.versions
@pytest.mark.parametrize('same_class', [True, False])
def test_one_changed_example_moves_the_clipped_sums_by_at_most_the_sensitivity(same_class):
  rng = np.random.default_rng(0)
  num_classes, clip = 4, 3.0
  vectors = rng.normal(0, 5, (40, 17)).astype(np.float32)     # most norms far above clip
  labels = rng.integers(0, num_classes, 40)
  mask = np.ones(40, np.float32)
  base, _ = privacy.clipped_class_sums(jnp.asarray(vectors), jnp.asarray(labels),
                                       jnp.asarray(mask), num_classes, clip)
  worst = 0.0
  for trial in range(20):
    changed_v, changed_y = vectors.copy(), labels.copy()
    i = trial % 40
    changed_v[i] = rng.normal(0, 50, 17) * (-1) ** trial        # an extreme replacement
    changed_y[i] = labels[i] if same_class else (labels[i] + 1 + trial % 3) % num_classes
    moved, _ = privacy.clipped_class_sums(jnp.asarray(changed_v), jnp.asarray(changed_y),
                                          jnp.asarray(mask), num_classes, clip)
    worst = max(worst, float(np.linalg.norm(np.asarray(moved) - np.asarray(base))))
  assert worst <= 2 * clip * (1 + 1e-5)          # the sensitivity the noise is scaled to
  assert worst > 1.2 * clip                       # and the bound is nearly reached


@pytest.mark.versions
def test_the_statistics_noise_is_there_and_has_the_calibrated_scale():
  rng = np.random.default_rng(1)
  sums = np.zeros((3, 2 * 5 + 1))
  sums[:, -1] = 100 * 2.0                          # 100 examples per class, count coord = R
  scales = {'layer': 1.0}
  clean, counts = privacy.noised_moments(sums, {'layer': 5}, scales, 2.0, 0.0, rng)
  assert np.allclose(counts, 100)
  draws = np.stack([privacy.noised_moments(sums, {'layer': 5}, scales, 2.0, 1.5, rng)[0]['mean']
                    ['layer'] for _ in range(400)])
  # mean = noisy sum / noisy count ~ N(0, (1.5 * 2R)^2) / 100
  assert np.all(np.abs(draws - clean['mean']['layer']).max(axis=0) > 0)
  assert np.std(draws) == pytest.approx(1.5 * 2 * 2.0 / 100, rel=0.1)


# ----------------------------------------------------------------------------
# Accounting


@pytest.mark.versions
def test_the_teacher_epsilon_matches_jax_privacy_and_dp_accounting_called_directly():
  from jax_privacy import accounting
  c = dp_config(teacher_noise_multiplier=1.3, stats_noise_multiplier=4.0)
  record = privacy.plan(c, train_size=1438)
  dp_params = accounting.DpParams(
      noise_multipliers=1.3, num_samples=1438, delta=c.privacy.delta, batch_size=64,
      sampling_method=accounting.SamplingMethod.FIXED_BATCH_SIZE)
  direct = accounting.DpsgdTrainingAccountant(accounting.PldAccountantConfig()).compute_epsilon(
      20, dp_params)
  assert record['teacher']['epsilon_alone'] == pytest.approx(direct, rel=1e-6)
  gaussian = dp_accounting.pld.PLDAccountant()
  gaussian.compose(dp_accounting.GaussianDpEvent(4.0))
  assert record['stats']['epsilon_alone'] == pytest.approx(gaussian.get_epsilon(c.privacy.delta),
                                                           rel=1e-6)
  both = max(record['teacher']['epsilon_alone'], record['stats']['epsilon_alone'])
  assert both < record['epsilon'] <= (record['teacher']['epsilon_alone']
                                      + record['stats']['epsilon_alone'])


def test_calibration_meets_the_budget_and_spends_most_of_it():
  record = privacy.plan(dp_config(epsilon=3.0), train_size=1438)
  assert 0.8 * 3.0 < record['epsilon'] <= 3.0
  assert record['teacher']['noise_multiplier'] > 0.5 and record['stats']['noise_multiplier'] > 0


def test_a_plan_over_budget_or_impossible_is_refused():
  with pytest.raises(UserError, match='spends epsilon'):
    privacy.plan(dp_config(epsilon=1.0, teacher_noise_multiplier=0.6,
                           stats_noise_multiplier=10.0), train_size=1438)
  c = dp_config(epsilon=1e-4)
  c.teacher.num_steps = 20         # already needs a noise multiplier above 500
  with pytest.raises(UserError, match='noise multiplier above'):
    privacy.plan(c, train_size=1438)


@pytest.mark.parametrize('change,needle', [
    ({'model.norm': 'batch'}, 'model.norm=group'),
    ({'privacy.delta': 0.0}, 'privacy.delta'),
    ({'privacy.teacher_fraction': 1.0}, 'teacher_fraction'),
    ({'privacy.teacher_fraction': 0.0}, 'teacher_fraction_by_epsilon, which is empty'),
    ({'privacy.teacher_fraction': 0.0, 'privacy.teacher_fraction_by_epsilon': '1:0.7,8'},
     "'8' is not EPSILON:FRACTION"),
    ({'privacy.teacher_fraction': 0.0, 'privacy.teacher_fraction_by_epsilon': '1:0.7,8:1.5'},
     "'8:1.5' is not EPSILON:FRACTION"),
    ({'privacy.teacher_fraction': 0.0, 'privacy.teacher_fraction_by_epsilon': '8:0.3,8:0.5'},
     "'8:0.5' is not EPSILON:FRACTION with a new epsilon"),
    ({'privacy.teacher_fraction': 0.0, 'privacy.teacher_fraction_by_epsilon': 'nan:0.5'},
     "'nan:0.5' is not")])
def test_dp_mode_refuses_settings_it_cannot_guarantee(change, needle):
  c = dp_config()
  for key, value in change.items():
    section, field = key.split('.')
    c[section][field] = value
  with pytest.raises(UserError, match=needle):
    privacy.validate(c)


@pytest.mark.parametrize('epsilon,fraction', [(0.5, 0.7), (1.0, 0.7), (3.0, 0.7), (8.0, 0.3),
                                              (20.0, 0.3)])
def test_a_zero_teacher_fraction_is_read_by_epsilon(epsilon, fraction):
  c = dp_config(epsilon=epsilon, teacher_fraction=0.0, teacher_fraction_by_epsilon='8:0.3, 1:0.7')
  assert privacy.teacher_fraction(c.privacy) == fraction


def test_the_fraction_read_by_epsilon_is_the_one_calibrated_and_recorded(monkeypatch):
  asked = []

  def calibrate(make_event, target_epsilon, delta, what):   # records the part asked for
    asked.append(target_epsilon)
    return 20.0

  monkeypatch.setattr(privacy, '_calibrate', calibrate)
  monkeypatch.setattr(privacy, '_calibrate_rest', lambda teacher, target, delta, upper: upper)
  c = dp_config(teacher_fraction=0.0, teacher_fraction_by_epsilon='1:0.7,8:0.3')
  c.teacher.num_steps = 2
  record = privacy.plan(c, train_size=1438)
  assert asked == [pytest.approx(8.0 * 0.3), pytest.approx(8.0 * 0.7)]   # teacher, statistics
  assert record['teacher_fraction'] == 0.3
  assert record['teacher_fraction_from'] == (
      "privacy.teacher_fraction_by_epsilon='1:0.7,8:0.3', entry 8")
  c.privacy.teacher_fraction = 0.3
  assert 'teacher_fraction_from' not in privacy.plan(c, train_size=1438)


@pytest.mark.parametrize('epsilon,fraction', [(1.0, 0.7), (3.0, 0.7), (8.0, 0.3)])
def test_the_digits_dp_default_reads_the_heads_share_by_epsilon(epsilon, fraction):
  from bnsynth_jax.configs import digits_dp
  c = digits_dp.get_config()
  c.privacy.epsilon = epsilon
  privacy.validate(c)
  assert privacy.teacher_fraction(c.privacy) == fraction


@pytest.mark.parametrize('epsilon,resumes', [(1.0, True), (8.0, False)])
def test_a_workdir_made_with_the_fraction_given_resumes_where_the_table_gives_it(epsilon,
                                                                                 resumes):
  """A stage records the fraction used, not how it was chosen: a digits_dp workdir from
  before the table (teacher_fraction 0.7 given) resumes at epsilon 1, where the table gives
  0.7, and is a different run at epsilon 8 (0.3)."""
  from bnsynth_jax import pipeline
  from bnsynth_jax.configs import digits_dp
  old, new = digits_dp.get_config(), digits_dp.get_config()
  old.privacy.teacher_fraction, old.privacy.teacher_fraction_by_epsilon = 0.7, ''
  for c in (old, new):
    c.privacy.epsilon = epsilon
  differences = pipeline._config_differences(pipeline.stage_config(old, 'teacher'),
                                             pipeline.stage_config(new, 'teacher'))
  assert differences == ([] if resumes else ['privacy.teacher_fraction'])


def test_an_impossible_budget_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'w'
  result = run_main('--config=configs/digits.py', f'--workdir={workdir}',
                    '--config.model.norm=group', '--config.privacy.epsilon=0.0001',
                    '--config.teacher.num_steps=20')
  assert result.returncode == 2
  assert 'error: privacy: epsilon' in result.stderr and 'raise privacy.epsilon' in result.stderr
  assert not workdir.exists()


# ----------------------------------------------------------------------------
# DP-SGD


def dp_recipe():
  return config_lib.train_config(batch_size=8, crop_padding=0, flip=False, learning_rate=1.0,
                                 momentum=0.0, nesterov=False, weight_decay=0.0)


def _dp_step_on(devices, clip, noise_multiplier):
  from bnsynth_jax import parallel
  model = models.create_model('resnet_tiny', 3, norm='group')
  cfg = dp_recipe()
  rng = np.random.default_rng(0)
  batch = {'images': rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
           'labels': rng.integers(0, 3, 8).astype(np.int32)}
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  dp = {'clip_norm': clip, 'noise_multiplier': noise_multiplier, 'augmult': 2,
        'noise_key': jax.random.PRNGKey(0)}
  state = train.create_train_state(jax.random.key(0), model, (8, 8, 3),
                                   train.dp_optimizer(cfg, optax.constant_schedule(1.0), dp),
                                   mesh)
  step = jax.jit(lambda s, b: train.dp_train_step(
      s, b, 0, base_key=jax.random.key(1), cfg=cfg, mean=(0.5,), std=(0.5,), num_classes=3,
      clip_norm=clip, augmult=2),
      in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
      out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))
  new, metrics = step(state, parallel.to_global(mesh, batch))
  # No augmentation in this recipe: the step's accuracy is that of the model it started from
  # on the batch as it is.
  logits = model.apply({'params': state.params}, (batch['images'] / 255.0 - 0.5) / 0.5,
                       train=False)
  expected = float(np.mean(np.argmax(np.asarray(logits), -1) == batch['labels']))
  assert float(metrics['accuracy']) == pytest.approx(expected), (metrics, expected)
  return jax.tree.map(lambda a, b: np.asarray(a - b), new.params, state.params), metrics


@pytest.mark.versions
def test_the_dp_step_clips_each_example_and_8_devices_match_1():
  clip = 1e-3
  delta, metrics = _dp_step_on(jax.devices()[:1], clip, 0.0)
  norm = float(np.sqrt(sum(np.sum(d ** 2) for d in jax.tree.leaves(delta))))
  # Without noise the update is lr x the mean of 8 gradients clipped to 1e-3 (unclipped
  # gradients of a fresh network are far larger than that).
  assert clip / 8 < norm <= clip * (1 + 1e-4)
  assert np.isfinite(float(metrics['loss']))
  # The batch sharded over 8 devices: the same clipped sum (the noise comes from the
  # replicated optimizer state, the same on every device).
  eight, _ = _dp_step_on(jax.devices(), clip, 0.0)
  for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(eight)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


@pytest.mark.versions
def test_the_dp_optimizer_adds_noise_of_the_calibrated_scale():
  cfg = dp_recipe()
  dp = {'clip_norm': 2.0, 'noise_multiplier': 3.0, 'augmult': 1,
        'noise_key': jax.random.PRNGKey(7)}
  tx = train.dp_optimizer(cfg, optax.constant_schedule(1.0), dp)
  params = {'w': jnp.zeros((200, 50))}
  state = tx.init(params)
  updates, state = tx.update({'w': jnp.zeros((200, 50))}, state, params)   # zero gradients
  # noise std sigma x C on the sum, then the mean over the batch of 8, then SGD with lr 1
  assert float(jnp.std(updates['w'])) == pytest.approx(3.0 * 2.0 / 8, rel=0.05)
  again, _ = tx.update({'w': jnp.zeros((200, 50))}, state, params)
  assert not np.allclose(updates['w'], again['w'])                 # fresh noise every step


def test_sampled_batches_are_fixed_size_uniform_and_reproducible():
  from bnsynth_jax.input_pipeline import Partition
  parts = [Partition(0, np.zeros((100, 2, 2, 1), np.uint8), np.arange(100, dtype=np.int32))]
  batches = privacy.WholeSplitBatches(parts, 100, 10, seed=5)
  first = [batches.get(s)['labels'] for s in range(2000)]
  assert all(len(set(b.tolist())) == 10 for b in first)          # without replacement
  counts = np.bincount(np.concatenate(first), minlength=100)
  assert counts.min() > 120 and counts.max() < 290               # each example ~ 200 times
  again = privacy.WholeSplitBatches(parts, 100, 10, seed=5)
  assert np.array_equal(again.get(1234)['labels'], first[1234])  # resume sees the same batch


# ----------------------------------------------------------------------------
# The GroupNorm teacher


@pytest.mark.versions
def test_a_groupnorm_model_treats_each_example_on_its_own():
  """What makes per-example gradients meaningful: in training mode, changing one example
  changes no other example's output (BatchNorm would)."""
  model = models.create_model('resnet_tiny', 3, norm='group')
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  assert variables['batch_stats'] == {}
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  y = x.at[2].set(10.0)
  a = np.asarray(model.apply({'params': variables['params']}, x, train=True))
  b = np.asarray(model.apply({'params': variables['params']}, y, train=True))
  np.testing.assert_allclose(a[[0, 1, 3]], b[[0, 1, 3]], rtol=1e-5, atol=1e-6)
  _, captured = models.capture_bn_inputs(model, variables, x)
  assert len(captured) == 9 and all(p[-1] == 'norm' for p in captured)   # every GroupNorm


def test_dp_statistics_without_clipping_or_noise_are_the_exact_classwise_moments():
  from bnsynth_jax import input_pipeline, stats
  model = models.create_model('resnet_tiny', 3, norm='group')
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  rng = np.random.RandomState(0)
  n = 45
  images = rng.randint(0, 256, (n, 8, 8, 3)).astype(np.uint8)
  labels = (np.arange(n) % 3).astype(np.int32)
  parts = [input_pipeline.Partition(0, images, labels)]
  exact, counts = stats.classwise_statistics(model, variables, parts, n, 1, 3, [0.5] * 3,
                                             [0.5] * 3, batch_size=16)
  got, noised_counts, applied = stats.dp_classwise_statistics(
      model, variables, parts, n, 1, 3, [0.5] * 3, [0.5] * 3, 16, clip_norm=1e6,
      noise_multiplier=0.0, rng=np.random.default_rng(0))
  np.testing.assert_allclose(noised_counts, counts)
  assert applied['sensitivity'] == 2e6
  # stats.kind=global in DP mode: the same mechanism with one row for the whole split.
  pooled, pooled_counts, _ = stats.dp_classwise_statistics(
      model, variables, stats._one_class(parts), n, 1, 1, [0.5] * 3, [0.5] * 3, 16,
      clip_norm=1e6, noise_multiplier=0.0, rng=np.random.default_rng(0))
  pooled = stats._pooled(pooled)
  np.testing.assert_allclose(pooled_counts, [n])
  for name in exact['mean']:      # the count-weighted average of the class-wise means
    np.testing.assert_allclose(pooled['mean'][name], counts @ exact['mean'][name] / n,
                               rtol=1e-4, atol=1e-5)
  scales = privacy.public_scales(model, variables, (8, 8, 3))
  for name in exact['mean']:
    np.testing.assert_allclose(got['mean'][name], exact['mean'][name], rtol=1e-4, atol=1e-5)
    floor = privacy.VAR_FLOOR * scales[name] ** 2       # the floor a noised variance gets
    np.testing.assert_allclose(got['var'][name], np.maximum(exact['var'][name], floor),
                               rtol=2e-3, atol=1e-4)
