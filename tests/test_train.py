import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnsynth_jax import augment, config_lib, input_pipeline, models, parallel, sources, train

# Sharded training and orbax resume: CI runs these on both jax ends.
pytestmark = pytest.mark.versions


def tiny_setup(num_steps=4, batch_size=32, **overrides):
  cfg = config_lib.train_config(batch_size=batch_size, num_steps=num_steps,
                                checkpoint_every_steps=2, log_every_steps=1,
                                eval_every_epochs=0, warmup_epochs=0.0, **overrides)
  data_cfg = config_lib.default_config().data
  src = sources.create_source(data_cfg)
  size = src.info().num_examples['train']
  parts = src.load('train', [0, 1], 2)
  batches = input_pipeline.PartitionedBatches(parts, 2, size, batch_size, seed=0)
  model = models.create_model('resnet_tiny', 10)
  return cfg, batches, model


def fit(tmp_path, cfg, batches, model, **kw):
  return train.fit(name='t', model=model, cfg=cfg, batches=batches, image_shape=(8, 8, 1),
                   num_classes=10, mean=[0.3], std=[0.4], workdir=tmp_path, seed=1, **kw)


def test_sharded_step_equals_single_device(tmp_path):
  cfg, batches, model = tiny_setup(num_steps=3, mixup_alpha=0.2)
  with parallel.restrict_devices(1):
    one, _ = fit(tmp_path / 'one', cfg, batches, model)
  assert parallel.make_mesh().devices.size == 8
  eight, _ = fit(tmp_path / 'eight', cfg, batches, model)
  assert len(eight['params']['head']['kernel'].sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  # ...and training did something: the state moved away from its initialisation.
  init = models.init_variables(model, jax.random.split(jax.random.key(1))[0], (8, 8, 1))
  assert not np.allclose(init['params']['head']['kernel'], eight['params']['head']['kernel'])


class Killed(Exception):
  pass


def test_interrupted_run_resumes_exactly(tmp_path):
  cfg, batches, model = tiny_setup(num_steps=6)
  cfg.eval_every_epochs = 2 / batches.steps_per_epoch   # evaluate at steps 2, 4 (and 6)
  src = sources.create_source(config_lib.default_config().data)
  test = (src.load('test', [0], 1), src.info().num_examples['test'], 1)
  straight, summary = fit(tmp_path / 'straight', cfg, batches, model, test=test)
  assert summary['steps'] == 6

  def kill_at_5(step):
    if step == 5:   # the checkpoint at step 4 exists; step 5's work is lost
      raise Killed()
  with pytest.raises(Killed):
    fit(tmp_path / 'resumed', cfg, batches, model, test=test, on_step=kill_at_5)
  from bnsynth_jax import checkpointing
  checkpointing.wait()
  resumed, resumed_summary = fit(tmp_path / 'resumed', cfg, batches, model, test=test)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The evaluation history survives the kill: steps 2 and 4 from the first run, 6 after.
  assert [h['step'] for h in summary['history']] == [2, 4, 6]
  assert resumed_summary['history'] == summary['history']


def test_params_ema_averages_the_updated_parameters():
  cfg = config_lib.train_config(optimizer='sgd', momentum=0.0, nesterov=False, weight_decay=0.0,
                                ema_decay=0.5)
  tx = train.create_optimizer(cfg, optax.constant_schedule(1.0))
  params = {'w': jnp.array([1.0, 2.0])}
  state, ema = tx.init(params), np.array([1.0, 2.0])
  for g in ([1.0, 0.0], [0.0, 4.0], [2.0, 2.0]):
    updates, state = tx.update({'w': jnp.array(g)}, state, params)
    params = optax.apply_updates(params, updates)
    ema = 0.5 * ema + 0.5 * np.asarray(params['w'])   # the updates pass through unchanged
  np.testing.assert_allclose(state[-1].ema['w'], ema)
  np.testing.assert_allclose(params['w'], [-2.0, -4.0])


def test_the_dp_optimizer_keeps_the_ema_last_and_frozen_parameters_fixed():
  """DP mode with a prior (only the head trains): the EMA is the chain's last state, so
  evaluated_params finds it, and the frozen parameters' average stays where they are."""
  model = models.create_model('resnet_tiny', 10)
  params = models.init_variables(model, jax.random.key(0), (8, 8, 1))['params']
  cfg = config_lib.train_config(ema_decay=0.5, weight_decay=0.0)
  dp = {'noise_multiplier': 0.0, 'clip_norm': 1.0, 'noise_key': jax.random.key(1),
        'trainable': 'head'}
  tx = train.dp_optimizer(cfg, optax.constant_schedule(0.5), dp)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  assert isinstance(state[-1], train.ParamsEmaState)
  new = optax.apply_updates(params, updates)
  for path, ema in jax.tree_util.tree_leaves_with_path(state[-1].ema):
    top = str(path[0].key)
    old = dict(jax.tree_util.tree_leaves_with_path(params))[path]
    moved = dict(jax.tree_util.tree_leaves_with_path(new))[path]
    np.testing.assert_allclose(ema, 0.5 * old + 0.5 * moved, rtol=1e-6)
    assert (top == 'head') != np.allclose(ema, old), top   # only the head's average moves
  with pytest.raises(Exception, match='ema_decay'):
    train.create_optimizer(config_lib.train_config(ema_decay=1.0), optax.constant_schedule(1.0))


def test_an_ema_run_resumes_exactly_and_returns_the_average(tmp_path):
  cfg, batches, model = tiny_setup(num_steps=6, ema_decay=0.7)
  straight, _ = fit(tmp_path / 'straight', cfg, batches, model)

  def kill_at_5(step):
    if step == 5:
      raise Killed()
  with pytest.raises(Killed):
    fit(tmp_path / 'resumed', cfg, batches, model, on_step=kill_at_5)
  from bnsynth_jax import checkpointing
  checkpointing.wait()
  resumed, _ = fit(tmp_path / 'resumed', cfg, batches, model)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg.ema_decay = 0.0
  raw, _ = fit(tmp_path / 'raw', cfg, batches, model)
  assert not np.allclose(raw['params']['head']['kernel'], straight['params']['head']['kernel'])


def test_augmentation_shapes_and_flip():
  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3))
  y = augment.random_crop_flip(jax.random.key(1), x, crop_padding=2, flip=True)
  assert y.shape == x.shape
  same = augment.random_crop_flip(jax.random.key(1), x, crop_padding=0, flip=False)
  np.testing.assert_array_equal(same, x)
  flipped_or_not = augment.random_crop_flip(jax.random.key(2), x, crop_padding=0, flip=True)
  outcomes = []
  for a, b in zip(np.asarray(flipped_or_not), np.asarray(x)):
    assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
    outcomes.append(np.array_equal(a, b[:, ::-1]))
  # Both outcomes occur among 16 images (fails if flip does nothing or always flips).
  assert 0 < sum(outcomes) < len(outcomes), outcomes


def test_mix_targets_match_the_mixed_images():
  """Image i is the constant i and has the one-hot target i, so a mixed image's mean
  pixel must equal its target's expectation of the constants: the target weights are
  the pixel proportions actually mixed (fails with a lambda that differs between the
  images and the targets, or with no mixing at all)."""
  n = 8
  values = np.arange(n, dtype=np.float32)
  x = jnp.broadcast_to(jnp.asarray(values)[:, None, None, None], (n, 8, 8, 3))
  t = jax.nn.one_hot(np.arange(n), n)
  for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
    for seed in range(3):
      xm, tm = augment.mix(jax.random.key(seed), x, t, mixup, cutmix)
      assert xm.shape == x.shape
      tm = np.asarray(tm)
      np.testing.assert_allclose(np.asarray(xm).mean(axis=(1, 2, 3)), tm @ values, atol=1e-4)
      np.testing.assert_allclose(tm.sum(-1), 1.0, rtol=1e-5)
    assert tm.max(-1).min() < 0.999, 'nothing was mixed'   # the last seed mixed something
