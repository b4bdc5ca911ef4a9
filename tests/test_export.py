"""The portable release: the NumPy view reference, the export's round trip, the torch student."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnsynth_jax import augment, synthetic_data, views_np
from bnsynth_jax.errors import UserError
from conftest import REPO


@pytest.mark.versions
@pytest.mark.parametrize('padding,flip', [(4, True), (1, False), (0, True), (2, True)])
def test_numpy_view_reference_equals_the_jax_view_function_bit_for_bit(padding, flip):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 12, 10, 3), dtype=np.uint8)
  key, indices = jax.random.key(5), jnp.arange(64, dtype=jnp.int32)
  flips_seen = set()
  for epoch in range(3):
    jax_views = np.asarray(augment.view_crop_flip(key, epoch, indices, augment.to_unit(images),
                                                  padding, flip))
    offsets, flips = (np.asarray(a) for a in augment.view_params(key, epoch, indices,
                                                                  padding, flip))
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding
    flips_seen |= set(flips.tolist())
    np_u8 = views_np.apply_view(images, offsets, flips, padding)
    assert np_u8.dtype == np.uint8
    # uint8 views, scaled as the network sees them: the same float32 bits.
    np_unit = np_u8.astype(np.float32) / np.float32(255.0)
    assert np_unit.tobytes() == jax_views.astype(np.float32).tobytes()
    # And on float pixels directly (one image at a time too).
    unit = images.astype(np.float32) / np.float32(255.0)
    assert views_np.apply_view(unit, offsets, flips, padding).tobytes() == jax_views.tobytes()
    assert views_np.apply_view(unit[3], offsets[3], flips[3], padding).tobytes() == \
        jax_views[3].tobytes()
  assert flips_seen == ({False, True} if flip else {False})
  if padding:   # the views do move
    assert not np.array_equal(np_u8, images)


def _synthetic_dir(tmp_path, n_per_class=3, classes=('ant', 'bee', 'cow'), epochs=4,
                   padding=2, flip=True, channels=3):
  """A finished synthetic dataset written with the package's own writers (no training)."""
  rng = np.random.default_rng(1)
  k, n = len(classes), n_per_class * len(classes)
  directory = tmp_path / 'synthetic'
  entries = []
  for s, rows in enumerate(np.array_split(np.arange(n), 2)):
    soft = rng.dirichlet(np.ones(k), len(rows)).astype(np.float32)
    view_soft = rng.dirichlet(np.ones(k), (len(rows), epochs)).astype(np.float16)
    synthetic_data.write_shard(directory, s, {
        'images': rng.integers(0, 256, (len(rows), 8, 8, channels), dtype=np.uint8),
        'labels': (rows % k).astype(np.int32), 'loss': rng.random(len(rows)).astype(np.float32),
        'confidence': rng.random(len(rows)).astype(np.float32), 'soft_labels': soft,
        'view_soft_labels': view_soft, 'bn_loss_initial': np.float32(2),
        'bn_loss_final': np.float32(1)})
  entries, _ = synthetic_data.scan_shards(directory, 2)
  synthetic_data.write_manifest(
      directory, entries, num_classes=k, class_names=list(classes),
      image_shape=[8, 8, channels], mean=[0.5] * channels, std=[0.25] * channels,
      soft_label_temperature=3.0, teacher_sha256='t' * 64, statistics_sha256='s' * 64,
      views={'epochs': epochs, 'crop_padding': padding, 'flip': flip, 'seed': 17,
             'temperature': 3.0})
  return directory


def test_export_round_trips_and_replays_the_students_views(tmp_path):
  directory = _synthetic_dir(tmp_path)
  ds = synthetic_data.load_synthetic(directory)
  out = tmp_path / 'release'
  assert synthetic_data.export_image_folder(directory, out) == len(ds)
  images, views, release = views_np.load_release(out)
  # load -> export -> read back: equal, in index order.
  np.testing.assert_array_equal(images, ds.images)
  np.testing.assert_array_equal(views['labels'], ds.labels)
  np.testing.assert_array_equal(views['soft_labels'], ds.soft_labels)
  np.testing.assert_array_equal(views['view_soft_labels'], ds.view_soft_labels)
  assert views['view_soft_labels'].dtype == np.float16
  assert views['files'][4] == 'train/bee/000004.png' and (out / str(views['files'][4])).exists()
  assert list(views['class_names']) == ds.class_names
  assert int(views['epochs']) == 4 and int(views['crop_padding']) == 2
  assert float(views['temperature']) == 3.0
  assert release['format'] == views_np.RELEASE_FORMAT and release['num_images'] == len(ds)
  assert release['mean'] == [0.5] * 3 and release['views']['flip'] is True
  assert release['source']['teacher_sha256'] == 't' * 64
  # The views a consumer replays are the ones the package's student trains on (and the
  # teacher labelled): augment.view_crop_flip with the manifest's view seed.
  key = jax.random.key(ds.manifest['views']['seed'])
  for epoch in range(6):   # past E: epochs wrap around as in the student
    x, target = views_np.epoch_views(images, views, epoch)
    student = augment.view_crop_flip(key, epoch % 4, jnp.arange(len(ds), dtype=jnp.int32),
                                     augment.to_unit(ds.images), 2, True)
    assert (x.astype(np.float32) / np.float32(255)).tobytes() == np.asarray(student).tobytes()
    np.testing.assert_array_equal(target, ds.view_soft_labels[:, epoch % 4])
  # A second export to the same place is refused; nothing there changes.
  before = (out / views_np.VIEWS_FILE).read_bytes()
  with pytest.raises(UserError, match='exists already'):
    synthetic_data.export_image_folder(directory, out)
  assert (out / views_np.VIEWS_FILE).read_bytes() == before


def test_an_interrupted_export_is_redone_and_grayscale_without_views_exports(tmp_path):
  directory = _synthetic_dir(tmp_path, epochs=4, channels=1)
  out = tmp_path / 'release'
  (out / '.train.partial' / 'ant').mkdir(parents=True)    # what a kill mid-export leaves
  (out / '.train.partial' / 'ant' / 'junk.png').write_bytes(b'half')
  synthetic_data.export_image_folder(directory, out)
  assert not (out / '.train.partial').exists()
  images, _, _ = views_np.load_release(out)
  np.testing.assert_array_equal(images, synthetic_data.load_synthetic(directory).images)
  # A dataset synthesised without per-view labels exports E = 0 views.
  manifest = json.loads((directory / 'manifest.json').read_text())
  manifest['views'] = None
  (directory / 'manifest.json').write_text(json.dumps(manifest))
  synthetic_data.export_image_folder(directory, tmp_path / 'plain')
  views = views_np.load_views(tmp_path / 'plain')
  assert views['crop_offsets'].shape == (9, 0, 2) and int(views['epochs']) == 0
  assert json.loads((tmp_path / 'plain' / 'release.json').read_text())['views'] is None


def test_export_command_line(tmp_path):
  directory = _synthetic_dir(tmp_path)
  run = lambda out: subprocess.run(
      [sys.executable, '-m', 'bnsynth_jax.synthetic_data', f'--synthetic_dir={directory}',
       f'--export_to={out}'], capture_output=True, text=True, cwd=REPO, timeout=300)
  ok = run(tmp_path / 'out')
  assert ok.returncode == 0, ok.stderr
  assert 'views.npz' in ok.stdout and (tmp_path / 'out' / 'release.json').exists()
  again = run(tmp_path / 'out')
  assert again.returncode == 2 and 'exists already' in again.stderr.strip().splitlines()[-1]


def test_torch_student_runs_end_to_end_on_a_tiny_release(tmp_path, capsys):
  pytest.importorskip('torch', reason='PyTorch is not installed (optional: pip install -e .[torch])')
  directory = _synthetic_dir(tmp_path, n_per_class=4, padding=1)
  synthetic_data.export_image_folder(directory, tmp_path / 'release')
  ds = synthetic_data.load_synthetic(directory)
  np.savez(tmp_path / 'test.npz', images=ds.images, labels=ds.labels)
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import torch_student
  rc = torch_student.main([f'--release={tmp_path / "release"}', f'--test={tmp_path / "test.npz"}',
                           '--model=resnet8', '--epochs=40', '--batch_size=4',
                           '--no_results', '--labels=views,hard'])
  assert rc == 0
  out = capsys.readouterr().out
  accuracy = {line.split('(')[1].split(')')[0]: float(line.split('accuracy ')[1].split('%')[0])
              for line in out.splitlines() if line.startswith('torch student (') and 'sd' in line}
  assert set(accuracy) == {'views', 'hard'}
  # 12 noise images with hard labels are memorised: the training loop does learn.
  assert accuracy['hard'] >= 75.0, out
  # A JAX workdir of another synthetic set is refused before any training.
  workdir = _jax_workdir(tmp_path, directory, statistics_sha256='f' * 64)
  with pytest.raises(SystemExit, match='differs from the release'):
    torch_student.main([f'--release={tmp_path / "release"}', f'--test={tmp_path / "test.npz"}',
                        '--model=resnet8', '--epochs=1', '--batch_size=4', '--no_results',
                        '--labels=views', f'--jax_workdirs={workdir}'])
  # A recipe whose views differ from the release's is refused.
  with pytest.raises(SystemExit, match='differ'):
    torch_student.main([f'--release={tmp_path / "release"}', f'--test={tmp_path / "test.npz"}',
                        '--model=resnet8', '--epochs=1', '--batch_size=4', '--crop_padding=0',
                        '--no_results', '--labels=views'])


def _jax_workdir(tmp_path, directory, **manifest_changes):
  """A JAX run's folder as torch_student reads it: report.json and synthetic/manifest.json."""
  workdir = tmp_path / 'jax_run'
  (workdir / 'synthetic').mkdir(parents=True, exist_ok=True)
  (workdir / 'report.json').write_text(json.dumps(
      {'evaluate': {'synthetic': {'test_accuracy': 0.5}},
       'student': {'synthetic': {'labels': 'views'}}}))
  manifest = json.loads((directory / 'manifest.json').read_text())
  (workdir / 'synthetic' / 'manifest.json').write_text(json.dumps({**manifest,
                                                                   **manifest_changes}))
  return workdir


def test_torch_student_reads_only_finished_jax_students_of_the_same_release(tmp_path):
  """The JAX side of the comparison (no PyTorch needed): a workdir is read only if its
  synthetic set is the release's; one whose student is still training is left out."""
  directory = _synthetic_dir(tmp_path, n_per_class=4, padding=1)
  synthetic_data.export_image_folder(directory, tmp_path / 'release')
  release = json.loads((tmp_path / 'release' / 'release.json').read_text())
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import torch_student
  workdir = _jax_workdir(tmp_path, directory)
  assert torch_student.jax_accuracy(str(workdir), release) == (0.5, 'views')
  (workdir / 'report.json').unlink()
  assert torch_student.jax_accuracy(str(workdir), release) == (None, None)
  workdir = _jax_workdir(tmp_path, directory, statistics_sha256='f' * 64)
  with pytest.raises(SystemExit, match='differs from the release'):
    torch_student.jax_accuracy(str(workdir), release)


@pytest.mark.parametrize('num_steps', [0, 1500])
def test_torch_student_replays_the_jax_students_step_count_and_learning_rate(num_steps):
  """A recipe with num_steps (the scaling points' fixed budget) runs that many steps, not
  `epochs` whole epochs, on the JAX student's learning-rate schedule."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import torch_student
  from bnsynth_jax import train
  from bnsynth_jax.configs import cifar10
  cfg = cifar10.get_config('cpu').student
  cfg.num_steps = num_steps
  recipe = torch_student.recipe_from_report({'config': {'student': cfg.to_dict()}})
  steps_per_epoch, total, warmup = torch_student.step_schedule(recipe, 1000)
  assert steps_per_epoch == 1000 // cfg.batch_size
  assert total == train.num_train_steps(cfg, steps_per_epoch)
  assert total == (num_steps or round(cfg.epochs * steps_per_epoch))
  schedule = train.create_learning_rate(cfg, steps_per_epoch, total)
  for step in (0, warmup // 2, warmup, total // 3, total - 1):
    assert torch_student.learning_rate(step, total, warmup, recipe['learning_rate']) == (
        pytest.approx(float(schedule(step)), rel=1e-5, abs=1e-7))
