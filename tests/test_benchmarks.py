"""The benchmark scripts: throughput.py runs end to end on tiny models and writes sane
rows; the others read finished runs into rows."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


def test_throughput_benchmark_rows(tmp_path):
  out = tmp_path / 'throughput.json'
  torch_flag = ['--torch'] if importlib.util.find_spec('torch') else []
  result = subprocess.run(
      [sys.executable, 'benchmarks/throughput.py', '--models=resnet20', '--batch_sizes=8',
       '--kinds=synthesis,train', '--steps=1', '--repeats=2', '--warmup=1', '--no_results_md',
       f'--out={out}', *torch_flag], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  assert [r['kind'] for r in rows] == ['synthesis', 'train']
  for r in rows:
    assert r['per_second'] > 0 and r['seconds_per_step'] > 0
  # XLA's FLOP count against the known cost of ResNet-20: about 41 M multiply-adds per
  # 32x32 image forward, so ~0.08 GFLOP forward and ~3x that for a training step (forward,
  # input and weight gradients): 8 images -> ~1.9 GFLOP. A wrong model, batch or cost
  # analysis lands far outside these bounds.
  train_row = rows[1]
  assert 1.0e9 < train_row['flops_per_step'] < 4.0e9, train_row['flops_per_step']
  assert 0.3e9 < rows[0]['flops_per_step'] < train_row['flops_per_step'] * 1.5
  if torch_flag:
    synth = rows[0]
    low, high = synth['jax_over_torch_range']
    assert synth['rounds'] == 2 and low <= synth['jax_over_torch'] <= high
    assert synth['torch_per_second'] > 0
  assert 'jax_over_torch' not in rows[1]


def test_throughput_times_the_dp_sgd_step_with_and_without_the_cached_front_end(tmp_path):
  """--kinds=dp_train,dp_train_cached: the cached step leaves the scattering out, so XLA
  counts far fewer FLOPs for it (the transform is most of the uncached step)."""
  out = tmp_path / 'throughput.json'
  result = subprocess.run(
      [sys.executable, 'benchmarks/throughput.py', '--models=scatternet_linear_pool4',
       '--batch_sizes=8', '--kinds=dp_train,dp_train_cached', '--steps=1', '--repeats=1',
       '--warmup=1', '--no_results_md', f'--out={out}'], cwd=REPO, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  plain, cached = json.loads(out.read_text())['rows']
  assert (plain['kind'], cached['kind']) == ('dp_train', 'dp_train_cached')
  assert cached['per_second'] > 0 and plain['per_second'] > 0
  assert 0 < cached['flops_per_step'] < plain['flops_per_step'] / 10


def test_utility_sweep_reads_finished_runs_into_rows_and_a_plot(tmp_path):
  """benchmarks/utility.py turns quality.py results (one per value and label kind) into a
  row per value and the figure; finished runs are read back, not run again."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import utility
  root = tmp_path / 'results' / 'workdirs'
  for ipc, (real, views, hard) in {'10': (0.60, 0.50, 0.30), '20': (0.70, 0.66, 0.40)}.items():
    for variant, acc in (('views', views), ('hard', hard)):
      result = {'num_images': 10 * int(ipc), 'iterations': 100, 'synthesis_seconds': 50.0,
                'view_label_seconds': 5.0, 'view_label_forward_passes': 1000 * int(ipc),
                'student_seconds': 7.0, 'bn_loss_final': 1.5, 'teacher_agreement': 0.9,
                'real_subset_accuracy': real, 'synthetic_accuracy': acc, 'ratio': acc / real}
      tag = utility.quality.variant_tag(variant, {'synthesis.images_per_class': ipc})
      (tmp_path / 'results').mkdir(exist_ok=True)
      (tmp_path / 'results' / f'quality-digits-{tag}.json').write_text(json.dumps(result))
  results_md = tmp_path / 'RESULTS.md'
  utility.append_row = lambda *a, **k: __import__('results_md').append_row(*a, path=results_md)
  rc = utility.main(['--suite=digits', '--sweep=synthesis.images_per_class', '--values=10,20',
                     f'--root={root}', f'--plot={tmp_path / "scaling.png"}'])
  assert rc == 0 and (tmp_path / 'scaling.png').stat().st_size > 10_000
  rows = [line for line in results_md.read_text().splitlines() if line.startswith('| 10 |')
          or line.startswith('| 20 |')]
  assert len(rows) == 2
  cells = [c.strip() for c in rows[1].strip('|').split('|')]
  assert cells[1] == '200' and cells[3] == '100 (45 s)' and cells[4] == '20000 (5 s)'
  assert cells[9] == '0.6600' and cells[10] == '0.943' and cells[12] == '0.571'
  assert '<!-- begin utility-digits-synthesis.images_per_class -->' in results_md.read_text()
  # Another pair of variants gets its own section (here the same runs, roles swapped).
  rc = utility.main(['--suite=digits', '--sweep=synthesis.images_per_class', '--values=20',
                     '--variants=hard,views', f'--root={root}'])
  text = results_md.read_text()
  section = text.split('<!-- begin utility-digits-synthesis.images_per_class-hard-views -->')[1]
  cells = [c.strip() for c in section.split('| 20 |')[1].split('|')]
  assert rc == 0 and cells[8] == '0.4000' and cells[10] == '0.6600'


def test_privacy_tradeoff_rows_from_a_single_run_and_its_refusal(tmp_path):
  """--run=EPS:DIR: accuracies and the privacy record from report.json, canary cells marked."""
  run = tmp_path / 'run'
  run.mkdir()
  report = {'teacher': {'test_accuracy': 0.5},
            'evaluate': {'synthetic': {'test_accuracy': 0.3},
                         'real_subset': {'test_accuracy': 0.6}},
            'privacy': {'epsilon': 7.99, 'delta': 1e-5},
            'environment': {'command': 'python -m bnsynth_jax.main --workdir=X'}}
  (run / 'report.json').write_text(json.dumps(report))
  plot = tmp_path / 'tradeoff.png'
  cmd = [sys.executable, 'benchmarks/privacy_tradeoff.py', '--dataset=t', f'--run=8:{run}',
         '--nowrite_results', f'--plot={plot}']
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  row = result.stdout.splitlines()[0].split(' | ')
  assert row[:5] == ['8', '(7.99, 1e-05)', '50.00%', '30.00%', '0.500']
  assert row[5] == 'not audited (one run)'
  assert plot.stat().st_size > 0
  del report['evaluate']
  (run / 'report.json').write_text(json.dumps(report))
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and 'no evaluate stage' in result.stderr


def test_privacy_tradeoff_audit_row_carries_the_permutation_null(tmp_path):
  """--audit=EPS:DIR: each canary cell says what the audit reports at chance and the p-value
  of what it observed; a grown audit says from how many runs."""
  tpr = {'value': 0.004, 'ci95': [0.001, 0.011]}
  measures = {'lira': {'tpr_at_0.001_fpr': tpr},
              'strongest': {'tpr_at_0.001_fpr': tpr, 'attack': 'lira'}}
  null = {'permutations': 100, 'tpr_median': 0.009, 'tpr_95th': 0.02, 'p_value': 0.86,
          'upper_median': 0.021, 'upper_95th': 0.044, 'share_upper_above_1pct': 0.93}
  targets = ('student', 'synthetic_nn', 'teacher', 'release')
  audit = {'test_accuracy': {'teacher': {'mean': 0.46}, 'student': {'mean': 0.39}},
           'privacy': {'epsilon': 8.0, 'delta': 1e-5}, 'release_students': 1,
           'attacks': {t: measures for t in targets}, 'null': {t: null for t in targets},
           'settings': {'shadows': 32, 'canaries': 50, 'kind': 'mislabeled'},
           'extended_from': [16], 'command': 'python -m bnsynth_jax.canary --workdir=X'}
  folder = tmp_path / 'audit'
  folder.mkdir()
  (folder / 'canary_audit.json').write_text(json.dumps(audit))
  result = subprocess.run([sys.executable, 'benchmarks/privacy_tradeoff.py', '--dataset=t',
                           f'--audit=8:{folder}', '--nowrite_results'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  row = result.stdout.splitlines()[0].split(' | ')
  note = '0.4% [0.1, 1.1] (at chance: upper end 2.1% median, 4.4% 95th; p 0.86)'
  assert row[5].startswith(note) and row[6] == note and row[7] == note
  assert row[8] == '32 x 50 mislabeled (grown from 16)'


def test_report_records_the_command_line(monkeypatch):
  from bnsynth_jax import report
  monkeypatch.setattr(sys, 'argv', ['/x/bnsynth_jax/main.py', '--config=c.py', '--workdir=a b'])
  assert report.command_line() == "python -m bnsynth_jax.main --config=c.py '--workdir=a b'"
  monkeypatch.setattr(sys, 'argv', ['benchmarks/quality.py', '--suite=digits'])
  assert report.command_line() == 'python benchmarks/quality.py --suite=digits'


def test_quality_variants_reuse_a_siblings_finished_stages(tmp_path):
  """A variant that only changes the student's labels reuses its sibling's teacher, statistics
  and synthetic set (compared after the preflight's derived values, e.g. the image size):
  run with --stages up to synthesize, the second variant trains and synthesises nothing; a
  third with twice the images copies the first half of its synthesis (synthesis.reuse_from)."""
  def quality(variant, *extra):
    return subprocess.run(
        [sys.executable, 'benchmarks/quality.py', '--suite=digits', f'--variant={variant}',
         f'--root={tmp_path / "w"}', '--stages=teacher,stats,synthesize', '--no_results_md',
         '--set=teacher.epochs=1', '--set=synthesis.iterations=2',
         '--set=synthesis.images_per_class=8', '--set=synthesis.view_epochs=2', *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600)
  first = quality('views')
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'no result without the evaluate stage' in first.stdout
  second = quality('hard')
  assert second.returncode == 0, second.stderr[-3000:]
  for stage in ('teacher', 'stats', 'synthesize'):
    assert f'reusing {stage} from views' in second.stdout, second.stdout[-3000:]
  assert 'stage synthesize: starting' not in second.stderr
  views, hard = (next((tmp_path / 'w' / 'digits').glob(f'{v}+*')) / 'synthetic'
                 for v in ('views', 'hard'))
  assert (views / 'manifest.json').read_text() == (hard / 'manifest.json').read_text()
  assert not (tmp_path / 'results').exists()    # no result without the evaluate stage
  third = quality('views', '--set=synthesis.images_per_class=16')
  assert third.returncode == 0, third.stderr[-3000:]
  assert 'reusing teacher from' in third.stdout and 'reusing synthesize' not in third.stdout
  assert 'synthesis batches of' in third.stdout, third.stdout[-3000:]
  big = next((tmp_path / 'w' / 'digits').glob('views+synthesis.images_per_class=16+*'))
  big = big / 'synthetic'
  first_half = json.loads((views / 'manifest.json').read_text())['shards']
  assert first_half == json.loads((big / 'manifest.json').read_text())['shards'][:len(first_half)]
  assert json.loads((big / 'metrics.json').read_text())['reused_batches'] == len(first_half)


def test_stage_records_from_an_older_version_match_when_the_new_key_is_at_its_default():
  """quality.py's reuse: a key one record lacks is equal only if the other has it None;
  its --set parses a placeholder key by its declared type."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  try:
    import quality
  finally:
    sys.path.pop(0)
  old = {'seed': 0, 'student.epochs': 100.0}
  assert quality._same(old, {**old, 'student.seed': None})
  assert not quality._same(old, {**old, 'student.seed': 1})
  assert not quality._same(old, {**old, 'student.epochs': 50.0})
  # --set on a key whose default is None (a placeholder) takes the declared type.
  from bnsynth_jax import config_lib
  config = config_lib.default_config()
  quality.apply_overrides(config, {'student.seed': '2', 'student.epochs': '3'})
  assert config.student.seed == 2 and isinstance(config.student.seed, int)
  assert config.student.epochs == 3.0


def test_every_quality_variant_names_real_config_keys_and_valid_values():
  """Every named variant of every suite applies to its suite's config (an unknown key is a
  SystemExit naming it) and passes the stages' own checks (e.g. an unknown augment)."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  try:
    import quality
  finally:
    sys.path.pop(0)
  from bnsynth_jax import student, synthesis
  for suite, spec in quality.SUITES.items():
    for name, overrides in quality.VARIANTS[suite].items():
      config = quality.load_config(spec['config'])
      quality.apply_overrides(config, {**spec['overrides'], **overrides})
      for dotted, value in overrides.items():
        section, leaf = dotted.split('.')
        assert config[section][leaf] == value, (suite, name, dotted)
      synthesis.validate(config)
      student.validate(config)
  with pytest.raises(SystemExit, match='synthesis.agument'):
    quality.apply_overrides(quality.load_config('configs/digits.py'),
                            {'synthesis.agument': 'flip'})


def test_method_rows_read_a_finished_workdir(tmp_path):
  """benchmarks/method_rows.py: one row per workdir, compute and accuracy from its files."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import method_rows
  w = tmp_path / 'gen'
  (w / 'synthetic').mkdir(parents=True)
  (w / 'synthetic' / 'timings.json').write_text(json.dumps(
      {'0': {'seconds': 30.0, 'view_label_seconds': 10.0}, '1': {'seconds': 5.0}}))
  (w / 'report.json').write_text(json.dumps({
      'synthesis': {'method': 'generator', 'iterations': 12.5, 'num_images': 40,
                    'bn_loss_initial': 9.0, 'bn_loss_final': 3.0, 'teacher_agreement': 0.9},
      'relabel': {'epochs': 2, 'forward_passes': 80, 'label_seconds': 1.4},
      'student': {'synthetic': {'labels': 'mixed', 'train_seconds': 7.2}},
      'evaluate': {'synthetic': {'test_accuracy': 0.45}},
      'environment': {'command': 'python -m bnsynth_jax.main --workdir=gen'}}))
  cells = method_rows.row(w, 0.6, 'base')
  assert cells[:12] == ['gen', 'generator', '12.5', '500', '25', '9.00 -> 3.00', '0.900', 'mixed',
                        '80 (1)', '7', '45.00%', '0.750']
  assert cells[12] == '`python -m bnsynth_jax.main --workdir=gen (the stages before its first ' \
      'copied from base)`'


def test_public_split_never_draws_a_private_index():
  """benchmarks/public_private_split.py: the public draw takes per_class images of each public
  class and none of the excluded (private base + canary) indices; too few is an error."""
  spec = importlib.util.spec_from_file_location(
      'public_private_split', REPO / 'benchmarks' / 'public_private_split.py')
  split = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(split)
  labels = np.arange(400) % 4
  excluded = np.arange(0, 400, 3)
  chosen = split.public_indices(labels, excluded, [1, 3], per_class=40, seed=0)
  assert len(chosen) == 80 and len(set(chosen.tolist())) == 80
  assert not set(chosen.tolist()) & set(excluded.tolist())
  assert np.bincount(labels[chosen], minlength=4).tolist() == [0, 40, 0, 40]
  with pytest.raises(SystemExit, match='lower --public_per_class'):
    split.public_indices(labels, excluded, [1], per_class=100, seed=0)


def test_public_split_checks_the_audits_data(tmp_path):
  """The split refuses a config that reads other data than the audit's, and its byte check
  reads what the audit wrote (its base PNGs and its canaries), refusing an unfinished base."""
  import ml_collections
  from bnsynth_jax import canary_audit
  spec = importlib.util.spec_from_file_location(
      'public_private_split', REPO / 'benchmarks' / 'public_private_split.py')
  split = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(split)
  plan = {'settings': {'data': {'name': '', 'root': '/data/cifar', 'source': 'imagefolder'}},
          'base_size': 3}
  data = ml_collections.ConfigDict({'name': '', 'root': '/data/cifar/', 'source': 'imagefolder'})
  split.check_same_data(data, plan)
  data.root = '/data/other'
  with pytest.raises(SystemExit, match='the audit drew from'):
    split.check_same_data(data, plan)
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
  canaries = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  canary_audit.write_split(tmp_path / 'base' / 'train', base[:2], np.array([0, 1]), ['a', 'b'])
  with pytest.raises(SystemExit, match='holds 2 images, not the plan'):
    split.audit_images(tmp_path, canaries, 3)
  canary_audit.write_split(tmp_path / 'base' / 'train', base, np.array([0, 1, 1]), ['a', 'b'])
  seen = split.audit_images(tmp_path, canaries, 3)
  assert {split._pixels(x) for x in [*base, *canaries]} == seen
  assert split._pixels(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) not in seen


def test_scaling_plot_draws_the_points_and_refuses_a_malformed_curve(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location('scaling_plot',
                                                REPO / 'benchmarks' / 'scaling_plot.py')
  scaling_plot = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(scaling_plot)
  out = tmp_path / 'scaling.png'
  rc = scaling_plot.main(['--out', str(out),
                          '--curve=a=2000:0.70:0.60,1000:0.30:0.50',
                          '--curve=b=5000:0.70:0.68'])
  assert rc == 0 and out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert not list(tmp_path.glob('*.tmp.png'))
  printed = capsys.readouterr().out
  assert 'a: 1000: 0.600, 2000: 1.167' in printed and 'b: 5000: 1.029' in printed
  for bad in ('a=2000:0.7', 'a=2000:70:60', '2000:0.7:0.6'):
    assert scaling_plot.main(['--out', str(tmp_path / 'x.png'), f'--curve={bad}']) == 2
    assert 'error: --curve' in capsys.readouterr().err
  assert not (tmp_path / 'x.png').exists()


def _synthetic_folder(directory, images_per_class, seed, num_classes=3, shard_size=6, views=4):
  """A finished synthetic folder with labels arange % C per shard, as synthesis writes them."""
  from bnsynth_jax import synthetic_data
  rng = np.random.default_rng(seed)
  n = images_per_class * num_classes
  for j in range(n // shard_size):
    labels = (np.arange(shard_size) % num_classes).astype(np.int32)
    synthetic_data.write_shard(directory, j, {
        'images': rng.integers(0, 256, (shard_size, 4, 4, 3), dtype=np.uint8),
        'labels': labels, 'loss': rng.random(shard_size, dtype=np.float32),
        'confidence': rng.random(shard_size, dtype=np.float32),
        'soft_labels': np.eye(num_classes, dtype=np.float32)[labels],
        'view_soft_labels': rng.random((shard_size, views, num_classes)).astype(np.float16),
        'bn_loss_final': np.float32(j)})
  entries, _ = synthetic_data.scan_shards(directory, n // shard_size)
  synthetic_data.write_manifest(directory, entries, class_names=['a', 'b', 'c'],
                                images_per_class=images_per_class, num_classes=num_classes)


def test_select_subset_keeps_the_label_order_and_picks_by_the_method(tmp_path):
  """benchmarks/select_subset.py: OUT loads (fresh shard hashes), has the template's labels and
  per-shard scalars, and holds the pool's first / most view-consistent images of each class."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import select_subset
  from bnsynth_jax import fileio, synthetic_data
  _synthetic_folder(tmp_path / 'pool' / 'synthetic', images_per_class=8, seed=0)
  _synthetic_folder(tmp_path / 'small', images_per_class=4, seed=1)
  pool = synthetic_data.load_synthetic(tmp_path / 'pool' / 'synthetic')
  template = synthetic_data.load_synthetic(tmp_path / 'small')
  score = select_subset.view_consistency(pool)
  for method in ('first', 'consistent'):
    out = tmp_path / method
    assert select_subset.main([f'--pool={tmp_path / "pool"}', f'--template={tmp_path / "small"}',
                               f'--out={out}', f'--method={method}']) == 0
    got = synthetic_data.load_synthetic(out)
    np.testing.assert_array_equal(got.labels, template.labels)
    assert synthetic_data.read_manifest(out)['selected_from']['method'] == method
    assert float(fileio.read_npz(out / 'shards' / 'shard-00001.npz')['bn_loss_final']) == 1.0
    for c in range(3):
      idx = np.flatnonzero(pool.labels == c)
      want = idx[:4] if method == 'first' else idx[np.argsort(-score[idx], kind='stable')[:4]]
      np.testing.assert_array_equal(got.images[got.labels == c], pool.images[want])
  assert not np.array_equal(synthetic_data.load_synthetic(tmp_path / 'first').images,
                            synthetic_data.load_synthetic(tmp_path / 'consistent').images)


def test_kcenter_starts_at_the_mean_and_takes_the_farthest_point_next():
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import select_subset
  points = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [0.0, 3.0], [4.9, 0.1]])
  np.testing.assert_array_equal(select_subset.kcenter(points, 3), [1, 2, 3])


def test_null_calibration_reports_p_values_of_audits_without_a_leak():
  result = subprocess.run([sys.executable, 'benchmarks/null_calibration.py', '--audits=2',
                           '--shadows=4', '--canaries=8', '--permutations=3'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('2 audits with no leak: mean p ')
  mean_p = float(result.stdout.split('mean p ')[1].split(',')[0])
  assert 0.25 <= mean_p <= 1      # p-values of 3 shuffles are 0.25, 0.5, 0.75 or 1


def test_results_md_appends_where_bnsynth_results_md_points(tmp_path):
  # launch/device_rows.sh: a device's rows go to a copy of RESULTS.md that comes back.
  target = tmp_path / 'RESULTS.md'
  code = ('import results_md; '
          "results_md.append_row('gpu-x', 'GPU: x', ['a', 'b'], ['1', '2'])")
  before = (REPO / 'benchmarks' / 'RESULTS.md').read_text()
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO / 'benchmarks', capture_output=True,
                       text=True, env=dict(os.environ, BNSYNTH_RESULTS_MD=str(target)))
  assert out.returncode == 0, out.stderr
  assert '## GPU: x' in target.read_text() and '| 1 | 2 |' in target.read_text()
  assert (REPO / 'benchmarks' / 'RESULTS.md').read_text() == before
