import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnsynth_jax import artifacts, input_pipeline, models, stats
from bnsynth_jax.errors import UserError


def random_teacher(num_classes=3, shape=(8, 8, 3), seed=0):
  model = models.create_model('resnet_tiny', num_classes)
  variables = models.init_variables(model, jax.random.key(seed), shape)
  # Non-trivial running statistics, as a trained teacher has.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.3 if 'mean' in jax.tree_util.keystr(p) else v * 1.5, variables)
  return model, variables


@pytest.mark.versions
def test_classwise_statistics_equal_numpy():
  model, variables = random_teacher()
  rng = np.random.RandomState(0)
  n = 77                                   # not a multiple of the batch: padding is exercised
  images = rng.randint(0, 256, (n, 8, 8, 3)).astype(np.uint8)
  labels = rng.randint(0, 3, n).astype(np.int32)
  mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
  parts = [input_pipeline.Partition(p, images[idx], labels[idx])
           for p in range(2) for idx in [input_pipeline.partition_members(n, 2, p)]]
  got, counts = stats.classwise_statistics(model, variables, parts, n, 2, 3, mean, std,
                                           batch_size=16)    # 8 devices, 2 per device
  np.testing.assert_array_equal(counts, np.bincount(labels, minlength=3))
  x = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
  _, captured = models.capture_bn_inputs(model, variables, jnp.asarray(x, jnp.float32))
  for path, a in captured.items():
    a = np.asarray(a, np.float64)
    name = '/'.join(path)
    for c in range(3):
      ac = a[labels == c].reshape(-1, a.shape[-1])
      np.testing.assert_allclose(got['mean'][name][c], ac.mean(0), rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(got['var'][name][c], ac.var(0), rtol=1e-3, atol=1e-5)


def test_pooled_global_statistics_equal_numpy_over_the_whole_split():
  model = models.create_model('resnet_tiny', 3, norm='group')     # no running statistics
  variables = models.init_variables(model, jax.random.key(1), (8, 8, 3))
  rng = np.random.RandomState(1)
  n = 37
  images = rng.randint(0, 256, (n, 8, 8, 3)).astype(np.uint8)
  parts = [input_pipeline.Partition(0, images, rng.randint(0, 3, n).astype(np.int32))]
  got, counts = stats.classwise_statistics(model, variables, stats._one_class(parts), n, 1, 1,
                                           [0.5] * 3, [0.5] * 3, batch_size=16)
  got = stats._pooled(got)
  assert counts.tolist() == [n]
  _, captured = models.capture_bn_inputs(
      model, variables, jnp.asarray((images / 255.0 - 0.5) / 0.5, jnp.float32))
  for path, a in captured.items():
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    np.testing.assert_allclose(got['mean']['/'.join(path)], a.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got['var']['/'.join(path)], a.var(0), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize('norm,epsilon,pooled', [('batch', 0.0, False), ('group', 0.0, True),
                                                 ('batch', 8.0, True)])
def test_global_statistics_are_pooled_where_there_are_no_private_running_statistics(
    norm, epsilon, pooled):
  from bnsynth_jax import config_lib
  c = config_lib.default_config()
  c.stats.kind, c.model.norm, c.privacy.epsilon = 'global', norm, epsilon
  assert stats.pooled_global(c) == pooled and stats.reads_images(c) == pooled
  c.stats.kind = 'classwise'
  assert not stats.pooled_global(c) and stats.reads_images(c)


def teacher_manifest(variables, name='resnet_tiny'):
  from bnsynth_jax import checkpointing
  return {'class_names': ['a', 'b', 'c'], 'num_classes': 3, 'image_shape': [8, 8, 3],
          'mean': [0.5] * 3, 'std': [0.25] * 3,
          'model': {'name': name, 'stem': 'cifar', 'dtype': 'float32'},
          'variables_sha256': checkpointing.variables_hash(variables)}


def test_artifact_round_trip_and_mismatches(tmp_path):
  model, variables = random_teacher()
  manifest = teacher_manifest(variables)
  layers = stats.layer_order(model, variables, (8, 8, 3))
  assert layers[0] == ('stem_bn',)
  glob = artifacts.global_statistics(variables)
  artifacts.save_statistics(tmp_path / 's', kind='global', statistics=glob, class_counts=[1, 2, 3],
                      teacher_manifest=manifest, layers=layers)
  loaded, m = artifacts.load_statistics(tmp_path / 's', manifest, variables)
  assert m['kind'] == 'global' and m['layers'][0] == 'stem_bn'
  np.testing.assert_allclose(loaded['var']['stem_bn'],
                             variables['batch_stats']['stem_bn']['var'], rtol=1e-6)

  _, other = random_teacher(seed=1)
  with pytest.raises(UserError, match='teacher sha256'):
    artifacts.load_statistics(tmp_path / 's', teacher_manifest(other), other)
  # Same hash claimed but different shapes (another architecture's statistics).
  model3, vars3 = random_teacher(num_classes=3)
  wrong = jax.tree.map(lambda v: jnp.zeros(v.shape[:-1] + (v.shape[-1] + 1,)), vars3)
  with pytest.raises(UserError, match='shape'):
    artifacts.load_statistics(tmp_path / 's', manifest, wrong)
  # An altered statistics file is refused.
  f = tmp_path / 's' / artifacts.STATS_FILE
  f.write_bytes(f.read_bytes()[:-1] + b'\x00')
  with pytest.raises(UserError, match='altered'):
    artifacts.load_statistics(tmp_path / 's', manifest, variables)
