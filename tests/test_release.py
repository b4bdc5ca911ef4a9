"""DP mode as a data owner signs it: what is handed out holds nothing but the two releases.

One tiny DP pipeline (secret randomness, as a user runs it) is shared by the tests that only
read it (`dp_run`, module scope); tests that change a workdir copy it first.
"""

import json
import shutil

import numpy as np
import pytest

from conftest import run_main

# The tests of the DP pipeline's outputs (the `dp_run` fixture) check this package's logic;
# the jax-privacy, dp-accounting and orbax calls under them have their own `versions` tests
# (test_privacy.py, test_train.py, test_resume_and_boundary.py). The accounting ones here
# run on both jax ends.

# Given explicitly: DP mode refuses to derive them from the private data.
DP_ARGS = ('--config=configs/digits.py', '--config.model.norm=group',
           '--config.model.name=resnet_tiny', '--config.student.model.name=resnet_tiny',
           '--config.privacy.epsilon=8', '--config.teacher.num_steps=6',
           '--config.teacher.batch_size=128', '--config.teacher.log_every_steps=2',
           '--config.teacher.checkpoint_every_steps=3',
           '--config.synthesis.images_per_class=4', '--config.synthesis.batch_size=40',
           '--config.synthesis.iterations=3', '--config.synthesis.view_epochs=1',
           '--config.student.epochs=1', '--config.student.batch_size=8')
GIVEN = {'synthesis.images_per_class': 4, 'teacher.batch_size': 128}
FIXED_NOISE = ('--config.privacy.teacher_noise_multiplier=2',     # epsilon ~2.4
               '--config.privacy.stats_noise_multiplier=4')

# What a file handed out may not hold: unprotected results, training traces, secrets.
FORBIDDEN_KEYS = {'test_accuracy', 'test_loss', 'train_seconds', 'train_loss', 'train_accuracy',
                  'history', 'loss', 'accuracy', 'secret', 'noise_key', 'real_subset',
                  'full_real', 'audit', 'evaluate', 'teacher_test_accuracy'}
FORBIDDEN_NAMES = ('seed', 'secret', 'key', 'checkpoint', 'metrics', 'progress', 'members',
                   'tensorboard', 'events')


@pytest.fixture(scope='module')
def dp_run(tmp_path_factory):
  """Teacher first (a resumed run must keep the calibrated noise and public normalisation),
  then the rest with the real-subset baseline; then the export."""
  root = tmp_path_factory.mktemp('dp')
  workdir = root / 'w'
  args = (*DP_ARGS, f'--workdir={workdir}')
  # Fixed noise for the teacher run (calibration is tested in test_privacy.py and costs a
  # minute here); the later runs leave it at 0 and must take it from the teacher's record.
  first = run_main(*args, *FIXED_NOISE, '--stages=teacher')
  assert first.returncode == 0, first.stderr[-3000:]
  rest = run_main(*args, '--stages=teacher,stats,synthesize,student,evaluate',
                  '--config.evaluate.real_subset=True')
  assert rest.returncode == 0, rest.stderr[-3000:]
  from bnsynth_jax import synthetic_data
  synthetic_data.export_image_folder(workdir / 'synthetic', root / 'export')
  return {'workdir': workdir, 'export': root / 'export', 'logs': first.stderr + rest.stderr,
          'args': args}


def handed_out(run):
  """Exactly what the README says to give a third party: teacher/, stats/, the export and
  the releasable report."""
  w = run['workdir']
  files = [p for d in (w / 'teacher', w / 'stats', run['export']) for p in d.rglob('*')
           if p.is_file()]
  return files + [w / 'release_report.md', w / 'release_report.json']


def json_keys(node, prefix=''):
  if isinstance(node, dict):
    for k, v in node.items():
      yield f'{prefix}{k}'
      yield from json_keys(v, f'{prefix}{k}.')
  elif isinstance(node, list):
    for v in node:
      yield from json_keys(v, prefix)


def test_the_folders_handed_out_hold_only_the_two_releases(dp_run):
  files = handed_out(dp_run)
  names = sorted({p.name for p in files if not p.suffix == '.png'})
  assert names == ['manifest.json', 'release.json', 'release_report.json', 'release_report.md',
                   'stage_config.json', 'statistics.msgpack', 'variables.msgpack', 'views.npz']
  for p in files:
    assert not p.name.startswith('.'), p
    assert not any(word in p.name.lower() for word in FORBIDDEN_NAMES), p
    if p.suffix == '.json':
      record = json.loads(p.read_text())
      leaves = {k.split('.')[-1] for k in json_keys(record)}
      assert not leaves & FORBIDDEN_KEYS, (p, leaves & FORBIDDEN_KEYS)
      privacy = record.get('privacy') or {}
      if privacy:
        assert privacy['private'] is True, p
      if p.name == 'stage_config.json':
        assert record['privacy.noise_seed'] == 0, p
        for key, value in GIVEN.items():     # the preflight derived nothing from the data
          if key in record:
            assert record[key] == value, (p, key)
        assert record['data.mean'] == [0.5] and record['data.std'] == [0.5]  # public
  # The statistics' class counts went through the Gaussian mechanism: no exact counts.
  from bnsynth_jax import artifacts
  stats, _ = artifacts.load_statistics(dp_run['workdir'] / 'stats')
  counts = np.asarray(stats['class_counts'], np.float64)
  assert np.all(np.abs(counts - np.round(counts)) > 1e-6), counts
  md = (dp_run['workdir'] / 'release_report.md').read_text()
  assert 'Releasable' in md and 'training split' in md and 'test accuracy' not in md.lower()


def test_no_secret_or_training_state_survives_the_run(dp_run):
  w = dp_run['workdir']
  secrets = [p for p in w.rglob('*') if p.is_file() and (
      'seed' in p.name or 'secret' in str(p.relative_to(w)))]
  assert secrets == []
  # The DP teacher's training state (its optimiser state holds the noise key) is gone; the
  # public student's and the owner's real-data baseline's checkpoints are not secret.
  dp_state = [p for d in ('teacher', 'stats', '.owner') for p in (w / d).rglob('*')
              if 'checkpoints' in p.parts or p.name == 'progress.json']
  assert dp_state == []
  owner = w / '.owner'
  assert owner.stat().st_mode & 0o077 == 0                    # owner-only
  assert (owner / 'teacher' / 'metrics.json').exists()        # the owner keeps the test curve
  assert not (w / 'teacher' / 'metrics.json').exists()
  owner_md = (w / 'report.md').read_text()
  assert 'Owner only' in owner_md and 'real subset' in owner_md.lower()


def test_statistics_noise_is_fresh_each_time_and_kept_nowhere(dp_run, tmp_path):
  """The same teacher and config, the statistics stage run again: different noise (it was
  drawn from the OS and not stored, so the released sums cannot be de-noised)."""
  again = tmp_path / 'again'
  shutil.copytree(dp_run['workdir'], again, ignore=shutil.ignore_patterns(
      'stats', 'synthetic', 'student', 'evaluate', 'privacy_ledger.json'))
  args = [a for a in dp_run['args'] if not a.startswith('--workdir')]
  result = run_main(*args, f'--workdir={again}', '--stages=stats')
  assert result.returncode == 0, result.stderr[-3000:]
  first = (dp_run['workdir'] / 'stats' / 'statistics.msgpack').read_bytes()
  assert (again / 'stats' / 'statistics.msgpack').read_bytes() != first
  assert not list((again / 'stats').glob('.*'))


def test_dp_logs_and_tensorboard_hold_no_private_batch_statistics(dp_run):
  logs = dp_run['logs']
  step_lines = [l for l in logs.splitlines() if 'teacher: step' in l and 'img/s' in l]
  assert step_lines and not any('loss' in l or 'accuracy' in l for l in step_lines), step_lines
  assert 'were clipped' not in logs        # the clipped count is an unnoised statistic
  teacher_events = [e for e in dp_run['workdir'].rglob('events.out.tfevents*')
                    if 'teacher' in e.parts]
  assert teacher_events and all('.owner' in e.parts for e in teacher_events)  # owner's curves
  tags = set().union(*map(event_tags, teacher_events))
  assert 'learning_rate' in tags and not {'train_loss', 'train_accuracy'} & tags, tags


def event_tags(events) -> set:
  """The scalar tags of one TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  data, offset, tags = events.read_bytes(), 0, set()
  while offset + 12 <= len(data):
    length = int.from_bytes(data[offset:offset + 8], 'little')
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    tags |= {v.tag for v in event.summary.value}
    offset += 12 + length + 4
  return tags


def test_every_dp_record_and_the_report_carry_the_budget(dp_run):
  w = dp_run['workdir']
  report = json.loads((w / 'report.json').read_text())
  p = report['privacy']
  assert 0 < p['epsilon'] <= 8 and p['delta'] == 1e-5 and 'PLD' in p['accountant']
  assert p['teacher']['noise_multiplier'] > 0 and p['stats']['noise_multiplier'] > 0
  assert p['stats']['clip_norm'] > 0                        # the bound actually applied
  for manifest in ('teacher/manifest.json', 'stats/manifest.json', 'synthetic/manifest.json',
                   'student/synthetic/manifest.json'):
    got = json.loads((w / manifest).read_text())['privacy']
    assert got['epsilon'] == pytest.approx(p['epsilon']), manifest
  assert report['config']['data']['mean'] == [0.5]          # public normalisation
  # The second run (teacher done, noise multipliers left at 0) took the teacher's recorded
  # ones, and its statistics used them.
  assert report['config']['privacy']['stats_noise_multiplier'] == 4.0
  assert p['stats']['noise_multiplier'] == 4.0 and p['teacher']['noise_multiplier'] == 2.0
  ledger = json.loads((w / 'privacy_ledger.json').read_text())
  assert [r['stage'] for r in ledger['releases']] == ['teacher', 'stats']
  assert ledger['cumulative']['epsilon'] == pytest.approx(p['epsilon'], rel=1e-3)
  md = (w / 'report.md').read_text()
  assert '(epsilon' in md and 'post-processing' in md and 'cumulative' in md


def test_a_synthesis_of_a_handed_out_release_reports_its_budget(dp_run, tmp_path):
  """A workdir that post-processes another's DP release (synthesis.teacher_dir / stats_dir)
  reports that release's (epsilon, delta) and names it, never 'not differentially
  private', and writes the releasable report."""
  w, third = dp_run['workdir'], tmp_path / 'third'
  result = run_main(*dp_run['args'][:-1], f'--workdir={third}', '--stages=synthesize',
                    f'--config.synthesis.teacher_dir={w / "teacher"}',
                    f'--config.synthesis.stats_dir={w / "stats"}')
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads((third / 'report.json').read_text())['privacy']
  source = json.loads((w / 'stats' / 'manifest.json').read_text())['privacy']
  assert got['epsilon'] == source['epsilon'] and got['inherited_from'] == str(w / 'stats')
  md = (third / 'report.md').read_text()
  assert 'not differentially private' not in md
  assert f'post-processes the DP release of {w / "stats"}' in md
  assert 'Releasable' in (third / 'release_report.md').read_text()


def test_overwriting_a_dp_stage_is_refused_unless_the_cumulative_spend_is_accepted(dp_run,
                                                                                     tmp_path):
  w = tmp_path / 'w'
  shutil.copytree(dp_run['workdir'], w)
  args = [a for a in dp_run['args'] if not a.startswith('--workdir')] + [
      f'--workdir={w}', '--stages=teacher,stats', '--config.teacher.learning_rate=0.05',
      *FIXED_NOISE, '--overwrite']
  refused = run_main(*args)
  assert refused.returncode == 2, refused.stderr[-3000:]
  error = [l for l in refused.stderr.splitlines() if l.startswith('error: ')]
  assert len(error) == 1 and 'accept_cumulative_epsilon' in error[0], refused.stderr[-3000:]
  assert (w / 'teacher' / 'manifest.json').exists()          # nothing was cleared
  total = float(error[0].split('accept_cumulative_epsilon=')[1].split()[0])
  assert total > json.loads((w / 'report.json').read_text())['privacy']['epsilon']
  accepted = run_main(*args, f'--config.privacy.accept_cumulative_epsilon={total}')
  assert accepted.returncode == 0, accepted.stderr[-3000:]
  ledger = json.loads((w / 'privacy_ledger.json').read_text())
  assert [r['stage'] for r in ledger['releases']] == ['teacher', 'stats', 'teacher', 'stats']
  assert ledger['cumulative']['epsilon'] == pytest.approx(total, rel=1e-3)
  assert list((w / '.owner').rglob('checkpoints')) == []
  assert 'cumulative' in json.loads((w / 'report.json').read_text())['privacy']


@pytest.mark.parametrize('override, needle', [
    ('--config.synthesis.images_per_class=0', 'synthesis.images_per_class=0 would come from'),
    ('--config.teacher.batch_size=0', 'teacher.batch_size=0 would be derived'),
])
def test_dp_mode_refuses_values_derived_from_the_private_data(tmp_path, override, needle):
  from bnsynth_jax import pipeline, preflight
  config = _dp_config()
  section, key = override.split('--config.')[1].split('=')[0].split('.')
  config[section][key] = 0
  with pytest.raises(preflight.PreflightError) as e:
    pipeline.prepare(config, str(tmp_path / 'w'), 'teacher,stats,synthesize')
  assert any(needle in p and 'DP mode' in p for p in e.value.problems), e.value.problems
  assert not (tmp_path / 'w').exists()


def test_dp_mode_refuses_an_image_folder_without_a_given_size_and_channels(tmp_path):
  from conftest import write_image_folder
  from bnsynth_jax import pipeline, preflight
  config = _dp_config()
  config.data.source = 'imagefolder'
  config.data.root = str(write_image_folder(tmp_path / 'images', per_class=8))
  config.synthesis.batch_size = 12
  config.teacher.batch_size = 8
  with pytest.raises(preflight.PreflightError) as e:
    pipeline.prepare(config, str(tmp_path / 'w'), 'teacher')
  got = ' '.join(e.value.problems)
  assert 'data.image_size=0 would be read from a private file' in got
  assert 'data.channels=0 would be read from private files' in got
  config.data.image_size, config.data.channels = 12, 3
  pipeline.prepare(config, str(tmp_path / 'w'), 'teacher')     # given: accepted


def _dp_config():
  from bnsynth_jax.configs import digits
  config = digits.get_config()
  config.model.norm = 'group'
  config.model.name = 'resnet_tiny'
  config.privacy.epsilon = 8.0
  config.privacy.teacher_noise_multiplier = 2.0     # epsilon ~2.4, no calibration to wait for
  config.privacy.stats_noise_multiplier = 4.0
  config.teacher.batch_size = 128
  config.teacher.num_steps = 6
  config.synthesis.images_per_class = 4
  config.synthesis.batch_size = 40
  return config


@pytest.mark.versions
def test_dp_sgd_draws_from_the_whole_split_whatever_the_partitions_and_processes(tmp_path):
  """Strided partitions of a sorted listing: one replaced record moves others between
  partitions, so per-partition sampling would depend on the data order. DP-SGD draws from
  the whole split on every process: replacing one record changes no other record's pool,
  the draw is the same, and 2 processes' slices make the 1-process batch."""
  from PIL import Image
  from bnsynth_jax import privacy, sources
  from conftest import write_image_folder
  root = write_image_folder(tmp_path / 'images', per_class=10, size=4)
  config = _dp_config()
  config.data.update(source='imagefolder', root=str(root), num_partitions=2)

  def process_view(process_index, process_count):
    """(DP-SGD batches, this process's strided partition) of process p of 2."""
    data = sources.PrivateData(config.data)
    data.partition_ids = [process_index]
    batches = privacy.WholeSplitBatches(
        data.whole_split('train'), data.split_size('train'), 8, seed=11,
        process_index=process_index, process_count=process_count)
    return batches, {im.tobytes() for part in data.split('train') for im in part.images}

  one, partition0 = process_view(0, 1)
  halves = [process_view(p, 2)[0] for p in (0, 1)]
  for step in (0, 3, 17):
    np.testing.assert_array_equal(
        np.concatenate([h.get(step)['images'] for h in halves]), one.get(step)['images'])
  # Replace one record by a changed copy under a name that sorts first.
  victim = root / 'train' / 'fish' / '7.png'
  changed = np.asarray(Image.open(victim)).copy()
  changed[0, 0] = 255 - changed[0, 0]
  victim.unlink()
  Image.fromarray(changed).save(root / 'train' / 'cat' / '0-replacement.png')
  after, partition0_after = process_view(0, 1)
  pool, pool_after = ({im.tobytes() for im in b.images} for b in (one, after))
  assert len(pool - pool_after) == 1 and len(pool_after - pool) == 1   # only that record
  for step in (0, 3, 17):
    np.testing.assert_array_equal(one.global_indices(step), after.global_indices(step))
  # What the old per-partition sampling did: other records changed partition.
  assert (partition0 - partition0_after) - (pool - pool_after)


@pytest.mark.versions
def test_a_fixed_noise_seed_is_recorded_as_not_private():
  from bnsynth_jax import privacy
  config = _dp_config()
  assert privacy.plan(config, 1438)['private'] is True
  config.privacy.noise_seed = 3
  record = privacy.plan(config, 1438)
  assert record['private'] is False and 'noise_seed' in record['not_private_because']


@pytest.mark.versions
def test_the_dp_noise_key_has_64_secret_bits():
  from bnsynth_jax import privacy
  a, b = privacy.noise_key(2**100 + 5), privacy.noise_key(2**100 + 5 + 2**40)
  assert a.dtype == np.uint32 and a.shape == (2,)
  assert not np.array_equal(np.asarray(a), np.asarray(b))      # high bits of the key matter
  assert int(np.asarray(privacy.noise_key(2**63))[0]) == 2**31


@pytest.mark.versions
def test_the_ledger_composes_every_release_and_refuses_an_unaccepted_one(tmp_path):
  from bnsynth_jax import ledger, privacy
  from bnsynth_jax.errors import UserError
  config = _dp_config()
  record = privacy.plan(config, 1438)
  for stage in ('teacher', 'stats'):
    release = ledger.release_id(stage, {ledger.RELEASE_HASH[stage]: f'{stage}-hash'})
    ledger.record(tmp_path, stage, record, release)
    ledger.record(tmp_path, stage, record, release)   # the same release: recorded once
  assert len(ledger.load(tmp_path)) == 2
  assert ledger.summarize(ledger.load(tmp_path), 1e-5)['epsilon'] == pytest.approx(
      record['epsilon'], rel=1e-3)
  ledger.check_new_releases(tmp_path, ['synthesize'], record, 0.0)     # not a release
  with pytest.raises(UserError, match='accept_cumulative_epsilon') as e:
    ledger.check_new_releases(tmp_path, ['stats'], record, 0.0)
  total = float(str(e.value).split('accept_cumulative_epsilon=')[1].split()[0])
  assert record['epsilon'] < total < 2 * record['epsilon']
  ledger.check_new_releases(tmp_path, ['stats'], record, total)     # the value it printed


def test_replacing_an_unfinished_dp_teacher_forgets_its_secret_and_steps(tmp_path):
  """--overwrite of a killed DP teacher: the new run must neither resume the old steps nor
  reuse the old randomness (both live in .owner/, outside the stage folder it clears)."""
  from bnsynth_jax import owner, pipeline
  first = owner.stage_secret(tmp_path, 'teacher')
  (owner.training_dir(tmp_path, 'teacher') / 'checkpoints' / '3').mkdir(parents=True)
  assert owner.stage_secret(tmp_path, 'teacher') == first          # a resume keeps it
  pipeline.clear_stage(tmp_path, 'teacher')
  assert not (tmp_path / '.owner' / 'teacher').exists()
  assert owner.stage_secret(tmp_path, 'teacher') != first
