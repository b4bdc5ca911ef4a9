import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnsynth_jax import models
from bnsynth_jax.errors import UserError


@pytest.mark.parametrize('name,stem,shape', [
    ('resnet_tiny', 'cifar', (8, 8, 1)),
    ('resnet20', 'cifar', (32, 32, 3)),
    ('resnet18', 'cifar', (32, 32, 3)),
    ('resnet18', 'imagenet', (64, 64, 3)),
    ('resnet50', 'imagenet', (64, 64, 3)),
])
def test_structure(name, stem, shape):
  model = models.create_model(name, 7, stem=stem)
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), shape))
  assert set(variables) == {'params', 'batch_stats'}
  flat = jax.tree_util.tree_flatten_with_path(variables['batch_stats'])[0]
  names = {jax.tree_util.keystr(p) for p, _ in flat}
  assert any('mean' in n for n in names) and any('var' in n for n in names)
  assert variables['params']['head']['kernel'].shape[-1] == 7
  if name == 'resnet20':   # 1 stem BN + 9 blocks x 2 BNs + 2 projection BNs
    assert len(flat) == 2 * (1 + 18 + 2)
    n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(variables['params']))
    assert 0.26e6 < n_params < 0.30e6   # He et al.: 0.27M


def test_bfloat16_keeps_float32_statistics():
  model = models.create_model('resnet_tiny', 3, dtype='bfloat16')
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out, updates = model.apply(variables, jnp.ones((4, 8, 8, 3)), train=True,
                             mutable=['batch_stats'])
  assert out.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))


def test_capture_bn_inputs_matches_batch_stats_and_running_mean():
  model = models.create_model('resnet_tiny', 3)
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  x = jax.random.normal(jax.random.key(1), (5, 8, 8, 3))
  (logits, captured) = models.capture_bn_inputs(model, variables, x)
  assert logits.shape == (5, 3)
  paths = list(captured)
  assert paths[0] == ('stem_bn',)   # forward order
  stats_paths = {tuple(k.key for k in p[:-1]) for p, _ in
                 jax.tree_util.tree_flatten_with_path(variables['batch_stats'])[0]}
  assert set(paths) == stats_paths
  # In train mode the running mean moves towards the captured input's batch mean.
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  stem_in = captured[('stem_bn',)]
  expected = 0.1 * jnp.mean(stem_in, axis=(0, 1, 2))
  np.testing.assert_allclose(updates['batch_stats']['stem_bn']['mean'], expected, rtol=1e-5,
                             atol=1e-6)


def test_unknown_model_is_a_user_error():
  with pytest.raises(UserError, match='unknown model'):
    models.create_model('resnet21', 10)
