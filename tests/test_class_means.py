"""The DP class-means head (bnsynth_jax/privacy/class_means.py)."""

import json

import dp_accounting
import jax
import numpy as np
import pytest

from bnsynth_jax import privacy
from bnsynth_jax.errors import UserError
from bnsynth_jax.privacy import class_means, prior
from conftest import run_main
from test_prior import dp_config, save_prior


def test_the_head_is_the_cosine_classifier_of_the_class_sums():
  """The linear head (kernel, bias) ranks classes exactly as the cosine between a feature's
  projection P'(f - mu) and each class's sum."""
  rng = np.random.default_rng(0)
  d, k, c = 12, 5, 4
  basis, _ = np.linalg.qr(rng.normal(size=(d, k)))
  projection = {'mean': rng.normal(size=d), 'basis': basis, 'radius': 2.0}
  sums = rng.normal(size=(c, k)) * rng.uniform(1, 50, (c, 1))   # sums of different sizes
  head = class_means.head_params(sums, projection, scale=10.0)
  f = rng.normal(size=(200, d))
  logits = f @ head['kernel'] + head['bias']
  z = (f - projection['mean']) @ basis
  cosine = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (
      sums / np.linalg.norm(sums, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(np.argmax(logits, 1), np.argmax(cosine, 1))
  # logits = scale / radius * |z| * cosine: the class sums' sizes (their counts) do not matter
  np.testing.assert_allclose(logits, 5.0 * np.linalg.norm(z, axis=1, keepdims=True) * cosine,
                             rtol=1e-4, atol=1e-4)


def test_replacing_one_example_moves_the_class_sums_by_at_most_the_sensitivity(tmp_path):
  """The mechanism's replace-one sensitivity (2) on real features of a prior: one image
  swapped for another of another class."""
  from bnsynth_jax import artifacts
  from bnsynth_jax.input_pipeline import Partition
  save_prior(tmp_path / 'prior')
  model, variables, _ = artifacts.load_model(tmp_path / 'prior')
  features = class_means._features_fn(model, (0.5,), (0.5,))
  projection = class_means.public_projection(features, variables, (8, 8, 1), 3, num_probe=64)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
  labels = rng.integers(0, 4, 40).astype(np.int32)

  def sums(imgs, labs):
    return class_means.class_unit_sums(features, variables, [Partition(0, imgs, labs)], 40, 1,
                                       4, projection, batch_size=16)

  before = sums(images, labels)
  assert np.linalg.norm(before, axis=1).sum() <= 40 + 1e-4     # 40 unit vectors at most
  other_images, other_labels = images.copy(), labels.copy()
  other_images[7] = 255 - images[7]
  other_labels[7] = (labels[7] + 1) % 4
  change = np.linalg.norm(sums(other_images, other_labels) - before)
  assert 0 < change <= class_means.SENSITIVITY + 1e-5


def test_the_budget_is_one_gaussian_mechanism_composed_with_the_statistics(tmp_path):
  save_prior(tmp_path / 'prior')
  c = dp_config(tmp_path / 'prior', head='class_means', epsilon=1.0)
  record = privacy.plan(c, 1000)
  sigma = record['teacher']['noise_multiplier']
  assert record['teacher']['sensitivity'] == 2.0 and 'steps' not in record['teacher']
  assert record['teacher']['epsilon_alone'] == pytest.approx(
      privacy.epsilon_of([dp_accounting.GaussianDpEvent(sigma)], c.privacy.delta))
  assert record['epsilon'] == pytest.approx(privacy.epsilon_of(
      [privacy.class_means_event(sigma), privacy.stats_event(record['stats']['noise_multiplier'])],
      c.privacy.delta))
  assert record['epsilon'] <= 1.0 * (1 + 1e-6)
  # It needs a prior, and its settings are checked before anything runs.
  for bad, message in (({'prior': ''}, 'set --config.privacy.prior'),
                       ({'head_dims': 0}, 'head_dims'), ({'head': 'lda'}, 'privacy.head')):
    with pytest.raises(UserError, match=message):
      privacy.validate(dp_config(tmp_path / 'prior', **{'head': 'class_means', **bad}))


def test_a_class_means_teacher_is_released_with_its_record_and_no_training_state(tmp_path):
  save_prior(tmp_path / 'prior', classes=('a', 'b', 'c', 'd'))
  workdir = tmp_path / 'w'
  result = run_main(
      '--config=configs/digits.py', '--config.model.norm=group',
      '--config.model.name=resnet_tiny', '--config.privacy.epsilon=8',
      f'--config.privacy.prior={tmp_path / "prior"}', '--config.privacy.prior_is_public=True',
      '--config.privacy.head=class_means', '--config.privacy.head_dims=3',
      f'--workdir={workdir}', '--stages=teacher,stats')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'teacher test accuracy' in result.stdout
  manifest = json.loads((workdir / 'teacher' / 'manifest.json').read_text())
  assert manifest['head'] == 'class_means' and manifest['head_dims'] == 3
  record = manifest['privacy']
  assert record['teacher']['mechanism'].startswith('Gaussian on per-class sums')
  assert record['prior']['variables_sha256'] == prior.weights_sha256(tmp_path / 'prior')
  assert 'test_accuracy' not in manifest                  # the owner's, not the release's
  assert sorted(p.name for p in (workdir / 'teacher').iterdir()) == [
      'manifest.json', 'stage_config.json', 'variables.msgpack']
  ledger = json.loads((workdir / 'privacy_ledger.json').read_text())
  assert [r['mechanism']['kind'] for r in ledger['releases']] == ['gaussian', 'gaussian']
  assert ledger['cumulative']['epsilon'] == pytest.approx(record['epsilon'], rel=1e-6)


def test_a_data_free_model_takes_a_class_means_head_without_a_prior(tmp_path):
  """scatternet_linear*: the features are the fixed scattering under GroupNorm at its
  initial values, public by construction, so no prior is needed; the manifest says so and
  the model's features are those of a fresh model, only the head fitted."""
  from bnsynth_jax import artifacts, models
  from bnsynth_jax import teacher as teacher_stage
  workdir = tmp_path / 'w'
  result = run_main(
      '--config=configs/digits.py', '--config.model.norm=group', '--config.data.image_size=8',
      '--config.model.name=scatternet_linear', '--config.privacy.epsilon=8',
      '--config.privacy.head=class_means', '--config.privacy.head_dims=4',
      f'--workdir={workdir}', '--stages=teacher')
  assert result.returncode == 0, result.stderr[-3000:]
  manifest = json.loads((workdir / 'teacher' / 'manifest.json').read_text())
  assert manifest['head'] == 'class_means'
  assert manifest['privacy']['features'] == teacher_stage.DATA_FREE_FEATURES
  assert 'prior' not in manifest['privacy']
  model, variables, _ = artifacts.load_model(workdir / 'teacher')
  fresh = models.init_variables(model, jax.random.key(0), (8, 8, 1))
  assert set(variables['params']) == set(fresh['params'])
  for name in set(fresh['params']) - {'head'}:
    for a, b in zip(*(jax.tree.leaves(v['params'][name]) for v in (variables, fresh))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A model with trained features still needs a prior.
  with pytest.raises(UserError, match='data-free model'):
    privacy.validate(dp_config('', head='class_means'))
