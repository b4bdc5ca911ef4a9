"""The relabel stage: mixed views (CutMix / Mixup of two crop+flip views) labelled by the
teacher, replayed by the NumPy reference and the student, resumable, equal on 1 and 8 devices."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bnsynth_jax import (artifacts, augment, config_lib, models, parallel, relabel, student,
                         synthetic_data, train, views_np)
from bnsynth_jax.errors import UserError
from bnsynth_jax.workdir import stage_dir
from test_export import _synthetic_dir


def _relabel_cfg(**overrides):
  cfg = config_lib.default_config().relabel
  cfg.update({'epochs': 3, **overrides})
  return cfg


def _reference_mixed_view(images, mixed, i, e):
  """Image i's mixed view in epoch e, one image at a time, written from the contract."""
  p = int(mixed['crop_padding'])
  def view(j):
    padded = np.pad(images[j], ((p, p), (p, p), (0, 0)))
    top, left = mixed['crop_offsets'][j, e]
    v = padded[top:top + images.shape[1], left:left + images.shape[2]]
    return (v[:, ::-1] if mixed['flips'][j, e] else v).astype(np.float32)
  own, other = view(i), view(mixed['partners'][i, e])
  top, left, h, w = mixed['boxes'][i, e]
  own[top:top + h, left:left + w] = other[top:top + h, left:left + w]
  lam = mixed['lams'][i, e]
  return own if lam == 1 else lam * own + (np.float32(1) - lam) * other


@pytest.mark.parametrize('mix', ['cutmix', 'mixup', 'both', 'none'])
def test_mixed_views_equal_the_per_image_reference_bit_for_bit(mix):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (24, 10, 12, 3), dtype=np.uint8)
  cfg = _relabel_cfg(mix=mix, mix_prob=0.7, crop_padding=2)
  mixed = relabel.mix_parameters(cfg, len(images), images.shape[1:3], seed=5)
  again = relabel.mix_parameters(cfg, len(images), images.shape[1:3], seed=5)
  assert all(np.array_equal(mixed[k], again[k]) for k in mixed)   # a function of the seed
  for e in range(3):
    assert sorted(mixed['partners'][:, e]) == list(range(len(images)))   # a permutation
    batch = views_np.mixed_views(images, mixed, np.arange(len(images)), e)
    assert batch.dtype == np.float32
    for i in range(len(images)):
      assert batch[i].tobytes() == _reference_mixed_view(images, mixed, i, e).tobytes()
  boxes, lams = mixed['boxes'], mixed['lams']
  assert (boxes[..., 0] + boxes[..., 2] <= 10).all() and (boxes[..., 1] + boxes[..., 3] <= 12).all()
  pasted, blended = boxes[..., 2:].prod(-1) > 0, lams < 1
  assert not (pasted & blended).any()
  assert pasted.any() == (mix in ('cutmix', 'both'))
  assert blended.any() == (mix in ('mixup', 'both'))
  if mix != 'none':   # about mix_prob of the views get a partner
    assert 0.5 < np.mean(pasted | blended) < 0.8


def _workdir(tmp_path, epochs=3, n_per_class=3):
  """A finished synthesis (3 x n_per_class images of 8 x 8) and a random resnet8 teacher."""
  _synthetic_dir(tmp_path, n_per_class=n_per_class)
  ds = synthetic_data.load_synthetic(stage_dir(tmp_path, 'synthesize'))
  config = config_lib.default_config()
  config.model.name = 'resnet8'
  config.relabel.epochs = epochs
  config.relabel.batch_size = 4
  model = models.from_config(config.model, ds.manifest['num_classes'])
  variables = models.init_variables(model, jax.random.key(0), ds.manifest['image_shape'])
  teacher = artifacts.save_model(stage_dir(tmp_path, 'teacher'), model_config=config.model,
                                 variables=variables, class_names=ds.manifest['class_names'],
                                 image_shape=ds.manifest['image_shape'], mean=ds.manifest['mean'],
                                 std=ds.manifest['std'])
  manifest = stage_dir(tmp_path, 'synthesize') / 'manifest.json'   # made by this teacher
  record = json.loads(manifest.read_text())
  manifest.write_text(json.dumps({**record, 'teacher_sha256': teacher['variables_sha256']}))
  return config, synthetic_data.load_synthetic(stage_dir(tmp_path, 'synthesize'))


def test_the_teacher_labels_the_views_the_student_is_shown(tmp_path):
  config, ds = _workdir(tmp_path)
  values = relabel.run(config, tmp_path)
  assert values['forward_passes'] == 9 * 3
  mixed = relabel.load_mixed(tmp_path)
  assert set(views_np.MIXED_FIELDS) <= set(mixed) and mixed['logits'].shape == (9, 3, 3)
  model, variables, manifest = artifacts.load_model(stage_dir(tmp_path, 'teacher'))
  label = relabel.make_labeler(model, manifest['mean'], manifest['std'], 'running',
                               parallel.make_mesh())
  for e in range(3):
    pixels = views_np.mixed_views(ds.images, mixed, np.arange(9), e)
    expected = np.asarray(label(np.concatenate([pixels, pixels[:7]]), variables))[:9]
    np.testing.assert_allclose(mixed['logits'][:, e], expected, atol=2e-2, rtol=2e-3)
  # The student's batches: those pixels and those logits, epoch after epoch.
  parts = student.synthetic_partitions(ds, 1, [0])
  base = student.input_pipeline.PartitionedBatches(parts, 1, 9, 4, seed=0)
  batches = student.MixedViewBatches(base, ds.images, mixed)
  for step in range(batches.steps_per_epoch * 4):
    got, e = batches.get(step), step // batches.steps_per_epoch
    index = base.get(step)['index']
    assert got['images'].tobytes() == views_np.mixed_views(ds.images, mixed, index, e).tobytes()
    assert np.array_equal(got['view_logits'], mixed['logits'][index, e % 3])


def test_relabel_resumes_byte_identically_and_matches_one_device(tmp_path):
  config, _ = _workdir(tmp_path / 'a')
  relabel.run(config, tmp_path / 'a')
  out = stage_dir(tmp_path / 'a', 'relabel')
  whole = (out / views_np.MIXED_FILE).read_bytes()
  # Killed after epoch 0: the finished epoch is read back, the others are labelled again.
  for name in ('logits/epoch_0001.npz', 'logits/epoch_0002.npz', views_np.MIXED_FILE,
               'manifest.json'):
    (out / name).unlink()
  relabel.run(config, tmp_path / 'a')
  assert (out / views_np.MIXED_FILE).read_bytes() == whole
  assert jax.device_count() == 8
  refused, _ = _workdir(tmp_path / 'refused')
  refused.relabel.bn, refused.relabel.batch_size = 'batch', 8
  with pytest.raises(UserError, match='must divide the 9 images'):   # before anything is written
    relabel.precheck(refused, tmp_path / 'refused', {})
  assert not stage_dir(tmp_path / 'refused', 'relabel').exists()
  for bn in ('running', 'batch'):   # batch: 24 images in 3 labelling batches of 8
    n_per_class = 3 if bn == 'running' else 8
    eight, _ = _workdir(tmp_path / f'8_{bn}', n_per_class=n_per_class)
    one, _ = _workdir(tmp_path / f'1_{bn}', n_per_class=n_per_class)
    eight.relabel.bn = one.relabel.bn = bn
    eight.relabel.batch_size = one.relabel.batch_size = 9 if bn == 'running' else 8
    relabel.precheck(eight, tmp_path / f'8_{bn}', {})
    relabel.run(eight, tmp_path / f'8_{bn}')
    with parallel.restrict_devices(1):
      relabel.run(one, tmp_path / f'1_{bn}')
    np.testing.assert_allclose(relabel.load_mixed(tmp_path / f'8_{bn}')['logits'].astype(float),
                               relabel.load_mixed(tmp_path / f'1_{bn}')['logits'].astype(float),
                               atol=1e-2)


def test_batch_statistics_labels_use_each_labelling_batch(tmp_path):
  config, ds = _workdir(tmp_path)
  config.relabel.bn, config.relabel.batch_size = 'batch', 9 * 8   # one batch, 8 devices
  with pytest.raises(UserError, match='must divide the 9 images'):
    relabel.precheck(config, tmp_path, {})
  config.relabel.batch_size = 9
  with pytest.raises(UserError, match='multiple of the 8 devices'):
    relabel.precheck(config, tmp_path, {})
  with parallel.restrict_devices(1):
    relabel.precheck(config, tmp_path, {})
    relabel.run(config, tmp_path)
    batch_logits = relabel.load_mixed(tmp_path)['logits']
  config.relabel.bn = 'running'
  running, _ = _workdir(tmp_path / 'r')
  running.relabel.batch_size = 9
  relabel.run(running, tmp_path / 'r')
  # Same views, other normalisation statistics: other labels.
  assert not np.allclose(batch_logits, relabel.load_mixed(tmp_path / 'r')['logits'], atol=1e-2)


def test_mixed_labels_refuse_what_cannot_work():
  config = config_lib.default_config()
  config.student.labels = 'mixed'
  with pytest.raises(UserError, match='relabel.epochs > 0'):
    student.validate(config)
  config.relabel.epochs = 4
  student.validate(config)
  config.student.cutmix_alpha = 1.0
  with pytest.raises(UserError, match='cutmix_alpha=0'):
    student.validate(config)
  for key, value in (('mix', 'blend'), ('bn', 'train')):
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.relabel[key] = value
    with pytest.raises(UserError, match=f'relabel.{key}'):
      relabel.validate(bad)


def test_the_export_carries_the_mixed_views_and_replays_them(tmp_path):
  config, ds = _workdir(tmp_path)
  relabel.run(config, tmp_path)
  synthetic_data.export_image_folder(stage_dir(tmp_path, 'synthesize'), tmp_path / 'out')
  images, views, release = views_np.load_release(tmp_path / 'out')
  mixed = relabel.load_mixed(tmp_path)
  exported = {k[len('mixed_'):]: v for k, v in views.items() if k.startswith('mixed_')}
  assert set(exported) == set(views_np.MIXED_FIELDS)
  assert release['mixed_views']['epochs'] == 3 and 'mixed_views' in release['mixed_views']['recipe']
  for e in range(4):   # epoch 3 wraps to 0
    assert views_np.mixed_views(images, exported, np.arange(9), e).tobytes() == \
        views_np.mixed_views(ds.images, mixed, np.arange(9), e).tobytes()
  assert np.array_equal(exported['logits'], mixed['logits'])


def test_another_teacher_is_refused(tmp_path):
  config, _ = _workdir(tmp_path)
  manifest = stage_dir(tmp_path, 'synthesize') / 'manifest.json'
  manifest.write_text(json.dumps({**json.loads(manifest.read_text()), 'teacher_sha256': 'f' * 64}))
  with pytest.raises(UserError, match='not the teacher that synthesised'):
    relabel.run(config, tmp_path)
  assert relabel.input_fingerprints(config, tmp_path)['teacher_sha256'] != 'f' * 64


def test_the_mixed_label_step_trains_on_the_given_pixels_and_tempered_logits():
  """labels=mixed: no crop, flip or mix in the step; loss T^2 x CE(softmax(view_logits / T))."""
  cfg = config_lib.train_config(crop_padding=4, flip=True, warmup_epochs=0.0)
  model = models.create_model('resnet_tiny', 3)
  state = train.create_train_state(jax.random.key(0), model, (8, 8, 1),
                                   train.create_optimizer(cfg, lambda _: 0.1),
                                   parallel.make_mesh())
  rng = np.random.default_rng(0)
  batch = {'images': rng.uniform(0, 255, (8, 8, 8, 1)).astype(np.float32),
           'view_logits': rng.normal(0, 3, (8, 3)).astype(np.float16),
           'labels': np.zeros(8, np.int32), 'index': np.arange(8, dtype=np.int32)}
  _, metrics = train.train_step(state, batch, 0, base_key=jax.random.key(1), cfg=cfg,
                                mean=(0.3,), std=(0.4,), num_classes=3, labels='mixed',
                                soft_temperature=4.0)
  x = augment.standardise(jnp.asarray(batch['images']) / 255.0, (0.3,), (0.4,))
  logits, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                          train=True, mutable=['batch_stats'])
  targets = jax.nn.softmax(batch['view_logits'].astype(np.float32) / 4.0)
  expected = 16.0 * np.mean(np.asarray(train.cross_entropy(logits / 4.0, targets)))
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)
