"""Any private folder, first try: preflight, derived defaults, faithful pixels, the workdir
lock, and faults (disk full, permission, Ctrl-C / SIGTERM) as one line."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from bnsynth_jax import config_lib, pipeline, preflight, sources
from bnsynth_jax.errors import UserError
from conftest import REPO, run_main, write_image_folder
from test_main import assert_user_error


def folder_config(root, **overrides):
  """configs/imagefolder.py on `root`, with `section.key=value` overrides."""
  sys.path.insert(0, str(REPO / 'configs'))
  try:
    import imagefolder
  finally:
    sys.path.pop(0)
  config = imagefolder.get_config()
  config.data.root = str(root)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def preflight_problems(config, workdir, stages='all'):
  try:
    pipeline.prepare(config, str(workdir), stages)
  except UserError as e:
    return str(e).splitlines()
  return []


# ----------------------------------------------------------------------------
# Preflight


def test_preflight_lists_every_problem_at_once_and_writes_nothing(tmp_path):
  root = write_image_folder(tmp_path / 'images', per_class=6)
  workdir = tmp_path / 'w'
  result = run_main('--config=configs/imagefolder.py', f'--config.data.root={root}',
                    f'--workdir={workdir}', '--config.teacher.batch_size=12',
                    '--config.synthesis.images_per_class=5', '--config.synthesis.batch_size=4',
                    '--config.student.batch_size=64', '--config.model.name=resnet21')
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert 'Traceback' not in result.stderr
  text = '\n'.join(errors)
  for needle in ('teacher.batch_size=12 is not divisible by the 8 devices',
                 'synthesis.batch_size=4 does not divide the 15 images',
                 'student.batch_size=64 is larger than the synthetic set (15)',
                 'resnet21'):
    assert needle in text, text
  assert len(errors) >= 4
  assert not workdir.exists()      # nothing written, not even the folder


def _seven_classes(tmp_path, per_class=10):
  names = tuple(f'c{i}' for i in range(7))
  return write_image_folder(tmp_path / 'images', classes=names, per_class=per_class, size=10)


def test_derived_values_fit_the_data_and_devices(tmp_path):
  root = _seven_classes(tmp_path)
  config = folder_config(root)
  assert preflight_problems(config, tmp_path / 'w') == []
  # 8 devices, 7 classes: images per class a multiple of 8 (<= the 10 per class), a synthesis
  # batch that is a multiple of 7 and of 8 dividing the 56 images, batches <= their sets.
  assert config.data.image_size == 10
  assert config.synthesis.images_per_class == 8
  assert config.synthesis.batch_size == 56
  assert config.teacher.batch_size == 64           # <= 70 training images, multiple of 8
  assert config.student.batch_size == 56           # <= 56 synthetic images
  # Explicit values are kept.
  config = folder_config(root, **{'synthesis.images_per_class': 8,
                                  'synthesis.batch_size': 0, 'teacher.batch_size': 16})
  assert preflight_problems(config, tmp_path / 'w') == []
  assert config.teacher.batch_size == 16 and config.synthesis.batch_size == 56
  # An explicit count that no batch can split over 8 devices is refused, saying why.
  config = folder_config(root, **{'synthesis.images_per_class': 4})
  assert any('no multiple of the 7 classes divides both 28 images and 8 devices' in p
             for p in preflight_problems(config, tmp_path / 'w'))


@pytest.mark.parametrize('ipc,classes,devices,want', [
    (100, 3, 1, 150), (100, 10, 8, 200), (96, 7, 8, 224), (12, 10, 8, 120), (8, 7, 8, 56),
    (10, 10, 8, 0), (3, 7, 8, 0)])
def test_synthesis_batch_derivation(ipc, classes, devices, want):
  b = preflight._synthesis_batch(ipc, classes, devices)
  assert b == want
  if b:
    assert b % classes == 0 and b % devices == 0 and (ipc * classes) % b == 0


def test_large_images_are_capped_and_recorded(tmp_path):
  root = write_image_folder(tmp_path / 'images', per_class=8, size=100)
  config = folder_config(root)
  assert preflight_problems(config, tmp_path / 'w', 'teacher') == []
  assert config.data.image_size == preflight.MAX_DERIVED_IMAGE_SIZE
  data = sources.PrivateData(config.data)
  assert data.info.image_shape == (64, 64, 3)


BAD_INPUTS = [
    # (name, overrides or folder mutation, stages, needle)
    ('teacher batch vs devices', {'teacher.batch_size': 12}, 'all', 'not divisible by the 8'),
    ('teacher batch vs split', {'teacher.batch_size': 64}, 'teacher',
     'larger than the training split (18)'),
    ('teacher batch vs partitions', {'teacher.batch_size': 8, 'data.num_partitions': 3},
     'teacher', 'not divisible by data.num_partitions=3'),
    ('synthesis batch vs devices', {'synthesis.batch_size': 6, 'synthesis.images_per_class': 2},
     'all', 'synthesis.batch_size=6 is not divisible by the 8 devices'),
    ('synthesis batch vs images', {'synthesis.images_per_class': 5, 'synthesis.batch_size': 8},
     'all', 'does not divide the 15 images'),
    ('student batch vs synthetic set', {'student.batch_size': 32,
                                        'synthesis.images_per_class': 4}, 'all',
     'larger than the synthetic set (12)'),
    ('student batch vs devices', {'student.batch_size': 4}, 'all',
     'student.batch_size=4 is not divisible'),
    ('baseline per class', {'synthesis.images_per_class': 8,
                            'synthesis.batch_size': 24}, 'all',
     'real-subset baseline needs 8 training images per class'),
    ('full-real batch', {'evaluate.full_real': True, 'student.batch_size': 24,
                         'synthesis.images_per_class': 8, 'synthesis.batch_size': 24,
                         'evaluate.real_subset': False}, 'all',
     'larger than the training split (evaluate.full_real)'),
    ('image size too small', {'data.image_size': 6}, 'teacher', 'smaller than 8x8'),
    ('imagenet stem on small images', {'model.name': 'resnet18', 'model.stem': 'imagenet'},
     'teacher', 'stem=imagenet'),
    ('student imagenet stem', {'student.model.name': 'resnet18', 'student.model.stem': 'imagenet'},
     'all', 'student.model.stem=cifar'),
    ('multires odd size', {'data.image_size': 11, 'synthesis.multires_iterations': 5}, 'all',
     'needs even image sizes'),
    ('unknown teacher model', {'model.name': 'resnet21'}, 'teacher', 'resnet21'),
    ('unknown student model', {'student.model.name': 'vgg'}, 'all', 'vgg'),
    ('views without view labels', {'synthesis.view_epochs': 0}, 'all',
     'set synthesis.view_epochs > 0'),
    ('views vs student crops', {'student.crop_padding': 2}, 'all',
     'differ from the views the teacher will label'),
    ('unknown student labels', {'student.labels': 'fuzzy'}, 'all', "unknown student.labels"),
    ('unknown stats kind', {'stats.kind': 'perlayer'}, 'all', 'unknown stats.kind'),
    ('unknown synthesis augment', {'synthesis.augment': 'mixup'}, 'all',
     'unknown synthesis.augment'),
    ('negative images per class', {'synthesis.images_per_class': -1}, 'all',
     'images_per_class and batch_size >= 1'),
    ('pretrained and init_from', {'teacher.pretrained': '/a', 'teacher.init_from': '/b'},
     'teacher', 'set only one of them'),
    ('pretrained path without a model', {'teacher.pretrained': '/nonexistent/teacher'},
     'teacher', 'teacher.pretrained=/nonexistent/teacher holds no finished model'),
    ('init_from path without a model', {'teacher.init_from': '/nonexistent/t'}, 'teacher',
     'teacher.init_from=/nonexistent/t holds no finished model'),
    ('teacher_dir without a model', {'synthesis.teacher_dir': '/nonexistent/t'}, 'synthesize',
     'synthesis.teacher_dir=/nonexistent/t holds no finished teacher'),
    ('stats without a teacher', {}, 'stats', 'stats stage needs a finished teacher'),
    ('synthesis without stats', {}, 'synthesize', 'needs a finished teacher stage'),
    ('evaluate without a student', {}, 'evaluate', 'evaluate stage needs a finished student'),
    ('negative batch', {'teacher.batch_size': -8}, 'teacher',
     'teacher.batch_size=-8 must be positive'),
    ('audit reference pool', {'audit.reference_models': 2, 'teacher.batch_size': 16},
     'teacher,audit', 'each audit reference model trains on'),
    ('alpha background', {'data.alpha_background': 'grey'}, 'teacher',
     'unknown data.alpha_background'),
    ('pixel max', {'data.pixel_max': -1.0}, 'teacher', 'data.pixel_max=-1.0 is negative'),
    ('channels', {'data.channels': 2}, 'teacher', 'data.channels=2'),
]


@pytest.mark.parametrize('name,overrides,stages,needle', BAD_INPUTS,
                         ids=[b[0].replace(' ', '_') for b in BAD_INPUTS])
def test_bad_input_is_refused_before_work(tmp_path, name, overrides, stages, needle):
  root = write_image_folder(tmp_path / 'images', per_class=6, size=12)
  workdir = tmp_path / 'w'
  problems = preflight_problems(folder_config(root, **overrides), workdir, stages)
  assert any(needle in p for p in problems), (name, problems)
  assert not workdir.exists()


def test_single_class_and_short_class_are_refused(tmp_path):
  one = write_image_folder(tmp_path / 'one', classes=('only',), per_class=6)
  problems = preflight_problems(folder_config(one), tmp_path / 'w1')
  assert any('single class (only)' in p for p in problems), problems
  # A class with fewer images than the per-class baseline subset asked for.
  short = write_image_folder(tmp_path / 'short', per_class=12)
  for f in sorted((short / 'train' / 'dog').iterdir())[:4]:
    f.unlink()
  problems = preflight_problems(
      folder_config(short, **{'synthesis.images_per_class': 16, 'synthesis.batch_size': 48}),
      tmp_path / 'w2')
  assert any('dog (8)' in p and 'have fewer' in p for p in problems), problems
  # ... and derived, the images per class fit the smallest class instead.
  config = folder_config(short)
  assert preflight_problems(config, tmp_path / 'w3') == []
  assert config.synthesis.images_per_class == 8
  # A smallest class below what the devices need (8 per class for 3 classes on 8 devices).
  for f in sorted((short / 'train' / 'dog').iterdir())[:5]:
    f.unlink()
  problems = preflight_problems(folder_config(short), tmp_path / 'w4')
  assert any('smallest training class has 3 images' in p for p in problems), problems


def test_a_resumed_workdir_keeps_its_derived_values(tmp_path):
  root = _seven_classes(tmp_path, per_class=12)
  workdir = tmp_path / 'w'
  config = folder_config(root)
  pipeline.prepare(config, str(workdir), 'teacher')
  record = workdir / 'teacher' / 'stage_config.json'
  record.parent.mkdir(parents=True)
  record.write_text(json.dumps(pipeline.stage_config(config, 'teacher')))
  assert json.loads(record.read_text())['teacher.batch_size'] == 80
  # The same workdir on fewer devices keeps the recorded 80 (divisible by 2).
  from bnsynth_jax import parallel
  with parallel.restrict_devices(2):
    again = folder_config(root)
    pipeline.prepare(again, str(workdir), 'teacher')
  assert again.teacher.batch_size == 80


def test_main_runs_a_folder_end_to_end_with_derived_defaults(tmp_path):
  """7 classes of 10x10 images on 8 devices: no batch size or image count given."""
  root = _seven_classes(tmp_path)
  workdir = tmp_path / 'w'
  result = run_main('--config=configs/imagefolder.py', f'--config.data.root={root}',
                    f'--workdir={workdir}', '--config.model.name=resnet_tiny',
                    '--config.student.model.name=resnet_tiny', '--config.teacher.num_steps=2',
                    '--config.synthesis.iterations=2', '--config.student.num_steps=2',
                    '--config.audit.bootstrap=5')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'preflight: derived synthesis.batch_size=56' in result.stderr
  recorded = json.loads((workdir / 'student' / 'stage_config.json').read_text())
  assert recorded['synthesis.images_per_class'] == 8
  assert recorded['student.batch_size'] == 56 and recorded['teacher.batch_size'] == 64
  assert 'ratio to real subset' in result.stdout
  assert not (workdir / '.lock').exists()
  # Later runs of public stages read no private listing: the recorded values are reused.
  import shutil
  shutil.rmtree(root)
  again = run_main('--config=configs/imagefolder.py', f'--config.data.root={root}',
                   f'--workdir={workdir}', '--config.model.name=resnet_tiny',
                   '--config.student.model.name=resnet_tiny', '--config.teacher.num_steps=2',
                   '--config.synthesis.iterations=2', '--config.student.num_steps=2',
                   '--config.audit.bootstrap=5', '--stages=synthesize,student')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'recorded in this workdir' in again.stderr and 'done already' in again.stderr


# ----------------------------------------------------------------------------
# Faithful pixels


def _decode(path, size=None, channels=1, **kw):
  with Image.open(path) as im:
    size = size or im.size[0]
  return sources._decode_image(str(path), size, channels, **kw)


@pytest.mark.parametrize('mode,suffix', [('I;16', '.png'), ('I;16B', '.tif'), ('I', '.tif'),
                                         ('I;16', '.tif')])
def test_16_bit_ramp_round_trips_within_one_grey_level(tmp_path, mode, suffix):
  ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
  path = tmp_path / f'ramp{suffix}'
  if mode == 'I':
    Image.fromarray(ramp.astype(np.int32), 'I').save(path)
  else:
    im = Image.fromarray(ramp)
    im = im if mode == 'I;16' else Image.frombytes(mode, (64, 64), ramp.astype('>u2').tobytes())
    im.save(path)
  got = _decode(path)[..., 0].astype(int)
  want = np.round(ramp / 65535 * 255).astype(int)
  assert np.abs(got - want).max() <= 1
  assert (got == 255).mean() < 0.01 and got.min() == 0 and got.max() == 255
  # As RGB: the same grey in every channel.
  rgb = _decode(path, channels=3)
  assert rgb.shape == (64, 64, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
  # A 12-bit range given by data.pixel_max.
  twelve = tmp_path / 'twelve.png'
  Image.fromarray((ramp >> 4).astype(np.uint16)).save(twelve)
  got = _decode(twelve, pixel_max=4095)[..., 0].astype(int)
  assert np.abs(got - want).max() <= 1


def test_float_images(tmp_path):
  arr = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
  Image.fromarray(arr, 'F').save(tmp_path / 'unit.tif')
  got = _decode(tmp_path / 'unit.tif')[..., 0].astype(int)
  assert np.abs(got - np.round(arr * 255)).max() <= 1
  Image.fromarray(arr * 1000, 'F').save(tmp_path / 'hu.tif')
  with pytest.raises(UserError, match='pixel_max'):
    _decode(tmp_path / 'hu.tif')
  got = _decode(tmp_path / 'hu.tif', pixel_max=1000.0)[..., 0].astype(int)
  assert np.abs(got - np.round(arr * 255)).max() <= 1


def test_alpha_palette_cmyk_and_exif(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :4, 3] = 255                          # left half opaque red, right transparent
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
  black = _decode(tmp_path / 'a.png', channels=3)
  white = _decode(tmp_path / 'a.png', channels=3, alpha_background=1.0)
  assert (black[:, :4] == [200, 0, 0]).all() and (white[:, :4] == [200, 0, 0]).all()
  assert (black[:, 4:] == 0).all() and (white[:, 4:] == 255).all()
  la = Image.fromarray(rgba, 'RGBA').convert('LA')
  la.save(tmp_path / 'la.png')
  assert (_decode(tmp_path / 'la.png', alpha_background=1.0)[:, 4:] == 255).all()
  # Palette (with and without transparency) and GIF's first frame.
  pal = Image.fromarray(rgba[..., :3]).convert('P', palette=Image.ADAPTIVE, colors=4)
  pal.save(tmp_path / 'p.png')
  assert (_decode(tmp_path / 'p.png', channels=3)[:, :4] == [200, 0, 0]).all()
  frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)).convert('P') for v in (40, 220)]
  frames[0].save(tmp_path / 'g.gif', save_all=True, append_images=frames[1:])
  assert abs(int(_decode(tmp_path / 'g.gif').mean()) - 40) <= 2
  # CMYK JPEG -> RGB.
  Image.fromarray(np.full((8, 8, 3), (0, 0, 255), np.uint8)).convert('CMYK').save(
      tmp_path / 'c.jpg', quality=100)
  blue = _decode(tmp_path / 'c.jpg', channels=3).reshape(-1, 3).mean(0)
  assert blue[2] > 200 and blue[0] < 40
  # EXIF orientation 6 (rotate 90 clockwise to display): a wide image becomes tall.
  wide = np.zeros((8, 16, 3), np.uint8)
  wide[:, :8] = 255                             # left half white
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(wide).save(tmp_path / 'r.jpg', exif=exif, quality=100)
  shown = sources._decode_image(str(tmp_path / 'r.jpg'), 8, 1)   # 8 wide, 16 tall: crop
  with Image.open(tmp_path / 'r.jpg') as im:
    from PIL import ImageOps
    upright = np.asarray(ImageOps.exif_transpose(im).convert('L'))
  assert upright.shape == (16, 8)
  assert np.abs(shown[..., 0].astype(int) - upright[4:12].astype(int)).max() <= 2


def test_every_listed_extension_is_read_and_dicom_is_explained(tmp_path):
  root = tmp_path / 'images'
  arr = np.random.RandomState(0).randint(0, 256, (12, 12, 3), np.uint8)
  for split in ('train', 'test'):
    for c, ext in enumerate(('.bmp', '.tif', '.webp', '.gif', '.tiff')):
      d = root / split / f'class{c}'
      d.mkdir(parents=True)
      for i in range(2):
        Image.fromarray(arr).save(d / f'{i}{ext}', **({'lossless': True} if ext == '.webp'
                                                       else {}))
  source = sources.create_source(folder_config(root, **{'data.image_size': 12}).data)
  assert source.info().class_counts['train'] == (2, 2, 2, 2, 2)
  assert len(source.load('train', [0], 1)[0]) == 10
  dicom = root / 'train' / 'class5'
  dicom.mkdir()
  (dicom / 'slice1.dcm').write_bytes(b'DICM')
  with pytest.raises(UserError, match='only .dcm files.*pydicom'):
    sources.create_source(folder_config(root).data)


# ----------------------------------------------------------------------------
# One writer per workdir


def _digits_teacher(workdir, *extra):
  return [sys.executable, '-m', 'bnsynth_jax.main', '--config=configs/digits.py',
          f'--workdir={workdir}', '--stages=teacher', *extra]


def _popen(cmd):
  # One simulated device: this process runs beside others on 2 cores.
  flags = os.environ.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count=8',
                                                  '--xla_force_host_platform_device_count=1')
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=flags)
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120):
  t0 = time.time()
  while not path.exists():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() - t0 < timeout, f'{path} did not appear'
    time.sleep(0.2)


def test_second_run_on_a_workdir_stops_at_once_naming_the_holder(tmp_path):
  workdir = tmp_path / 'w'
  first = _popen(_digits_teacher(workdir, '--config.teacher.num_steps=300'))
  _wait_for(workdir / '.lock', first)
  holder = json.loads((workdir / '.lock').read_text())
  assert holder['pid'] == first.pid
  if os.path.exists(f'/proc/{first.pid}/stat'):
    assert holder['process'], holder      # its identity, so a reused pid is not taken for it
  second = run_main('--config=configs/digits.py', f'--workdir={workdir}', '--stages=teacher',
                    '--config.teacher.num_steps=300')
  assert_user_error(second, 'in use by another run', f'pid {first.pid}')
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  assert not (workdir / '.lock').exists()       # released at the end


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True)
  dead_pid = int(gone.stdout)
  import socket
  (workdir / '.lock').write_text(json.dumps({'pid': dead_pid, 'host': socket.gethostname(),
                                             'started': 'earlier'}))
  result = run_main('--config=configs/digits.py', f'--workdir={workdir}', '--stages=teacher',
                    '--config.teacher.num_steps=2', own_process=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'taking over the stale lock' in result.stderr and str(dead_pid) in result.stderr
  # A live pid that is not the process that wrote the lock (pids are reused after a reboot or
  # in a new container): this test's own pid, with another process identity, is stale too.
  if os.path.exists(f'/proc/{os.getpid()}/stat'):
    (workdir / '.lock').write_text(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                               'started': 'earlier', 'process': 'other:1'}))
    result = run_main('--config=configs/digits.py', f'--workdir={workdir}', '--stages=teacher',
                      '--config.teacher.num_steps=2', own_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'taking over the stale lock' in result.stderr and str(os.getpid()) in result.stderr
  # A lock from another host is not judged from here: refused, with how to remove it.
  (workdir / '.lock').write_text(json.dumps({'pid': 1, 'host': 'elsewhere', 'started': 'x'}))
  assert_user_error(run_main('--config=configs/digits.py', f'--workdir={workdir}',
                             '--stages=teacher', '--config.teacher.num_steps=2',
                             own_process=True),
                    'host elsewhere', 'delete')


# ----------------------------------------------------------------------------
# Faults as one line


INJECT = """
import errno, os, sys
real = os.fsync
calls = [0]
def failing(fd):
  calls[0] += 1
  if calls[0] > {after}:
    raise OSError(errno.{code}, os.strerror(errno.{code}))
  return real(fd)
os.fsync = failing
from bnsynth_jax import main
sys.argv = ['bnsynth'] + sys.argv[1:]
main.run()
"""


@pytest.mark.parametrize('code,needle', [('ENOSPC', 'disk full'),
                                         ('EACCES', 'permission denied')])
def test_disk_full_or_permission_lost_is_one_line_and_resumes(tmp_path, code, needle):
  workdir = tmp_path / 'w'
  args = ['--config=configs/digits.py', f'--workdir={workdir}', '--stages=teacher',
          '--config.teacher.num_steps=4']
  env = dict(os.environ, PYTHONPATH=str(REPO))
  failed = subprocess.run([sys.executable, '-c', INJECT.format(after=2, code=code), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert failed.returncode == 1, failed.stderr[-3000:]
  errors = [l for l in failed.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and needle in errors[0] and 'run the same command again' in errors[0]
  assert 'Traceback' not in failed.stderr
  assert not list(workdir.rglob('.*.tmp-*')), 'a half-written temporary file was left'
  assert not (workdir / '.lock').exists()
  again = run_main(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (workdir / 'teacher' / 'manifest.json').exists()


def test_disk_full_on_a_real_small_filesystem(tmp_path):
  mnt = tmp_path / 'small'
  mnt.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=192k', 'tmpfs', str(mnt)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a size-limited tmpfs here (needs root and mount rights)')
  try:
    args = ['--config=configs/digits.py', f'--workdir={mnt / "w"}', '--stages=teacher',
            '--config.teacher.num_steps=4']
    full = run_main(*args, own_process=True)      # a fault ends its process (os._exit)
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.strip().splitlines()[-1].startswith('error: disk full'), full.stderr[-2000:]
    subprocess.run(['mount', '-o', 'remount,size=64m', str(mnt)], check=True)
    again = run_main(*args)
    assert again.returncode == 0, again.stderr[-3000:]
  finally:
    subprocess.run(['umount', '-l', str(mnt)])


def test_fault_messages_search_the_cause_chain():
  from bnsynth_jax import main
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device', '/w/teacher/checkpoints/3')
    except OSError as inner:
      raise ValueError('orbax save failed') from inner
  except ValueError as e:
    assert main.fault_message(e, '/w').startswith('disk full while writing /w/teacher')
  text = RuntimeError('RESOURCE_EXHAUSTED: Error writing "x": No space left')
  assert main.fault_message(text, '/w').startswith('disk full while writing /w')
  assert main.fault_message(ValueError('a bug'), '/w') is None


@pytest.mark.parametrize('sig,code,needle', [(signal.SIGTERM, 143, 'terminated (SIGTERM)'),
                                             (signal.SIGINT, 130, 'interrupted (Ctrl-C)')])
def test_ctrl_c_and_sigterm_say_how_to_resume(tmp_path, sig, code, needle):
  workdir = tmp_path / 'w'
  cmd = _digits_teacher(workdir, '--config.teacher.num_steps=400',
                        '--config.teacher.checkpoint_every_steps=20')
  proc = _popen(cmd)
  _wait_for(workdir / 'teacher' / 'checkpoints' / '20', proc)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(f'error: {needle}') and 'run the same command again' in last, err
  assert 'Traceback' not in err
  assert not (workdir / '.lock').exists()
  assert not list(workdir.rglob('.*.tmp-*'))
  resumed = run_main(*cmd[3:])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'teacher: resuming from step' in resumed.stderr


def test_an_interrupt_inside_an_atomic_write_waits_for_it(tmp_path):
  from bnsynth_jax import fileio
  target = tmp_path / 'f.json'
  with pytest.raises(KeyboardInterrupt):
    with fileio.deferred_signals():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
      fileio.atomic_write_json(target, {'complete': True})   # still runs
  assert json.loads(target.read_text()) == {'complete': True}
