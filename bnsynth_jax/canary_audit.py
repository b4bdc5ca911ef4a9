"""The canary audit's logic (the command is bnsynth_jax/canary.py, which documents it)."""

from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
from absl import logging

from bnsynth_jax import canary_attacks, fileio
from bnsynth_jax.errors import UserError

STAGES = 'teacher,stats,synthesize,relabel,student'   # relabel: a no-op at relabel.epochs 0
TARGETS = {
    'student': 'synthetic-trained student: logit margin on the planted label',
    'synthetic_nn': 'synthetic images: negative L2 distance to the nearest one',
    'synthetic_nn_class': 'synthetic images of the planted class: negative nearest distance',
    'teacher': 'teacher (trained on the real data): logit margin on the planted label',
}
# With --real_student: a model of the student's recipe trained on the run's real training
# data (its IN canaries included), the contrast to the synthetic-trained student.
REAL_STUDENT = {'real_student': 'student trained on the real data (same recipe): logit margin '
                                'on the planted label'}
# With --release_students=N: the attacker holds the release and trains N more students on
# it (other seeds); the mean of their and the audit student's margins is one score with less
# of a single student's training noise (digits: 32.0% against 20.9% at 0.1% FPR, N=3).
RELEASE = {'release': 'synthetic release: mean logit margin on the planted label of the '
                      'audit\'s student and more trained on the release'}
RELEASE_SEED_STRIDE = 7919      # student seeds of the extra students: seed + stride x (j + 1)


@dataclasses.dataclass
class Canaries:
  images: np.ndarray        # uint8 [K, H, W, C]
  labels: np.ndarray        # int32 [K], the planted labels
  true_labels: np.ndarray   # int32 [K], the source image's label (noise: -1)
  source_index: np.ndarray  # int [K], index in the train split (noise: -1)


# How an OUT run differs from an IN run. 'add_remove': the canary is absent (the dataset
# is one record smaller). 'replace': the canary's slot holds its alternative record instead
# -- a mislabeled canary's source image with its true label, a noise canary's second noise
# image -- so IN and OUT differ by replacing one record, the adjacency DP mode's guarantee
# is stated for; with an independent design this gives the one-run lower bound below.
ADJACENCIES = ('add_remove', 'replace')


@dataclasses.dataclass
class Alternatives:
  images: np.ndarray        # uint8 [K, H, W, C], what an OUT run holds in canary k's place
  labels: np.ndarray        # int32 [K]


# ----------------------------------------------------------------------------
# Canaries and the IN/OUT design


def choose_canaries(images, labels, num_classes: int, k: int, kind: str,
                    rng: np.random.Generator) -> tuple[Canaries, np.ndarray]:
  """K canaries and the mask of train images left in the base set (the random draws of an
  audit made before --adjacency existed, so its plans still read back the same)."""
  if k < 2 or k > len(labels) // 2:
    raise UserError(f'--canaries={k} must be between 2 and half the train split '
                    f'({len(labels) // 2})')
  idx = rng.choice(len(labels), k, replace=False)
  keep = np.ones(len(labels), bool)
  planted = (labels[idx] + rng.integers(1, num_classes, k)) % num_classes
  if kind == 'mislabeled':
    keep[idx] = False
    return Canaries(images[idx], planted.astype(np.int32), labels[idx].astype(np.int32),
                    idx), keep
  if kind == 'noise':
    noise = rng.integers(0, 256, (k, *images.shape[1:]), dtype=np.uint8)
    return Canaries(noise, rng.integers(0, num_classes, k).astype(np.int32),
                    np.full(k, -1, np.int32), np.full(k, -1)), keep
  raise UserError(f"unknown canary kind {kind!r}: use 'mislabeled' or 'noise'")


def alternatives(canaries: Canaries, images, labels, num_classes: int,
                 rng: np.random.Generator) -> Alternatives:
  """The record an OUT run holds in each canary's place (adjacency 'replace'): a mislabeled
  canary's source image with its true label, a noise canary's second noise image with a
  random label."""
  if np.all(canaries.source_index >= 0):
    idx = canaries.source_index
    return Alternatives(images[idx], labels[idx].astype(np.int32))
  k = len(canaries.labels)
  return Alternatives(rng.integers(0, 256, canaries.images.shape, dtype=np.uint8),
                      rng.integers(0, num_classes, k).astype(np.int32))


def independent_design(num_shadows: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """bool [M, K]: every (run, canary) IN with probability 1/2, independently -- what the
  one-run audit's bound assumes (a balanced column is not independent across runs)."""
  if num_shadows < 4 or num_shadows % 2:
    raise UserError(f'--shadows={num_shadows} must be even and at least 4 (16 or more for '
                    'TPR at low FPR)')
  return rng.random((num_shadows, k)) < 0.5


def balanced_design(num_shadows: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """bool [M, K]: canary k is IN exactly M/2 runs."""
  if num_shadows < 4 or num_shadows % 2:
    raise UserError(f'--shadows={num_shadows} must be even and at least 4 (16 or more for '
                    'TPR at low FPR)')
  column = np.arange(num_shadows) < num_shadows // 2
  return np.stack([rng.permutation(column) for _ in range(k)], axis=1)


# ----------------------------------------------------------------------------
# Scores of one finished shadow run


def model_logits(model, variables, manifest, images) -> np.ndarray:
  import jax
  import jax.numpy as jnp
  from bnsynth_jax import augment
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  out = [apply(variables, augment.normalise(jnp.asarray(images[i:i + 500]), manifest['mean'],
                                            manifest['std']))
         for i in range(0, len(images), 500)]
  return np.concatenate([np.asarray(o, np.float64) for o in out])


QUERY_SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def augmented_queries(images: np.ndarray, flip: bool = True) -> np.ndarray:
  """[A, K, H, W, C]: each image as it is (query 0), then shifted by s pixels (s = H/16, at
  least 1) to its 8 neighbours (QUERY_SHIFTS, in units of s), the border filled with zeros
  as the training crops pad, and with `flip` (a model trained on mirrored views) each of
  these nine mirrored: training-time views an attack queries (the LiRA paper queries flips
  and shifts)."""
  s = max(1, images.shape[1] // 16)
  h, w = images.shape[1:3]
  padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
  views = [padded[:, s + dy * s:s + dy * s + h, s + dx * s:s + dx * s + w]
           for dy, dx in QUERY_SHIFTS]
  return np.stack(views + ([v[:, :, ::-1] for v in views] if flip else []))


def logit_margins(logits: np.ndarray, labels) -> np.ndarray:
  """z_y - logsumexp_{j != y} z_j: the log-odds of the label (stable LiRA statistic)."""
  own = logits[np.arange(len(labels)), labels]
  others = logits.copy()
  others[np.arange(len(labels)), labels] = -np.inf
  return own - np.log(np.sum(np.exp(others - others.max(1, keepdims=True)), 1)) - others.max(1)


def nearest_distances(canaries: Canaries, synthetic_images, synthetic_labels):
  """Negative pixel L2 distance ([0, 1] scale) to the nearest synthetic image, over all of
  them and over those of the planted class."""
  c = canaries.images.reshape(len(canaries.labels), -1).astype(np.float64) / 255.0
  s = synthetic_images.reshape(len(synthetic_images), -1).astype(np.float64) / 255.0
  d2 = (c ** 2).sum(1)[:, None] + (s ** 2).sum(1)[None] - 2 * c @ s.T
  d = np.sqrt(np.maximum(d2, 0))
  same = synthetic_labels[None, :] == canaries.labels[:, None]
  return -d.min(1), -np.where(same, d, np.inf).min(1)


def model_scores(folder, canaries: Canaries, test,
                 flip: bool = True) -> tuple[np.ndarray, np.float64]:
  """A saved model's logit margins on the canaries' planted labels for every query of
  `augmented_queries` ([K, A], query 0 the image as it is), and its test accuracy."""
  from bnsynth_jax import artifacts
  model, variables, manifest = artifacts.load_model(folder)
  queries = augmented_queries(canaries.images, flip)
  logits = model_logits(model, variables, manifest, queries.reshape(-1, *queries.shape[2:]))
  margins = logit_margins(logits, np.tile(canaries.labels, len(queries)))
  test_logits = model_logits(model, variables, manifest, test[0])
  return (margins.reshape(len(queries), -1).T,
          np.float64(np.mean(np.argmax(test_logits, 1) == test[1])))


def score_run(run_dir, canaries: Canaries, test, config) -> dict[str, np.ndarray]:
  """Each target's scores of the K canaries ([K, A] for the models, their queries mirrored
  where the model trained on mirrored views; [K] for the synthetic images), and the two
  models' test accuracy."""
  from bnsynth_jax import synthetic_data
  run_dir = fileio.path(run_dir)
  out = {}
  for target, folder, flip in (
      ('student', run_dir / 'student' / 'synthetic', config.student.flip),
      ('teacher', run_dir / 'teacher', config.teacher.flip)):
    out[target], out[f'{target}_test_accuracy'] = model_scores(folder, canaries, test, flip)
  ds = synthetic_data.load_synthetic(run_dir / 'synthetic')
  out['synthetic_nn'], out['synthetic_nn_class'] = nearest_distances(canaries, ds.images,
                                                                     ds.labels)
  return out


# ----------------------------------------------------------------------------
# Shadow data folders and runs


def _write_png(path, image: np.ndarray) -> None:
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format='PNG')
  fileio.atomic_write_bytes(path, buf.getvalue())


def write_split(root, images, labels, class_names, prefix: str = 'img') -> list:
  """ROOT/<class>/<prefix>_<i>.png for each image (kept if already there)."""
  root = fileio.path(root)
  paths = []
  for i, (image, label) in enumerate(zip(images, labels)):
    path = root / class_names[int(label)] / f'{prefix}_{i:06d}.png'
    if not path.exists():
      path.parent.mkdir(parents=True, exist_ok=True)
      _write_png(path, image)
    paths.append(path)
  return paths


def shadow_data(workdir, m: int, base_paths, canary_paths, member: np.ndarray,
                alternative_paths=None):
  """WORKDIR/shadow_m/data: hard links to the base train images and this run's IN canaries
  (with `alternative_paths`, adjacency 'replace': each OUT canary's alternative record in
  its place), the test split linked to the shared one. Built in a temporary folder, then
  renamed."""
  import os
  import shutil
  root = fileio.path(workdir) / f'shadow_{m}' / 'data'
  if root.exists():
    return root
  tmp = root.parent / 'data.tmp'
  if tmp.exists():
    shutil.rmtree(str(tmp))
  slots = [p for p, is_in in zip(canary_paths, member) if is_in]
  if alternative_paths is not None:
    slots += [p for p, is_in in zip(alternative_paths, member) if not is_in]
  for src in list(base_paths) + slots:
    dst = tmp / 'train' / src.parent.name / f'{src.parent.parent.name}_{src.name}'
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(str(src), str(dst))
  os.symlink(str(fileio.path(workdir) / 'base' / 'test'), str(tmp / 'test'))
  os.rename(str(tmp), str(root))
  return root


def shadow_config(config, m: int, data_root):
  c = copy.deepcopy(config)
  c.data.source = 'imagefolder'
  c.data.root = str(data_root)
  c.data.name = ''
  c.seed = int(config.seed) + m
  return c


def _load_split(config, split: str):
  from bnsynth_jax.sources import PrivateData
  data = PrivateData(config.data)
  parts = data.split(split)
  order = np.argsort(np.concatenate([np.arange(p.index, data.split_size(split),
                                               data.num_partitions) for p in parts]))
  images = np.concatenate([p.images for p in parts])[order]
  labels = np.concatenate([p.labels for p in parts])[order]
  return images, labels, list(data.info.class_names)


def prepare(config, workdir, *, num_canaries: int, num_shadows: int, kind: str,
            train_subset: int, audit_seed: int, adjacency: str = 'add_remove') -> dict:
  """The base set, the canaries (and with adjacency 'replace' their alternatives) and the
  design, written once to WORKDIR (plan.json last); a later call reads them back, refusing
  other settings."""
  if adjacency not in ADJACENCIES:
    raise UserError(f"--adjacency={adjacency!r}: use one of {', '.join(ADJACENCIES)}")
  workdir = fileio.path(workdir)
  settings = {'canaries': num_canaries, 'shadows': num_shadows, 'kind': kind,
              'train_subset': train_subset, 'audit_seed': audit_seed,
              'data': {'source': config.data.source, 'name': config.data.name,
                       'root': config.data.root}, 'adjacency': adjacency}
  plan_file = workdir / 'plan.json'
  if plan_file.exists():
    plan = fileio.read_json(plan_file)
    plan['settings'].setdefault('adjacency', 'add_remove')   # audits before the flag
    if _only_more_shadows(plan['settings'], settings):
      plan = extend_design(workdir, plan, num_shadows)
    if plan['settings'] != settings:
      raise UserError(f'{workdir} holds a canary audit with other settings ({plan["settings"]}): '
                      'use a new --workdir or the same flags')
  else:
    rng = np.random.default_rng([audit_seed, 1234])
    images, labels, names = _load_split(config, 'train')
    test_images, test_labels, _ = _load_split(config, 'test')
    if names != sorted(names):           # image folders list classes sorted
      names = [f'{i:04d}_{n}' for i, n in enumerate(names)]
    canaries, keep = choose_canaries(images, labels, len(names), num_canaries, kind, rng)
    base = np.flatnonzero(keep)
    if train_subset:
      base = np.sort(rng.choice(base, min(train_subset, len(base)), replace=False))
    if adjacency == 'replace':
      design = independent_design(num_shadows, num_canaries, rng)
      alt = alternatives(canaries, images, labels, len(names), rng)
      write_split(workdir / 'base' / 'alternatives', alt.images, alt.labels, names,
                  prefix='alternative')
      fileio.atomic_write_npz(workdir / 'alternatives.npz', **dataclasses.asdict(alt))
    else:
      design = balanced_design(num_shadows, num_canaries, rng)
    write_split(workdir / 'base' / 'train', images[base], labels[base], names)
    write_split(workdir / 'base' / 'test', test_images, test_labels, names)
    write_split(workdir / 'base' / 'canaries', canaries.images, canaries.labels, names,
                prefix='canary')
    fileio.atomic_write_npz(workdir / 'test.npz', images=test_images, labels=test_labels)
    fileio.atomic_write_npz(workdir / 'canaries.npz', **dataclasses.asdict(canaries),
                            design=design, base_index=base)
    plan = {'settings': settings, 'class_names': names, 'base_size': int(len(base)),
            'test_size': int(len(test_labels))}
    fileio.atomic_write_json(plan_file, plan)
  arrays = fileio.read_npz(workdir / 'canaries.npz')
  plan['canaries'] = Canaries(*(arrays[f.name] for f in dataclasses.fields(Canaries)))
  plan['design'] = arrays['design'][:plan['settings']['shadows']].astype(bool)
  if adjacency == 'replace':
    alt = fileio.read_npz(workdir / 'alternatives.npz')
    plan['alternatives'] = Alternatives(alt['images'], alt['labels'])
  return plan


def _only_more_shadows(old: dict, new: dict) -> bool:
  return ({**old, 'shadows': new['shadows']} == new and new['shadows'] > old['shadows']
          and new['adjacency'] == 'replace')


def extend_design(workdir, plan: dict, num_shadows: int) -> dict:
  """An audit with the independent design (--adjacency=replace) grown to `num_shadows` runs:
  its rows kept, each new run m's row fair coins from a stream of run m's own (`grown_row`),
  so the design stays independent fair coins (what the one-run bound assumes), the runs
  already trained keep their scores, and a row is the same whatever path the audit grew by
  (16 -> 32 -> 64 or 16 -> 64, in one process or several). canaries.npz first, plan.json last
  (atomic each): a crash between them leaves the old plan (`prepare` reads only its rows),
  and the same command extends again identically. Growing an audit after reading its report
  is a second look at the data: its intervals and bounds do not account for that choice."""
  old = plan['settings']['shadows']
  if num_shadows % 2:
    raise UserError(f'--shadows={num_shadows} must be even')
  arrays = dict(fileio.read_npz(workdir / 'canaries.npz'))
  kept = arrays['design'][:old].astype(bool)
  seed = plan['settings']['audit_seed']
  arrays['design'] = np.concatenate(
      [kept] + [grown_row(seed, m, kept.shape[1])[None] for m in range(old, num_shadows)])
  fileio.atomic_write_npz(workdir / 'canaries.npz', **arrays)
  plan = {**plan, 'settings': {**plan['settings'], 'shadows': num_shadows},
          'extended_from': plan.get('extended_from', []) + [old]}
  fileio.atomic_write_json(workdir / 'plan.json', plan)
  logging.info('canary audit: design extended from %d to %d shadow runs (the first %d kept)',
               old, num_shadows, old)
  return plan


def grown_row(audit_seed: int, m: int, k: int) -> np.ndarray:
  """bool [K]: the design row of run m added by growing an audit."""
  return np.random.default_rng([audit_seed, 4321, m]).random(k) < 0.5


def _paths(root, names, labels, prefix):
  return [fileio.path(root) / names[int(y)] / f'{prefix}_{i:06d}.png'
          for i, y in enumerate(labels)]


def run_shadow(config, workdir, m: int, plan: dict, real_student: bool = False,
               release_students: int = 0) -> dict[str, np.ndarray]:
  """Shadow run m (resumable: the pipeline's stages resume), then its scores (kept). With
  `real_student`, also the evaluate stage's student on the run's whole real training split;
  with `release_students`, that many more students on the run's release (each added to a
  finished run's scores without retraining anything else)."""
  from bnsynth_jax import pipeline
  from bnsynth_jax.workdir import stage_dir
  workdir = fileio.path(workdir)
  scores_file = workdir / f'shadow_{m}' / 'scores.npz'
  scores = dict(fileio.read_npz(scores_file)) if scores_file.exists() else None
  if scores is not None and _stale_queries(scores, config):
    logging.info('canary audit: shadow run %d: scored with other queries; rescoring', m + 1)
    scores = None       # the pipeline below finds its stages done and only scores
  if scores is not None and (not real_student or 'real_student' in scores) and (
      np.shape(scores.get('release_students', np.zeros((0,))))[0] >= release_students):
    return scores
  names = plan['class_names']
  base_paths = sorted((workdir / 'base' / 'train').glob('*/*.png'))
  canary_paths = _paths(workdir / 'base' / 'canaries', names, plan['canaries'].labels, 'canary')
  alt = plan.get('alternatives')
  alternative_paths = None if alt is None else _paths(workdir / 'base' / 'alternatives', names,
                                                      alt.labels, 'alternative')
  root = shadow_data(workdir, m, base_paths, canary_paths, plan['design'][m], alternative_paths)
  run_dir = workdir / f'shadow_{m}' / 'run'
  test = fileio.read_npz(workdir / 'test.npz')
  test = (test['images'], test['labels'])
  c = shadow_config(config, m, root)
  if scores is None:
    logging.info('canary audit: shadow run %d of %d (%d canaries IN)', m + 1,
                 len(plan['design']), int(plan['design'][m].sum()))
    pipeline.run(c, str(run_dir), STAGES)
    scores = score_run(run_dir, plan['canaries'], test, c)
  if real_student and 'real_student' not in scores:
    logging.info('canary audit: shadow run %d: the student on the real data', m + 1)
    c.evaluate.real_subset, c.evaluate.full_real = False, True
    pipeline.run(c, str(run_dir), 'evaluate')
    scores['real_student'], scores['real_student_test_accuracy'] = model_scores(
        stage_dir(run_dir, 'evaluate') / 'full_real', plan['canaries'], test, c.student.flip)
  if release_students:
    scores = _add_release_students(scores, c, run_dir, plan['canaries'], test,
                                   release_students, m)
  fileio.atomic_write_npz(scores_file, **scores)
  return scores


def release_student_scores(config, run_dir, j: int, canaries: Canaries,
                           test) -> tuple[np.ndarray, np.float64]:
  """Extra student j of a finished shadow run: the pipeline's student stage with another
  seed, in RUN/release_students/student_j, reading the run's synthetic release (and its
  mixed-view labels) through relative links; resumes like any stage. Its [K, A] margins
  and test accuracy."""
  import os
  from bnsynth_jax import config_lib, pipeline
  from bnsynth_jax.workdir import stage_dir
  run_dir = fileio.path(run_dir)
  mini = run_dir / 'release_students' / f'student_{j}'
  mini.mkdir(parents=True, exist_ok=True)
  for stage in ('synthesize', 'relabel'):
    folder, link = stage_dir(run_dir, stage), stage_dir(mini, stage)
    if folder.exists() and not os.path.lexists(str(link)):
      os.symlink(os.path.relpath(str(folder), str(mini)), str(link))
  c = copy.deepcopy(config)
  c.student.seed = config_lib.student_seed(config) + RELEASE_SEED_STRIDE * (j + 1)
  pipeline.run(c, str(mini), 'student')
  return model_scores(stage_dir(mini, 'student') / 'synthetic', canaries, test, c.student.flip)


def _add_release_students(scores: dict, config, run_dir, canaries, test, n: int,
                          m: int) -> dict:
  have = np.shape(scores.get('release_students', np.zeros((0,))))[0]
  if have >= n:
    return scores
  logging.info('canary audit: shadow run %d: %d more students on its release', m + 1, n)
  extra = [release_student_scores(config, run_dir, j, canaries, test) for j in range(n)]
  return {**scores, 'release_students': np.stack([e[0] for e in extra]),
          'release_students_test_accuracy': np.array([e[1] for e in extra])}


def with_release(run: dict, n: int) -> dict:
  """A run's scores with the 'release' target: the mean margin of its student and its first
  n extra students."""
  if not n or 'release_students' not in run or len(run['release_students']) < n:
    return run
  students = np.concatenate([run['student'][None], run['release_students'][:n]])
  return {**run, 'release': students.mean(0),
          'release_test_accuracy': np.float64(np.mean(np.concatenate(
              [[run['student_test_accuracy']], run['release_students_test_accuracy'][:n]])))}


def _stale_queries(scores: dict, config) -> bool:
  """Whether a run's kept scores used another query set than `augmented_queries` now makes."""
  expected = len(QUERY_SHIFTS) * (2 if config.student.flip else 1)
  return np.shape(scores['student'])[-1] != expected


def parse_ids(spec: str, num_shadows: int) -> list[int]:
  if not spec:
    return list(range(num_shadows))
  ids = []
  for part in spec.split(','):
    got = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
    if not got:
      raise UserError(f'--shadow_ids={spec!r}: write run numbers like 0-7 or 0,2,4')
    lo, hi = int(got[1]), int(got[2] or got[1])
    ids += range(lo, hi + 1)
  bad = [i for i in ids if i >= num_shadows]
  if bad:
    raise UserError(f'--shadow_ids names runs {bad} but there are {num_shadows} (0-'
                    f'{num_shadows - 1})')
  return ids


def run(config, workdir, *, num_canaries: int = 50, num_shadows: int = 16,
        kind: str = 'mislabeled', train_subset: int = 0, shadow_ids: str = '',
        bootstrap: int = 200, audit_seed: int = 0, real_student: bool = False,
        adjacency: str = 'add_remove', release_students: int = 0,
        null_permutations: int = 0) -> str | None:
  """Trains the missing shadow runs among `shadow_ids`, then (all runs scored) writes the
  report and returns its table; None while runs are missing."""
  if null_permutations < 0:
    raise UserError(f'--null_permutations={null_permutations}: use 0 (no null) or more, e.g. 100')
  workdir = fileio.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  plan = prepare(config, workdir, num_canaries=num_canaries, num_shadows=num_shadows,
                 kind=kind, train_subset=train_subset, audit_seed=audit_seed,
                 adjacency=adjacency)
  for m in parse_ids(shadow_ids, num_shadows):
    run_shadow(config, workdir, m, plan, real_student, release_students)
  files = [workdir / f'shadow_{m}' / 'scores.npz' for m in range(num_shadows)]
  if not all(f.exists() for f in files):
    return None
  runs = [with_release(fileio.read_npz(f), release_students) for f in files]
  targets = dict(TARGETS, **(REAL_STUDENT if real_student else {}),
                 **(RELEASE if release_students else {}))
  if not all(t in r for r in runs for t in targets):
    return None   # another process (--shadow_ids) still adds the real-data students
  scores = {t: np.stack([r[t] for r in runs]) for t in targets}
  results = canary_attacks.evaluate_attacks(scores, plan['design'], bootstrap, audit_seed)
  null = {}
  if null_permutations:
    logging.info('canary audit: the permutation null (%d shuffles of the design)',
                 null_permutations)
    null = {'null': canary_attacks.permutation_null(scores, plan['design'], null_permutations,
                                                    bootstrap, audit_seed, results)}
  summary = {
      'settings': plan['settings'], 'base_train_images': plan['base_size'],
      'privacy': _privacy_of(workdir),
      'test_accuracy': {t: {'mean': float(np.mean([r[f'{t}_test_accuracy'] for r in runs])),
                            'std': float(np.std([r[f'{t}_test_accuracy'] for r in runs]))}
                        for t in ('teacher', 'student', 'real_student', 'release')
                        if t in targets},
      'release_students': release_students, 'extended_from': plan.get('extended_from', []),
      'targets': targets, 'attacks': results,
      **null,
      **({'lower_bound': {t: canary_attacks.one_run_lower_bound(scores[t], plan['design']) for t in targets}}
         if adjacency == 'replace' else {}),
      'command': report_command(__import__('sys').argv[1:]),
  }
  fileio.atomic_write_json(workdir / 'canary_audit.json', summary)
  table = markdown(summary)
  fileio.atomic_write_text(workdir / 'canary_audit.md', table)
  _roc_figure(workdir / 'canary_roc.png', scores, plan['design'])
  return table


def _privacy_of(workdir) -> dict | None:
  report = workdir / 'shadow_0' / 'run' / 'report.json'
  return fileio.read_json(report).get('privacy') if report.exists() else None


def _fmt(measure: dict) -> str:
  ci = measure.get('ci95')
  text = f"{100 * measure['value']:.1f}%"
  return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else '')


def report_command(args: list[str]) -> str:
  """The command that reproduces the report: these flags without --shadow_ids (the report
  covers every shadow run, whichever process happened to finish the last one)."""
  from bnsynth_jax import report
  return report.format_command('python -m bnsynth_jax.canary', args, drop=('--shadow_ids',))


def markdown(summary: dict) -> str:
  s = summary['settings']
  p = summary.get('privacy')
  acc = summary['test_accuracy']
  lines = [
      f"# Canary audit: {s['canaries']} {s['kind']} canaries, {s['shadows']} shadow pipelines",
      '',
      *([f"- design grown from {', '.join(map(str, summary['extended_from']))} runs (their rows "
         'kept, the new ones fresh fair coins)'] if summary.get('extended_from') else []),
      f"- base train images: {summary['base_train_images']}; "
      + (ADJACENCY_TEXT['replace'] if s.get('adjacency') == 'replace'
         else ADJACENCY_TEXT['add_remove']),
      '- privacy: ' + (f"(epsilon {p['epsilon']:.3g}, delta {p['delta']:g}), {p['accountant']}"
                       if p else 'none (not differentially private)'),
      *([f"- the release target: the audit's student and {summary['release_students']} more "
         'trained on each run\'s release (other seeds), their margins averaged']
        if summary.get('release_students') else []),
      f"- test accuracy over the runs: teacher {100 * acc['teacher']['mean']:.2f}% "
      f"(sd {100 * acc['teacher']['std']:.2f}), synthetic-trained student "
      f"{100 * acc['student']['mean']:.2f}% (sd {100 * acc['student']['std']:.2f})"
      + (f", student trained on the real data {100 * acc['real_student']['mean']:.2f}% "
         f"(sd {100 * acc['real_student']['std']:.2f})" if 'real_student' in acc else ''),
      '', '| target | attack | AUC | TPR at 1% FPR | TPR at 0.1% FPR | epsilon indication |',
      '|---|---|---|---|---|---|']
  for target, attacks in summary['attacks'].items():
    for attack, m in attacks.items():
      attack = f"**strongest**: {m['attack']}" if attack == 'strongest' else attack
      lines.append(f"| {summary['targets'][target]} | {attack} | {_fmt(m['auc'])} | "
                   f"{_fmt(m['tpr_at_0.01_fpr'])} | {_fmt(m['tpr_at_0.001_fpr'])} | "
                   f"{m['epsilon_lower_bound_95']:.2f} |")
  lines += ['', 'Chance is AUC 50% and TPR equal to the FPR. Intervals: bootstrap 95% over the '
            f"{summary['attacks']['student']['lira']['num_in']} IN and "
            f"{summary['attacks']['student']['lira']['num_out']} OUT (run, canary) pairs. "
            + INDICATION_TEXT]
  lines += _lower_bound_lines(summary)
  lines += _null_lines(summary)
  lines += ['', f"Command: `{summary['command']}`", '']
  return '\n'.join(lines)


ADJACENCY_TEXT = {
    'add_remove': 'each canary IN half of the runs, absent from the others (add/remove)',
    'replace': 'each (run, canary) IN with probability 1/2 independently; an OUT run holds '
               "the canary's alternative record in its place (replace-one, the guarantee's "
               'adjacency)'}
INDICATION_TEXT = (
    "'Epsilon indication': jax_privacy's Clopper-Pearson bound (95%, delta 1e-5) treating each "
    '(run, canary) pair as an independent trial; the runs add or replace many canaries at '
    'once and the attack fits on the other runs, so it indicates leakage but is not a bound '
    "matched to the guarantee (that is the one-run bound of an audit with --adjacency=replace).")


def _lower_bound_lines(summary: dict) -> list[str]:
  bounds = summary.get('lower_bound')
  if not bounds:
    return ['', 'No lower bound matched to the guarantee: this audit removes canaries '
            '(add/remove) with a balanced design; --adjacency=replace gives one.']
  first = next(iter(bounds.values()))
  lines = ['', f"Lower bound on the replace-one epsilon ({100 * first['confidence']:.0f}% "
           f"confidence, delta {first['delta']:g}); " + first['method'] + ':', '',
           '| target | epsilon lower bound | attack (fold) |', '|---|---|---|']
  for target, b in bounds.items():
    lines.append(f"| {summary['targets'][target]} | {b['value']:.2f} | {b['attack']} "
                 f"({b['fold']}) |")
  return lines


def _null_lines(summary: dict) -> list[str]:
  null = summary.get('null')
  if not null:
    return []
  n = next(iter(null.values()))['permutations']
  lines = ['', f'The permutation null: each canary\'s IN/OUT bits shuffled across the runs '
           f'{n} times (membership unlinked from the scores), every attack refitted and the '
           'strongest chosen as above (so choosing the best of many attacks is in the null '
           'too). TPR at 0.1% FPR of the strongest attack and the upper end of its interval: '
           'observed, and the null\'s median [95th percentile]; the share of shuffles whose '
           f'upper end passes 1%; the p-value of the observed TPR (at least 1/{n + 1}; one per '
           'target, not corrected for their number; a small one means leakage this audit can '
           'tell from chance).', '',
           '| target | TPR at 0.1% FPR | null | upper end | null upper end | null upper end '
           '> 1% | p-value |', '|---|---|---|---|---|---|---|']
  for target, z in null.items():
    m = summary['attacks'][target]['strongest']['tpr_at_0.001_fpr']
    upper = f"{100 * m['ci95'][1]:.1f}%" if 'ci95' in m else '-'
    null_upper, share = ((f"{100 * z['upper_median']:.1f}% [{100 * z['upper_95th']:.1f}]",
                          f"{100 * z['share_upper_above_1pct']:.0f}%")
                         if 'upper_median' in z else ('-', '-'))
    lines.append(f"| {summary['targets'][target]} | {100 * m['value']:.1f}% | "
                 f"{100 * z['tpr_median']:.1f}% [{100 * z['tpr_95th']:.1f}] | {upper} | "
                 f"{null_upper} | {share} | {z['p_value']:.2f} |")
  return lines


def _roc_figure(path, scores: dict, design: np.ndarray) -> None:
  import io
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 5))
  for target, s in scores.items():
    lira = (canary_attacks.augmented_lira_scores(s, design, 'pooled') if s.ndim == 3
            else canary_attacks.lira_scores(s, design))
    fpr, tpr = canary_attacks.roc_curve(lira[design], lira[~design])
    ax.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=target)
  ax.plot([1e-4, 1], [1e-4, 1], 'k:', label='chance')
  ax.set(xscale='log', yscale='log', xlabel='false positive rate', ylabel='true positive rate',
         title='Canary audit, online LiRA')
  ax.legend(fontsize=8)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
  plt.close(fig)
  fileio.atomic_write_bytes(path, buf.getvalue())
