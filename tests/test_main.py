"""The command line: the digits teacher end to end, and every bad input -> one line, exit 2."""

import json
import os

import pytest

from conftest import REPO, run_main, write_image_folder


def block_tensorflow(tmp_path):
  """A PYTHONPATH entry under which `import tensorflow` fails."""
  fake = tmp_path / 'no_tf'
  for name in ('tensorflow', 'tensorflow_datasets'):
    (fake / name).mkdir(parents=True, exist_ok=True)
    (fake / name / '__init__.py').write_text(
        f"raise ImportError('{name} is blocked in this test')\n")
  return {'PYTHONPATH': f'{fake}{os.pathsep}{REPO}'}


def test_digits_teacher_end_to_end_without_tensorflow(tmp_path):
  workdir = tmp_path / 'w'
  result = run_main('--config=configs/digits.py', f'--workdir={workdir}', '--stages=teacher',
                    env=block_tensorflow(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / 'report.json').read_text())
  assert report['teacher']['test_accuracy'] >= 0.985
  assert report['teacher']['train_seconds'] > 0
  assert (workdir / 'teacher' / 'manifest.json').exists()
  assert 'teacher test accuracy' in result.stdout
  # A second run finds the stage done and skips it.
  again = run_main('--config=configs/digits.py', f'--workdir={workdir}', '--stages=teacher',
                   env=block_tensorflow(tmp_path))
  assert again.returncode == 0 and 'done already' in again.stderr


def assert_user_error(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


def folder_args(root, workdir):
  return ('--config=configs/imagefolder.py', f'--config.data.root={root}',
          '--config.data.image_size=12', f'--workdir={workdir}', '--stages=teacher',
          '--config.teacher.num_steps=1', '--config.teacher.batch_size=8',
          '--config.teacher.eval_batch_size=8')


def outside_files(tmp_path, workdir):
  """Files under tmp_path that are neither the inputs nor inside the workdir."""
  return sorted(str(p) for p in tmp_path.rglob('*') if p.is_file()
                and workdir not in p.parents and 'images' not in p.parts)


@pytest.mark.parametrize('case', ['missing', 'empty', 'no_split', 'empty_class', 'corrupt'])
def test_bad_image_folder(tmp_path, case):
  root = tmp_path / 'images'
  needles = {'missing': ['does not exist'], 'empty': ['is empty'],
             'no_split': ["no 'train' split"], 'empty_class': ['has no images', 'fish'],
             'corrupt': ['cannot decode image', '3.png']}[case]
  if case == 'empty':
    root.mkdir()
  elif case == 'no_split':
    (root / 'training' / 'a').mkdir(parents=True)
  elif case in ('empty_class', 'corrupt'):
    write_image_folder(root)
    if case == 'empty_class':
      (root / 'train' / 'fish').mkdir(exist_ok=True)
      for f in (root / 'train' / 'fish').iterdir():
        f.unlink()
    else:
      (root / 'train' / 'dog' / '3.png').write_bytes(b'this is not a PNG')
  workdir = tmp_path / 'w'
  assert_user_error(run_main(*folder_args(root, workdir)), *needles)
  assert outside_files(tmp_path, workdir) == []


def test_unknown_config_key(tmp_path):
  assert_user_error(run_main('--config=configs/digits.py', f'--workdir={tmp_path / "w"}',
                             '--config.teacher.learnin_rate=0.1'), 'learnin_rate')
  assert not (tmp_path / 'w').exists()


def test_batch_not_divisible_by_devices(tmp_path):
  # conftest gives this process and its children 8 simulated devices.
  assert_user_error(run_main('--config=configs/digits.py', f'--workdir={tmp_path / "w"}',
                             '--config.teacher.batch_size=60'), 'not divisible', '8 devices')
  assert not (tmp_path / 'w').exists()


def test_workdir_with_a_different_config(tmp_path):
  workdir = tmp_path / 'w'
  base = ('--config=configs/digits.py', f'--workdir={workdir}', '--stages=teacher',
          '--config.teacher.num_steps=2')
  assert run_main(*base).returncode == 0
  before = (workdir / 'teacher' / 'variables.msgpack').read_bytes()
  assert_user_error(run_main(*base, '--config.teacher.learning_rate=0.05'),
                    'teacher.learning_rate', '--overwrite')
  assert (workdir / 'teacher' / 'variables.msgpack').read_bytes() == before
  ok = run_main(*base, '--config.teacher.learning_rate=0.05', '--overwrite')
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert (workdir / 'teacher' / 'variables.msgpack').read_bytes() != before
  # Keys that do not change results (logging cadence) may differ.
  assert run_main(*base, '--config.teacher.learning_rate=0.05',
                  '--config.teacher.log_every_steps=7').returncode == 0
  # A record from an older version lacks a newer key: fine at its default (the old
  # behaviour), a conflict at any other value.
  base = (*base, '--config.teacher.learning_rate=0.05')
  record = workdir / 'teacher' / 'stage_config.json'
  older = {k: v for k, v in json.loads(record.read_text()).items() if k != 'teacher.ema_decay'}
  record.write_text(json.dumps(older))
  assert run_main(*base).returncode == 0
  assert_user_error(run_main(*base, '--config.teacher.ema_decay=0.9'),
                    'teacher.ema_decay: (not recorded) -> 0.9', '--overwrite')


def test_teacher_init_from_starts_from_a_finished_teacher(tmp_path):
  import numpy as np
  import jax
  from bnsynth_jax import artifacts
  first = tmp_path / 'first'
  base = ('--config=configs/digits.py', '--stages=teacher', '--config.teacher.num_steps=3')
  assert run_main(*base, f'--workdir={first}').returncode == 0
  # Zero learning rate: the fine-tuned weights are exactly the starting teacher's.
  tuned = tmp_path / 'tuned'
  result = run_main(*base, f'--workdir={tuned}', f'--config.teacher.init_from={first}/teacher',
                    '--config.teacher.learning_rate=0', '--config.teacher.num_steps=1')
  assert result.returncode == 0, result.stderr[-3000:]
  _, start, _ = artifacts.load_model(first / 'teacher')
  _, end, manifest = artifacts.load_model(tuned / 'teacher')
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), start['params'], end['params'])
  assert all(jax.tree.leaves(same))
  assert manifest['init_from'] == f'{first}/teacher'
  # From scratch with the same zero learning rate the weights differ (a random init).
  scratch = tmp_path / 'scratch'
  assert run_main(*base, f'--workdir={scratch}', '--config.teacher.learning_rate=0',
                  '--config.teacher.num_steps=1', '--config.seed=5').returncode == 0
  _, fresh, _ = artifacts.load_model(scratch / 'teacher')
  assert not np.array_equal(jax.tree.leaves(fresh['params'])[0],
                            jax.tree.leaves(start['params'])[0])
  # Misuse: both import and fine-tune; a different architecture.
  assert_user_error(run_main(*base, f'--workdir={tmp_path / "a"}',
                             f'--config.teacher.init_from={first}/teacher',
                             f'--config.teacher.pretrained={first}/teacher'), 'set only one')
  assert_user_error(run_main(*base, f'--workdir={tmp_path / "b"}',
                             f'--config.teacher.init_from={first}/teacher',
                             '--config.model.name=resnet20'), 'model.name', 'resnet8')


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('a file, not a folder')
  assert_user_error(run_main('--config=configs/digits.py', f'--workdir={blocker}/w'),
                    'not writable')


def test_every_stage_end_to_end_on_digits(tmp_path):
  workdir = tmp_path / 'w'
  result = run_main(
      '--config=configs/digits.py', f'--workdir={workdir}',
      '--config.teacher.num_steps=60', '--config.synthesis.images_per_class=8',
      '--config.synthesis.batch_size=40', '--config.synthesis.iterations=20',
      '--config.synthesis.view_epochs=3', '--config.student.epochs=3',
      '--config.student.batch_size=16', '--config.audit.reference_models=1',
      '--config.audit.reference_epochs=2', '--config.audit.bootstrap=10',
      env=block_tensorflow(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / 'report.json').read_text())
  for key in ('teacher.test_accuracy', 'stats.kind', 'synthesis.teacher_agreement',
              'synthesis.bn_loss_final', 'evaluate.synthetic.test_accuracy',
              'evaluate.real_subset.test_accuracy', 'evaluate.ratio', 'audit.nn_ssim.p99',
              'audit.dcr.holdout_p01', 'audit.mia.student.auc', 'audit.mia.teacher.auc',
              'audit.mia.teacher.tpr_at_0p1pct_fpr', 'timings.audit_seconds',
              'environment.packages.jax', 'config.synthesis.iterations'):
    node = report
    for part in key.split('.'):
      node = node[part]
    assert node is not None, key
  assert 0 <= report['evaluate']['synthetic']['test_accuracy'] <= 1
  assert report['student']['synthetic']['labels'] == 'views'
  md = (workdir / 'report.md').read_text()
  assert 'ratio to real subset' in md and 'synthetic/samples.png' in md
  for picture in ('synthetic/samples.png', 'audit/most_similar.png', 'audit/random_pairs.png',
                  'audit/roc.png', 'audit/dcr.png'):
    assert (workdir / picture).stat().st_size > 0, picture
  assert 'ratio to real subset' in result.stdout      # the table is printed at the end


def test_student_seed_retrains_on_the_same_synthetic_set(tmp_path):
  """--config.student.seed=S gives another student (batch order, initialisation) on the
  same synthetic images, for seed-to-seed spread."""
  import shutil
  tiny = ('--config=configs/digits.py', '--config.model.name=resnet_tiny',
          '--config.student.model.name=resnet_tiny', '--config.teacher.num_steps=2',
          '--config.synthesis.images_per_class=4', '--config.synthesis.batch_size=40',
          '--config.synthesis.iterations=2',
          '--config.synthesis.view_epochs=1', '--config.student.epochs=1',
          '--config.student.batch_size=8')
  first = run_main(*tiny, f'--workdir={tmp_path / "a"}',
                   '--stages=teacher,stats,synthesize,student')
  assert first.returncode == 0, first.stderr[-3000:]
  shutil.copytree(tmp_path / 'a', tmp_path / 'b', ignore=shutil.ignore_patterns('student'))
  second = run_main(*tiny, f'--workdir={tmp_path / "b"}', '--stages=student',
                    '--config.student.seed=1')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'stage synthesize' not in second.stderr
  a, b = (json.loads((tmp_path / w / 'student' / 'synthetic' / 'manifest.json').read_text())
          for w in ('a', 'b'))
  assert a['variables_sha256'] != b['variables_sha256']
  recorded = json.loads((tmp_path / 'b' / 'student' / 'stage_config.json').read_text())
  assert recorded['student.seed'] == 1 and recorded['seed'] == 0


def test_synthesis_reuse_from_grows_and_shrinks_a_set_bit_for_bit(tmp_path):
  """synthesis.reuse_from copies the batches another image count already computed: the
  grown set equals one made from scratch, byte for byte; other settings are refused."""
  import shutil
  tiny = ('--config=configs/digits.py', '--config.model.name=resnet_tiny',
          '--config.teacher.num_steps=2', '--config.synthesis.batch_size=40',
          '--config.synthesis.iterations=3', '--config.synthesis.view_epochs=1')
  shards = lambda w: {p.name: p.read_bytes() for p in (w / 'synthetic' / 'shards').iterdir()}
  small = tmp_path / 'small'
  first = run_main(*tiny, f'--workdir={small}', '--stages=teacher,stats,synthesize',
                   '--config.synthesis.images_per_class=4')          # 1 batch
  assert first.returncode == 0, first.stderr[-3000:]

  def copy_inputs(name):
    shutil.copytree(small, tmp_path / name, ignore=shutil.ignore_patterns('synthetic'))
    return tmp_path / name

  fresh, grown, shrunk = copy_inputs('fresh'), copy_inputs('grown'), copy_inputs('shrunk')
  assert run_main(*tiny, f'--workdir={fresh}', '--stages=synthesize',
                  '--config.synthesis.images_per_class=12').returncode == 0     # 3 batches
  result = run_main(*tiny, f'--workdir={grown}', '--stages=synthesize',
                    '--config.synthesis.images_per_class=12',
                    f'--config.synthesis.reuse_from={small}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'reused 1 of 3 batches' in result.stderr
  assert sorted(shards(grown)) == ['shard-00000.npz', 'shard-00001.npz', 'shard-00002.npz']
  assert shards(grown) == shards(fresh)            # the grown set is the from-scratch set
  summary = json.loads((grown / 'report.json').read_text())['synthesis']
  assert summary['reused_batches'] == 1 and summary['num_images'] == 120
  # Shrinking takes the first batches of a larger set: nothing left to compute.
  result = run_main(*tiny, f'--workdir={shrunk}', '--stages=synthesize',
                    '--config.synthesis.images_per_class=4',
                    f'--config.synthesis.reuse_from={fresh}/synthetic')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'reused 1 of 1 batches' in result.stderr and 'iteration' not in result.stderr
  assert shards(shrunk) == shards(small)
  # Another setting, or a folder with no synthesis: one line, nothing written.
  other = copy_inputs('other')
  assert_user_error(run_main(*tiny, f'--workdir={other}', '--stages=synthesize',
                             '--config.synthesis.images_per_class=12',
                             '--config.synthesis.learning_rate=0.05',
                             f'--config.synthesis.reuse_from={small}'),
                    'other settings', 'synthesis.learning_rate')
  assert not (other / 'synthetic').exists()      # refused before the stage recorded anything
  assert_user_error(run_main(*tiny, f'--workdir={other}', '--stages=synthesize',
                             f'--config.synthesis.reuse_from={tmp_path / "nowhere"}'),
                    'holds no synthesis')
  shard = small / 'synthetic' / 'shards' / 'shard-00000.npz'     # a source altered since
  data = bytearray(shard.read_bytes())
  data[-100] ^= 0xFF
  shard.write_bytes(bytes(data))
  again = copy_inputs('again')
  assert_user_error(run_main(*tiny, f'--workdir={again}', '--stages=synthesize',
                             '--config.synthesis.images_per_class=12',
                             f'--config.synthesis.reuse_from={small}'), 'was altered')
  assert not (again / 'synthetic' / 'shards').exists()


def test_stages_after_stats_do_not_see_the_private_data_location():
  from bnsynth_jax import config_lib, pipeline
  config = config_lib.default_config()
  config.data.root = '/secret/private/images'
  public = pipeline.public_config(config)
  assert set(public.data.keys()) == {'num_partitions'}
  assert '/secret' not in public.to_json()
  assert public.synthesis.iterations == config.synthesis.iterations
