"""Whole-stage behaviour through the command line: kill -9 + resume, and the data boundary."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_main, write_image_folder

SYNTH = ('--config.synthesis.images_per_class=8', '--config.synthesis.batch_size=16',
         '--config.synthesis.iterations=30', '--config.synthesis.checkpoint_every_iterations=7',
         '--config.synthesis.log_every_iterations=10')


@pytest.fixture(scope='module')
def digits_stats_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('digits') / 'w'
  result = run_main('--config=configs/digits.py', f'--workdir={workdir}',
                    '--stages=teacher,stats', '--config.teacher.num_steps=40')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def dataset_files(synthetic_dir):
  files = sorted(p.relative_to(synthetic_dir) for p in synthetic_dir.rglob('*') if p.is_file())
  return [f for f in files if f.name not in ('timings.json', 'metrics.json', 'run_info.json')]


@pytest.mark.parametrize('method', [pytest.param('pixels', marks=pytest.mark.versions),
                                    'generator'])
def test_kill9_and_resume_is_byte_identical(digits_stats_workdir, tmp_path, method):
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  shutil.copytree(digits_stats_workdir, straight)
  shutil.copytree(digits_stats_workdir, killed)
  args = ('--config=configs/digits.py', '--stages=synthesize', *SYNTH,
          f'--config.synthesis.method={method}')
  if method == 'generator':   # two batches of 40, 30 steps each (killed mid-batch after 7)
    args += ('--config.synthesis.batch_size=40', '--config.synthesis.generator.steps=30',
             '--config.synthesis.generator.width=4', '--config.synthesis.generator.latent_dim=8')
  assert run_main(*args, f'--workdir={straight}').returncode == 0

  env = dict(os.environ, PYTHONPATH=str(REPO))
  triggers = [killed / 'synthetic' / 'inflight' / 'batch-00001',     # mid-batch
              killed / 'synthetic' / 'shards' / 'shard-00003.npz']   # between batches
  if method == 'generator':   # between a batch's next initialisation and its shard, mid-batch
    triggers = [killed / 'synthetic' / 'generator' / 'init_00000.msgpack',
                killed / 'synthetic' / 'inflight' / 'batch-00001']
  for trigger in triggers:
    proc = subprocess.Popen([sys.executable, '-m', 'bnsynth_jax.main', *args,
                             f'--workdir={killed}'], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not trigger.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    assert proc.poll() is None, 'the run finished before it could be killed'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  assert not (killed / 'synthetic' / 'manifest.json').exists()
  # A kill inside an atomic write leaves its temporary: planted here, so the clean-up is
  # tested whichever instant the kills above landed on.
  (killed / 'synthetic' / 'shards').mkdir(parents=True, exist_ok=True)
  (killed / 'synthetic' / 'shards' / '.shard-00000.npz.tmp-0123abcd').write_bytes(b'half')
  resumed = run_main(*args, f'--workdir={killed}')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resum' in resumed.stderr and 'temporary file(s) a killed run left' in resumed.stderr
  a, b = straight / 'synthetic', killed / 'synthetic'
  assert dataset_files(a) == dataset_files(b)
  assert any(str(f).startswith('shards') for f in dataset_files(a))
  for f in dataset_files(a):
    assert filecmp.cmp(a / f, b / f, shallow=False), f'{f} differs after kill -9 + resume'


def test_synthesis_needs_no_private_data(tmp_path):
  images = write_image_folder(tmp_path / 'private', per_class=8)
  workdir = tmp_path / 'w'
  common = ('--config=configs/imagefolder.py', f'--config.data.root={images}',
            '--config.data.image_size=12', '--config.model.name=resnet_tiny',
            '--config.teacher.num_steps=4', '--config.teacher.batch_size=8',
            '--config.teacher.eval_batch_size=8', '--config.stats.batch_size=8',
            '--config.synthesis.images_per_class=8', '--config.synthesis.batch_size=8',
            '--config.synthesis.iterations=4')
  assert run_main(*common, f'--workdir={workdir}', '--stages=teacher,stats').returncode == 0
  shutil.rmtree(images)                      # the private images are gone
  result = run_main(*common, f'--workdir={workdir}', '--stages=stats,synthesize')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / 'report.json').read_text())
  assert report['synthesis']['num_images'] == 24 and report['stats']['kind'] == 'classwise'

  # A third party holding only the two artifacts synthesises in a workdir of its own.
  received = tmp_path / 'received'
  shutil.copytree(workdir / 'teacher', received / 'teacher',
                  ignore=shutil.ignore_patterns('checkpoints'))
  shutil.copytree(workdir / 'stats', received / 'stats')
  third = run_main(*common, f'--workdir={tmp_path / "third"}', '--stages=synthesize',
                   f'--config.synthesis.teacher_dir={received / "teacher"}',
                   f'--config.synthesis.stats_dir={received / "stats"}')
  assert third.returncode == 0, third.stderr[-3000:]
  assert (tmp_path / 'third' / 'synthetic' / 'manifest.json').exists()

  # Global statistics come from the teacher alone: the stats stage needs no images either.
  glob = run_main(*common, f'--workdir={tmp_path / "g"}', '--stages=stats,synthesize',
                  '--config.stats.kind=global',
                  f'--config.synthesis.teacher_dir={received / "teacher"}')
  # (the global run has no teacher stage of its own: it must fail cleanly, naming the fix)
  assert glob.returncode == 2 and 'teacher' in glob.stderr.splitlines()[-1]
  shutil.copytree(received / 'teacher', tmp_path / 'g' / 'teacher')
  glob = run_main(*common, f'--workdir={tmp_path / "g"}', '--stages=stats,synthesize',
                  '--config.stats.kind=global')
  assert glob.returncode == 0, glob.stderr[-3000:]


def test_statistics_of_another_teacher_are_refused(tmp_path, digits_stats_workdir):
  other = tmp_path / 'other'
  assert run_main('--config=configs/digits.py', f'--workdir={other}', '--stages=teacher',
                  '--config.teacher.num_steps=3', '--config.seed=5').returncode == 0
  result = run_main('--config=configs/digits.py', f'--workdir={tmp_path / "x"}',
                    '--stages=synthesize', f'--config.synthesis.teacher_dir={other / "teacher"}',
                    f'--config.synthesis.stats_dir={digits_stats_workdir / "stats"}', *SYNTH)
  assert result.returncode == 2
  assert 'teacher sha256' in result.stderr.splitlines()[-1]


def test_a_finished_synthesis_is_not_reused_for_another_teacher(tmp_path, digits_stats_workdir):
  """The synthesis stage records the sha256 of the teacher and statistics it was made from
  (stage_config inputs.*): pointing a finished workdir at other artifacts is refused, and
  --overwrite redoes it, instead of silently keeping images of the old teacher."""
  other = tmp_path / 'other'
  assert run_main('--config=configs/digits.py', f'--workdir={other}', '--stages=teacher,stats',
                  '--config.teacher.num_steps=3', '--config.seed=5').returncode == 0
  workdir = tmp_path / 'w'
  first = ('--config=configs/digits.py', f'--workdir={workdir}', '--stages=synthesize',
           *SYNTH, '--config.synthesis.iterations=2')
  done = run_main(*first, f'--config.synthesis.teacher_dir={digits_stats_workdir / "teacher"}',
                  f'--config.synthesis.stats_dir={digits_stats_workdir / "stats"}')
  assert done.returncode == 0, done.stderr[-3000:]
  changed = (f'--config.synthesis.teacher_dir={other / "teacher"}',
             f'--config.synthesis.stats_dir={other / "stats"}')
  refused = run_main(*first, *changed)
  assert refused.returncode == 2
  last = refused.stderr.strip().splitlines()[-1]
  assert 'inputs.teacher_sha256' in last and '--overwrite' in last, last
  redone = run_main(*first, *changed, '--overwrite')
  assert redone.returncode == 0, redone.stderr[-3000:]
  recorded = json.loads((workdir / 'synthetic' / 'stage_config.json').read_text())
  teacher = json.loads((other / 'teacher' / 'manifest.json').read_text())
  assert recorded['inputs.teacher_sha256'] == teacher['variables_sha256']

