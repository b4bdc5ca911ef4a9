"""The canary audit (bnsynth_jax/canary_audit.py, the command bnsynth_jax/canary.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnsynth_jax import canary_attacks, canary_audit
from bnsynth_jax.errors import UserError


# ----------------------------------------------------------------------------
# The canary audit's attack


def test_lira_reports_chance_on_two_samples_of_one_distribution():
  rng = np.random.default_rng(0)
  design = canary_audit.balanced_design(16, 60, rng)
  scores = rng.normal(0, 1, design.shape)                      # IN and OUT alike
  result = canary_attacks.evaluate_attacks({'x': scores}, design, bootstrap=50, seed=0)['x']
  for attack in ('lira', 'lira_per_canary_variance', 'threshold'):
    # jax_privacy's AUC allows randomising between thresholds: chance is its floor, 0.5 (and
    # the best of many thresholds sits a little above it on a finite sample).
    assert result[attack]['auc']['value'] < 0.56
    assert result[attack]['epsilon_lower_bound_95'] == 0.0    # no significant leak
    assert result[attack]['tpr_at_0.01_fpr']['value'] < 0.06


def test_lira_finds_a_canary_a_tiny_model_memorises():
  """Logistic regressions on digits pixels, each trained to fit its training set (many
  epochs, no regularisation); the mislabeled canaries a run holds get their planted label."""
  from bnsynth_jax.sources import _digits_arrays
  images, labels, split = _digits_arrays()
  x = images[split['train']][:300].reshape(300, -1).astype(np.float32) / 255.0
  y = labels[split['train']][:300]
  rng = np.random.default_rng(0)
  k, m = 20, 8
  canaries = x[:k]
  planted = (y[:k] + 1 + rng.integers(0, 9, k)) % 10
  base_x, base_y = x[k:], y[k:]
  design = canary_audit.balanced_design(m, k, rng)

  @jax.jit
  def fit(xs, ys):
    def loss(w):
      logits = xs @ w[:-1] + w[-1]
      return -jnp.mean(jnp.sum(jax.nn.one_hot(ys, 10) * jax.nn.log_softmax(logits), -1))
    step = lambda _, w: w - 2.0 * jax.grad(loss)(w)
    return jax.lax.fori_loop(0, 300, step, jnp.zeros((65, 10)))   # a loop, not 300 copies

  scores = np.zeros((m, k))
  for r in range(m):
    xs = np.concatenate([base_x, canaries[design[r]]])
    ys = np.concatenate([base_y, planted[design[r]]])
    w = np.asarray(fit(jnp.asarray(xs), jnp.asarray(ys)))
    scores[r] = canary_audit.logit_margins(canaries @ w[:-1] + w[-1], planted)
  result = canary_attacks.evaluate_attacks({'lr': scores}, design, bootstrap=0, seed=0)['lr']
  assert result['lira']['auc']['value'] > 0.9
  assert result['lira']['tpr_at_0.01_fpr']['value'] > 0.3


def test_per_canary_variance_finds_canaries_of_different_spreads():
  """Canaries whose scores spread 100x differently (as a hard and an easy record do): a
  pooled variance drowns the narrow ones, each canary's own variance does not."""
  rng = np.random.default_rng(0)
  design = canary_audit.balanced_design(16, 50, rng)
  sd = np.exp(rng.uniform(np.log(0.05), np.log(5), 50))
  scores = rng.normal(0, 3, 50) + sd * rng.normal(0, 1, design.shape) + design * 3 * sd
  result = canary_attacks.evaluate_attacks({'x': scores}, design, bootstrap=0, seed=0)['x']
  pooled = result['lira']['tpr_at_0.001_fpr']['value']
  own = result['lira_per_canary_variance']['tpr_at_0.001_fpr']['value']
  assert own > 0.5 and own > 3 * pooled, (own, pooled)


def test_augmented_queries_are_the_image_its_shifts_and_their_mirrors():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (3, 8, 8, 1), dtype=np.uint8)
  q = canary_audit.augmented_queries(images)
  assert q.shape == (18, 3, 8, 8, 1)
  np.testing.assert_array_equal(q[0], images)                     # query 0: as it is
  np.testing.assert_array_equal(q[9], images[:, :, ::-1])         # its mirror
  np.testing.assert_array_equal(q[1][:, 1:], images[:, :-1])      # shifted down by 1 pixel
  np.testing.assert_array_equal(q[2][:, :-1], images[:, 1:])      # and up
  np.testing.assert_array_equal(q[5][:, 1:, 1:], images[:, :-1, :-1])   # and diagonally
  assert np.all(q[1][:, 0] == 0) and np.all(q[8][:, -1] == 0)     # zero borders, as crops pad
  assert len({v.tobytes() for v in q}) == 18
  np.testing.assert_array_equal(canary_audit.augmented_queries(images, flip=False), q[:9])


def test_multivariate_lira_uses_the_correlation_of_the_queries():
  """Queries that share most of their noise (shifted views of one image through one
  model): the linear discriminant with the pooled covariance finds the membership signal
  that only one query carries much better than averaging the queries' ratios, and its
  per-canary-scale variant finds it too."""
  rng = np.random.default_rng(1)
  design = canary_audit.balanced_design(16, 50, rng)
  common = rng.normal(0, 2, (*design.shape, 1))
  scores = common + 0.3 * rng.normal(0, 1, (*design.shape, 4))
  scores[..., 0] += 1.0 * design          # only the first query minus the others shows it
  result = canary_attacks.evaluate_attacks({'x': scores}, design, bootstrap=0, seed=0)['x']
  multi = result['lira_multivariate']['auc']['value']
  assert multi > 0.95
  assert multi > result['lira_augmented']['auc']['value'] + 0.1
  assert result['lira_multivariate_per_canary_scale']['auc']['value'] > 0.95


def test_shrunk_variance_lies_between_the_pooled_and_the_canarys_own():
  rng = np.random.default_rng(2)
  design = canary_audit.balanced_design(16, 20, rng)
  scores = rng.normal(0, 1, design.shape) * np.linspace(0.2, 3, 20)[None]
  own = canary_attacks.lira_scores(scores, design, 'per_canary')
  shrunk = canary_attacks.lira_scores(scores, design, 'shrunk')
  pooled = canary_attacks.lira_scores(scores, design, 'pooled')
  assert not np.allclose(shrunk, own) and not np.allclose(shrunk, pooled)
  with pytest.raises(ValueError, match='unknown LiRA variance'):
    canary_attacks.lira_scores(scores, design, 'median')


def test_several_queries_per_canary_find_more_than_one_and_the_strongest_is_reported():
  """A weak membership signal seen through 10 queries with independent noise each (as
  augmented views are): averaging the queries' likelihood ratios finds more canaries at
  0.1% FPR than the plain query alone, and so does LiRA on the queries' mean score;
  'strongest' names the best attack."""
  rng = np.random.default_rng(0)
  design = canary_audit.balanced_design(16, 50, rng)
  shared = rng.normal(0, 3, 50)[None, :, None]
  scores = shared + rng.normal(0, 1, (*design.shape, 10)) + 1.2 * design[..., None]
  result = canary_attacks.evaluate_attacks({'x': scores}, design, bootstrap=0, seed=0)['x']
  plain = result['lira']['tpr_at_0.001_fpr']['value']
  augmented = result['lira_augmented']['tpr_at_0.001_fpr']['value']
  assert augmented > 0.5 and augmented > 3 * plain, (augmented, plain)
  strongest = result['strongest']
  assert strongest['attack'].startswith(('lira_augmented', 'lira_mean_query'))   # all queries
  mean_query = result['lira_mean_query']['tpr_at_0.001_fpr']['value']
  assert mean_query > 3 * plain, (mean_query, plain)
  assert strongest['tpr_at_0.001_fpr']['value'] == max(
      m['tpr_at_0.001_fpr']['value'] for name, m in result.items() if name != 'strongest')


def test_canaries_and_design():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (100, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, 5, 100).astype(np.int32)
  canaries, keep = canary_audit.choose_canaries(images, labels, 5, 10, 'mislabeled', rng)
  assert np.all(canaries.labels != canaries.true_labels) and keep.sum() == 90
  assert np.array_equal(images[canaries.source_index], canaries.images)
  design = canary_audit.balanced_design(6, 10, rng)
  assert np.all(design.sum(0) == 3)
  with pytest.raises(UserError, match='even'):
    canary_audit.balanced_design(5, 10, rng)
  assert canary_audit.parse_ids('0-2,5', 8) == [0, 1, 2, 5]
  with pytest.raises(UserError, match='there are 8'):
    canary_audit.parse_ids('7-9', 8)



# ----------------------------------------------------------------------------
# The command


# ----------------------------------------------------------------------------
# The replace-one audit and its one-run lower bound


def test_one_run_bound_is_zero_without_a_signal_and_positive_with_one():
  rng = np.random.default_rng(1)
  design = canary_audit.independent_design(16, 50, rng)
  null = rng.normal(0, 1, (*design.shape, 3))
  assert canary_attacks.one_run_lower_bound(null, design)['value'] == 0.0
  own_spread = rng.uniform(0.5, 2.0, 50)                     # each canary its own spread
  leaky = null * own_spread[:, None] + 3.0 * design[..., None]
  bound = canary_attacks.one_run_lower_bound(leaky, design)
  assert bound['value'] > 1.0
  assert bound['tests'] == 2 * len(canary_attacks.ONE_RUN_ATTACKS)
  # A DP-like signal stays below its epsilon: IN shifts by less than the noise.
  weak = null + 0.2 * design[..., None]
  assert canary_attacks.one_run_lower_bound(weak, design)['value'] < 1.0


def test_one_run_scores_of_a_fold_never_depend_on_its_own_bits():
  """The one-run theorem needs guesses that are functions of the outputs alone: a run's
  LiRA ratio is fitted on the other fold, so flipping its fold's bits changes nothing."""
  rng = np.random.default_rng(2)
  design = canary_audit.independent_design(8, 20, rng)
  s = rng.normal(0, 1, design.shape) + design
  before = canary_attacks.cross_fitted_lira(s, design, 'shrunk')
  flipped = design.copy()
  flipped[::2] = ~flipped[::2]                                # fold 0's bits
  after = canary_attacks.cross_fitted_lira(s, flipped, 'shrunk')
  np.testing.assert_array_equal(before[::2], after[::2])
  assert not np.allclose(before[1::2], after[1::2])           # fold 1 is fitted on them


def test_independent_design_is_fair_coins_not_balanced_columns():
  design = canary_audit.independent_design(16, 2000, np.random.default_rng(3))
  assert abs(design.mean() - 0.5) < 0.01
  assert np.any(design.sum(0) != 8)                 # columns are not forced to half
  # independent across runs: the correlation between two runs' bits is near 0
  assert abs(np.corrcoef(design[0], design[1])[0, 1]) < 0.06


def test_replace_adjacency_puts_the_alternative_in_each_out_canarys_place(tmp_path):
  """--adjacency=replace: an OUT run holds the mislabeled canary's source image with its true
  label, so every run has the base set plus exactly one record per canary."""
  from PIL import Image
  audit = tmp_path / 'audit'
  plan = canary_audit.prepare(tiny_audit_config(), audit, num_canaries=6, num_shadows=4,
                              kind='mislabeled', train_subset=100, audit_seed=0,
                              adjacency='replace')
  canaries, alt = plan['canaries'], plan['alternatives']
  np.testing.assert_array_equal(alt.images, canaries.images)        # the same pictures
  np.testing.assert_array_equal(alt.labels, canaries.true_labels)   # their true labels
  assert np.all(alt.labels != canaries.labels)
  names = plan['class_names']
  base = sorted((audit / 'base' / 'train').glob('*/*.png'))
  canary_paths = canary_audit._paths(audit / 'base' / 'canaries', names, canaries.labels,
                                     'canary')
  alt_paths = canary_audit._paths(audit / 'base' / 'alternatives', names, alt.labels,
                                  'alternative')
  member = np.array([True, False, True, False, False, True])
  root = canary_audit.shadow_data(audit, 0, base, canary_paths, member, alt_paths)
  files = sorted((root / 'train').glob('*/*.png'))
  assert len(files) == 100 + 6
  for k in range(6):
    label = canaries.labels[k] if member[k] else alt.labels[k]
    name = (f'canaries_canary_{k:06d}.png' if member[k]
            else f'alternatives_alternative_{k:06d}.png')
    [f] = [f for f in files if f.name == name]
    assert f.parent.name == names[int(label)]
    np.testing.assert_array_equal(np.asarray(Image.open(f)).reshape(canaries.images[k].shape),
                                  canaries.images[k])
  # The same folder with the other adjacency is another audit.
  with pytest.raises(UserError, match='other settings'):
    canary_audit.prepare(tiny_audit_config(), audit, num_canaries=6, num_shadows=4,
                         kind='mislabeled', train_subset=100, audit_seed=0)
  # Scored runs (kept scores stand in for trained ones): the report has the one-run bound.
  rng = np.random.default_rng(0)
  for m in range(4):
    leak = 4.0 * plan['design'][m][:, None]
    (audit / f'shadow_{m}').mkdir(exist_ok=True)
    np.savez(audit / f'shadow_{m}' / 'scores.npz',
             student=rng.normal(0, 1, (6, 9)) + leak, teacher=rng.normal(0, 1, (6, 9)) + leak,
             synthetic_nn=rng.normal(0, 1, 6), synthetic_nn_class=rng.normal(0, 1, 6),
             student_test_accuracy=0.5, teacher_test_accuracy=0.6)
  table = canary_audit.run(tiny_audit_config(), audit, num_canaries=6, num_shadows=4,
                           train_subset=100, bootstrap=0, adjacency='replace')
  summary = json.loads((audit / 'canary_audit.json').read_text())
  assert set(summary['lower_bound']) == set(canary_audit.TARGETS)
  assert summary['lower_bound']['student']['value'] >= 0
  assert 'Lower bound on the replace-one epsilon' in table and 'replace-one' in table


def tiny_audit_config():
  from bnsynth_jax.configs import digits
  c = digits.get_config()
  c.teacher.num_steps = 4
  c.model.name = c.student.model.name = 'resnet_tiny'
  c.synthesis.update(images_per_class=4, batch_size=40, iterations=2, view_epochs=1)
  c.student.update(epochs=1, batch_size=8)
  return c


def test_canary_audit_end_to_end_and_resumes(tmp_path):
  """4 shadow pipelines of a few steps each: folders, scores, report; the command a second
  time only rescores (every run kept its scores); other settings are refused. The shadow
  runs train in this process (canary_audit.run, what the command calls); the command line
  itself runs where it is cheap (rescoring, refusing)."""
  import subprocess
  import sys
  from conftest import REPO
  audit = tmp_path / 'audit'
  settings = dict(num_canaries=4, num_shadows=4, bootstrap=10, train_subset=200)
  table = canary_audit.run(tiny_audit_config(), audit, **settings)
  assert 'TPR at 0.1% FPR' in table
  summary = json.loads((audit / 'canary_audit.json').read_text())
  assert summary['base_train_images'] == 200
  assert set(summary['attacks']) == set(canary_audit.TARGETS)
  design = np.load(audit / 'canaries.npz')['design']
  assert np.all(design.sum(0) == 2)              # each canary IN exactly half of the runs
  for m in range(4):                             # each run: the base set and its IN canaries
    files = list((audit / f'shadow_{m}' / 'data' / 'train').glob('*/*.png'))
    assert len(files) == 200 + design[m].sum()
  assert (audit / 'canary_roc.png').stat().st_size > 0
  # The command on the finished audit, with the same settings: rescoring only.
  args = [sys.executable, '-m', 'bnsynth_jax.canary', '--config=configs/digits.py',
          f'--workdir={audit}', '--canaries=4', '--shadows=4', '--bootstrap=10',
          '--train_subset=200', '--config.teacher.num_steps=4',
          '--config.model.name=resnet_tiny', '--config.student.model.name=resnet_tiny',
          '--config.synthesis.images_per_class=4', '--config.synthesis.batch_size=40',
          '--config.synthesis.iterations=2', '--config.synthesis.view_epochs=1',
          '--config.student.epochs=1', '--config.student.batch_size=8', '--null_permutations=3',
          '--release_students=0']
  scores_time = [(audit / f'shadow_{m}' / 'scores.npz').stat().st_mtime_ns for m in range(4)]
  again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'TPR at 0.1% FPR' in again.stdout and 'shadow run' not in again.stderr
  assert 'The permutation null' in again.stdout
  null = json.loads((audit / 'canary_audit.json').read_text())['null']
  assert set(null) == set(canary_audit.TARGETS) and null['student']['permutations'] == 3
  assert scores_time == [(audit / f'shadow_{m}' / 'scores.npz').stat().st_mtime_ns
                         for m in range(4)]
  changed = subprocess.run(args[:-1] + ['--canaries=6'], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
  assert changed.returncode == 2 and 'other settings' in changed.stderr
  # real_student adds the real-data student to the finished runs, nothing else retrained.
  before = np.load(audit / 'shadow_0' / 'scores.npz')
  teacher_files = sorted((audit / 'shadow_0' / 'run' / 'teacher').rglob('*'))
  teacher_time = [f.stat().st_mtime_ns for f in teacher_files]
  canary_audit.run(tiny_audit_config(), audit, real_student=True, **settings)
  assert teacher_time == [f.stat().st_mtime_ns for f in teacher_files]
  summary = json.loads((audit / 'canary_audit.json').read_text())
  assert set(summary['attacks']) == set(canary_audit.TARGETS) | {'real_student'}
  assert 0 <= summary['test_accuracy']['real_student']['mean'] <= 1
  after = np.load(audit / 'shadow_0' / 'scores.npz')
  for key in before.files:
    np.testing.assert_array_equal(before[key], after[key])
  assert after['real_student'].shape == before['student'].shape
  assert (audit / 'shadow_0' / 'run' / 'evaluate' / 'full_real').is_dir()
  # release_students adds students trained on each run's release, nothing else retrained;
  # the 'release' target is the mean margin of the run's student and these.
  canary_audit.run(tiny_audit_config(), audit, real_student=True, release_students=1,
                   **settings)
  assert teacher_time == [f.stat().st_mtime_ns for f in teacher_files]
  summary = json.loads((audit / 'canary_audit.json').read_text())
  assert 'release' in summary['attacks'] and summary['release_students'] == 1
  last = np.load(audit / 'shadow_0' / 'scores.npz')
  np.testing.assert_array_equal(last['student'], before['student'])
  assert last['release_students'].shape == (1, *before['student'].shape)
  assert not np.array_equal(last['release_students'][0], before['student'])   # another seed
  release = canary_audit.with_release(dict(last), 1)['release']
  np.testing.assert_allclose(release, (last['student'] + last['release_students'][0]) / 2)
  extra = audit / 'shadow_0' / 'run' / 'release_students' / 'student_0'
  assert (extra / 'synthetic').is_symlink() and (extra / 'student' / 'synthetic').is_dir()


def test_the_audit_report_command_drops_shadow_ids():
  """Whichever --shadow_ids process finishes the last shadow run writes the report: its
  command must be the one that reproduces the whole audit."""
  args = ['--config=configs/cifar10.py:cpu_audit', '--shadow_ids=0-7', '--workdir=/a b',
          '--shadow_ids', '8-15', '--canaries=50']
  assert canary_audit.report_command(args) == (
      "python -m bnsynth_jax.canary --config=configs/cifar10.py:cpu_audit '--workdir=/a b' "
      '--canaries=50')


def test_a_shadow_run_makes_every_stage_the_student_depends_on():
  """Each shadow pipeline runs the stages up to the student, relabel included (a student on
  mixed-view labels, as configs/digits_dp.py's, needs its views: the audit of that default
  once stopped at 'mixed_views.npz is missing')."""
  from bnsynth_jax import pipeline
  names = list(pipeline.NAMES)
  assert canary_audit.STAGES.split(',') == names[:names.index('student') + 1]


def test_a_replace_audit_grows_to_more_shadows_keeping_its_runs(tmp_path):
  """--shadows larger on a finished --adjacency=replace audit: the first rows of the design
  kept (their runs' scores stay valid), the new rows fair coins, the same command again
  the same design; a balanced (add_remove) design or fewer runs are refused."""
  audit = tmp_path / 'audit'
  common = dict(num_canaries=6, kind='mislabeled', train_subset=100, audit_seed=0)
  first = canary_audit.prepare(tiny_audit_config(), audit, num_shadows=4, adjacency='replace',
                               **common)['design']
  grown = canary_audit.prepare(tiny_audit_config(), audit, num_shadows=40, adjacency='replace',
                               **common)
  assert grown['design'].shape == (40, 6)
  np.testing.assert_array_equal(grown['design'][:4], first)
  assert 0.3 < grown['design'][4:].mean() < 0.7
  assert grown['extended_from'] == [4]
  again = canary_audit.prepare(tiny_audit_config(), audit, num_shadows=40, adjacency='replace',
                               **common)
  np.testing.assert_array_equal(again['design'], grown['design'])
  # Another path to 40 (4 -> 8 -> 40) gives the same rows: each new row is its run's own.
  other = tmp_path / 'other'
  canary_audit.prepare(tiny_audit_config(), other, num_shadows=4, adjacency='replace', **common)
  canary_audit.prepare(tiny_audit_config(), other, num_shadows=8, adjacency='replace', **common)
  np.testing.assert_array_equal(
      canary_audit.prepare(tiny_audit_config(), other, num_shadows=40, adjacency='replace',
                           **common)['design'], grown['design'])
  # A crash after canaries.npz, before plan.json: the old plan reads only its own rows.
  plan_file = other / 'plan.json'
  old_plan = json.loads(plan_file.read_text())
  old_plan['settings']['shadows'] = 8
  plan_file.write_text(json.dumps(old_plan))
  np.testing.assert_array_equal(
      canary_audit.prepare(tiny_audit_config(), other, num_shadows=8, adjacency='replace',
                           **common)['design'], grown['design'][:8])
  for shadows in (4, 38):
    with pytest.raises(UserError, match='other settings'):
      canary_audit.prepare(tiny_audit_config(), audit, num_shadows=shadows,
                           adjacency='replace', **common)
  balanced = tmp_path / 'balanced'
  canary_audit.prepare(tiny_audit_config(), balanced, num_shadows=4, **common)
  with pytest.raises(UserError, match='other settings'):
    canary_audit.prepare(tiny_audit_config(), balanced, num_shadows=8, **common)


def test_the_permutation_null_tells_a_leak_from_chance():
  """Scores with no dependence on membership: the observed TPR sits inside its permutation
  null (p-value not small); scores that shift by membership: the p-value is the smallest
  the shuffles allow and the null's TPR is far below the observed one."""
  rng = np.random.default_rng(0)
  design = rng.random((8, 60)) < 0.5
  noise = rng.normal(0, 1, (8, 60, 3))
  for leak, small in ((0.0, False), (3.0, True)):
    scores = {'student': noise + leak * design[..., None]}
    observed = canary_attacks.evaluate_attacks(scores, design, 0, 0)
    null = canary_attacks.permutation_null(scores, design, 19, 20, 0, observed)['student']
    assert null['permutations'] == 19
    assert 0 <= null['tpr_median'] <= null['tpr_95th'] <= 1
    assert null['upper_median'] >= null['tpr_median']
    assert observed['student']['strongest']['tpr_at_0.001_fpr']['value'] > 0
    if small:
      assert null['p_value'] == pytest.approx(0.05)
      assert observed['student']['strongest']['tpr_at_0.001_fpr']['value'] > 0.5
      assert null['tpr_95th'] < 0.2
    else:
      assert null['p_value'] > 0.05
