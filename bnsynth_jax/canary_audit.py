"""The canary audit's logic (the command is bnsynth_jax/canary.py, which documents it)."""

from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
from absl import logging

from bnsynth_jax import fileio
from bnsynth_jax.errors import UserError

STAGES = 'teacher,stats,synthesize,relabel,student'   # relabel: a no-op at relabel.epochs 0
FPRS = (0.01, 0.001)
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


@dataclasses.dataclass
class Canaries:
  images: np.ndarray        # uint8 [K, H, W, C]
  labels: np.ndarray        # int32 [K], the planted labels
  true_labels: np.ndarray   # int32 [K], the source image's label (noise: -1)
  source_index: np.ndarray  # int [K], index in the train split (noise: -1)


# ----------------------------------------------------------------------------
# Canaries and the IN/OUT design


def choose_canaries(images, labels, num_classes: int, k: int, kind: str,
                    rng: np.random.Generator) -> tuple[Canaries, np.ndarray]:
  """K canaries and the mask of train images left in the base set."""
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


def balanced_design(num_shadows: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """bool [M, K]: canary k is IN exactly M/2 runs."""
  if num_shadows < 4 or num_shadows % 2:
    raise UserError(f'--shadows={num_shadows} must be even and at least 4 (16 or more for '
                    'TPR at low FPR)')
  column = np.arange(num_shadows) < num_shadows // 2
  return np.stack([rng.permutation(column) for _ in range(k)], axis=1)


# ----------------------------------------------------------------------------
# Attacks and their measures


# LiRA's variance choices and their attacks' name suffixes.
VARIANCES = {'': 'pooled', '_per_canary_variance': 'per_canary',
             '_shrunk_variance': 'shrunk'}


def lira_scores(scores: np.ndarray, design: np.ndarray, variance: str = 'pooled') -> np.ndarray:
  """Online LiRA, leave-one-run-out: [M, K] log-likelihood ratios log N(s; mu_in_k, sd_in) -
  log N(s; mu_out_k, sd_out) of each run's score, with per-canary IN and OUT means from the
  other runs. `variance`: 'pooled' -- one IN and one OUT variance over every canary (the
  fixed-variance LiRA, robust with few shadows); 'per_canary' -- each canary's own variance,
  its IN and OUT deviations pooled (as the LiRA paper's online attack with enough shadows;
  a canary with fewer than 2 IN or 2 OUT runs falls back to the pooled one); 'shrunk' --
  each canary's own averaged with the pool's (`_per_canary_sd`)."""
  m_runs = scores.shape[0]
  out = np.zeros_like(scores, dtype=np.float64)
  for m in range(m_runs):
    others = np.arange(m_runs) != m
    stats = []
    for member in (True, False):
      w = (design == member) & others[:, None]
      n = np.maximum(w.sum(0), 1)
      mu = (scores * w).sum(0) / n
      var = ((scores - mu) ** 2 * w).sum() / max(w.sum() - w.shape[1], 1)
      stats.append((mu, np.full(scores.shape[1], np.sqrt(max(var, 1e-12))), w))
    (mu_in, sd_in, w_in), (mu_out, sd_out, w_out) = stats
    if variance in ('per_canary', 'shrunk'):
      sd_in, sd_out = _per_canary_sd(scores, mu_in, mu_out, w_in, w_out, sd_in, sd_out,
                                     shrink=variance == 'shrunk')
    elif variance != 'pooled':
      raise ValueError(f'unknown LiRA variance {variance!r}')
    s = scores[m]
    out[m] = (-0.5 * ((s - mu_in) / sd_in) ** 2 - np.log(sd_in)
              + 0.5 * ((s - mu_out) / sd_out) ** 2 + np.log(sd_out))
  return out


def _per_canary_sd(scores, mu_in, mu_out, w_in, w_out, pooled_in, pooled_out,
                   shrink: bool = False):
  """Each canary's standard deviation, its IN and OUT squared deviations pooled (the same
  for both hypotheses); the pooled ones where a canary has too few runs of either kind.
  With `shrink`, each canary's variance is averaged half and half with the variance
  pooled over all canaries (an estimate from ~14 runs is noisy, and a too small one makes
  the likelihood ratio of an OUT run extreme: the false positives that decide TPR at low
  FPR)."""
  n_in, n_out = w_in.sum(0), w_out.sum(0)
  squares = ((scores - mu_in) ** 2 * w_in).sum(0) + ((scores - mu_out) ** 2 * w_out).sum(0)
  dof = np.maximum(n_in + n_out - 2, 1)
  var = np.maximum(squares / dof, 1e-12)
  if shrink:
    var = 0.5 * var + 0.5 * max(squares.sum() / max(dof.sum(), 1), 1e-12)
  sd = np.sqrt(var)
  enough = (n_in >= 2) & (n_out >= 2)
  return np.where(enough, sd, pooled_in), np.where(enough, sd, pooled_out)


def attack_measures(in_scores, out_scores, bootstrap: int, seed: int) -> dict:
  """AUC and TPR at FPRS (jax_privacy.auditing), each with a bootstrap 95% interval."""
  from jax_privacy import auditing
  auditor = auditing.CanaryScoreAuditor(np.asarray(in_scores), np.asarray(out_scores))
  params = (auditing.BootstrapParams(num_samples=bootstrap, quantiles=(0.025, 0.975),
                                     seed=seed) if bootstrap else None)

  def with_interval(value, fn):
    out = {'value': float(value)}
    if params is not None:
      lo, hi = np.asarray(fn(params), np.float64)
      out['ci95'] = [float(lo), float(hi)]
    return out

  result = {'auc': with_interval(auditor.attack_auroc(),
                                 lambda p: auditor.attack_auroc(bootstrap_params=p))}
  for fpr in FPRS:
    result[f'tpr_at_{fpr:g}_fpr'] = with_interval(
        auditor.tpr_at_given_fpr(fpr),
        lambda p, fpr=fpr: auditor.tpr_at_given_fpr(fpr, bootstrap_params=p))
  # A statistically valid lower bound on epsilon (Clopper-Pearson, 95%, Bonferroni over
  # thresholds): a DP run's must stay below its guarantee.
  result['epsilon_lower_bound_95'] = float(auditor.epsilon_clopper_pearson(0.05, delta=1e-5))
  result['num_in'], result['num_out'] = int(np.size(in_scores)), int(np.size(out_scores))
  return result


def roc_curve(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray]:
  scores = np.concatenate([in_scores, out_scores])
  member = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
  order = np.argsort(-scores, kind='stable')
  tpr = np.concatenate([[0], np.cumsum(member[order]) / max(len(in_scores), 1)])
  fpr = np.concatenate([[0], np.cumsum(1 - member[order]) / max(len(out_scores), 1)])
  return fpr, tpr


def augmented_lira_scores(scores: np.ndarray, design: np.ndarray, variance: str) -> np.ndarray:
  """LiRA over several queries per canary ([M, K, A] scores: flips and shifts): each
  query's log-likelihood ratio, averaged over the queries (as the LiRA paper's attack)."""
  return np.mean([lira_scores(scores[..., a], design, variance)
                  for a in range(scores.shape[-1])], axis=0)


def multivariate_lira_scores(scores: np.ndarray, design: np.ndarray,
                             per_canary_scale: bool = False) -> np.ndarray:
  """LiRA on all the queries of a canary at once ([M, K, A] scores -> [M, K]): per canary
  the IN and OUT mean vectors over the other runs, one covariance of the queries pooled
  over every (other run, canary) residual -- the queries of one canary (shifted views)
  are strongly correlated, which averaging their ratios as if independent ignores -- and
  the log-likelihood ratio of two Gaussians with that covariance, the linear discriminant
  d' C^-1 (s - (mu_in + mu_out) / 2), d = mu_in - mu_out. With `per_canary_scale`, each
  canary's covariance is the pooled one times its own residual scale (its mean squared
  Mahalanobis residual per query), shrunk half-way to 1 as `_per_canary_sd`."""
  m_runs, k, a = scores.shape
  out = np.zeros((m_runs, k))
  for m in range(m_runs):
    others = np.arange(m_runs) != m
    w_in = (design & others[:, None])[..., None]
    w_out = (~design & others[:, None])[..., None]
    mu_in = (scores * w_in).sum(0) / np.maximum(w_in.sum(0), 1)
    mu_out = (scores * w_out).sum(0) / np.maximum(w_out.sum(0), 1)
    resid = np.where(design[..., None], scores - mu_in, scores - mu_out)[others]  # [M-1, K, A]
    dof = max(resid.shape[0] * k - 2 * k, 1)
    cov = np.einsum('rka,rkb->ab', resid, resid) / dof
    cov += np.eye(a) * max(1e-9, 1e-6 * np.trace(cov) / a)
    inv = np.linalg.inv(cov)
    scale = np.ones(k)
    if per_canary_scale:
      own = np.einsum('rka,ab,rkb->k', resid, inv, resid) / (a * max(resid.shape[0] - 2, 1))
      scale = 0.5 * own + 0.5
    d = mu_in - mu_out
    out[m] = np.einsum('ka,ab,kb->k', d, inv, scores[m] - 0.5 * (mu_in + mu_out)) / scale
  return out


def evaluate_attacks(scores: dict[str, np.ndarray], design: np.ndarray, bootstrap: int,
                     seed: int) -> dict:
  """{target: {attack: measures}} over every (run, canary) pair: LiRA with a pooled, a
  per-canary and a shrunk per-canary variance, the global threshold, and for [M, K, A]
  scores (several queries per canary, `augmented_queries`) LiRA on the first (plain) query,
  over all of them (the likelihood ratios averaged), on their mean score, and on their
  vector (`multivariate_lira_scores`); then
  'strongest', the attack of the highest TPR at 0.1% FPR (ties: AUC)."""
  results = {}
  for target, s in scores.items():
    plain = s[..., 0] if s.ndim == 3 else s
    attacks = {}
    for suffix, variance in VARIANCES.items():
      attacks['lira' + suffix] = lira_scores(plain, design, variance)
      if s.ndim == 3:
        attacks['lira_augmented' + suffix] = augmented_lira_scores(s, design, variance)
        # The queries' scores averaged first (one less noisy statistic per canary), then LiRA.
        attacks['lira_mean_query' + suffix] = lira_scores(s.mean(-1), design, variance)
    if s.ndim == 3 and s.shape[-1] > 1:
      attacks['lira_multivariate'] = multivariate_lira_scores(s, design)
      attacks['lira_multivariate_per_canary_scale'] = multivariate_lira_scores(
          s, design, per_canary_scale=True)
    attacks['threshold'] = plain
    results[target] = {name: attack_measures(a[design], a[~design], bootstrap, seed)
                       for name, a in attacks.items()}
    best = max(results[target], key=lambda name: (
        results[target][name]['tpr_at_0.001_fpr']['value'], results[target][name]['auc']['value']))
    results[target]['strongest'] = {**results[target][best], 'attack': best}
  return results


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


def shadow_data(workdir, m: int, base_paths, canary_paths, member: np.ndarray):
  """WORKDIR/shadow_m/data: hard links to the base train images and this run's IN canaries,
  the test split linked to the shared one. Built in a temporary folder, then renamed."""
  import os
  import shutil
  root = fileio.path(workdir) / f'shadow_{m}' / 'data'
  if root.exists():
    return root
  tmp = root.parent / 'data.tmp'
  if tmp.exists():
    shutil.rmtree(str(tmp))
  for src in list(base_paths) + [p for p, is_in in zip(canary_paths, member) if is_in]:
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
            train_subset: int, audit_seed: int) -> dict:
  """The base set, the canaries and the design, written once to WORKDIR (plan.json last);
  a later call reads them back, refusing other settings."""
  workdir = fileio.path(workdir)
  settings = {'canaries': num_canaries, 'shadows': num_shadows, 'kind': kind,
              'train_subset': train_subset, 'audit_seed': audit_seed,
              'data': {'source': config.data.source, 'name': config.data.name,
                       'root': config.data.root}}
  plan_file = workdir / 'plan.json'
  if plan_file.exists():
    plan = fileio.read_json(plan_file)
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
  plan['design'] = arrays['design'].astype(bool)
  return plan


def _paths(root, names, labels, prefix):
  return [fileio.path(root) / names[int(y)] / f'{prefix}_{i:06d}.png'
          for i, y in enumerate(labels)]


def run_shadow(config, workdir, m: int, plan: dict,
               real_student: bool = False) -> dict[str, np.ndarray]:
  """Shadow run m (resumable: the pipeline's stages resume), then its scores (kept). With
  `real_student`, also the evaluate stage's student on the run's whole real training split
  (added to a finished run's scores without retraining anything else)."""
  from bnsynth_jax import pipeline
  from bnsynth_jax.workdir import stage_dir
  workdir = fileio.path(workdir)
  scores_file = workdir / f'shadow_{m}' / 'scores.npz'
  scores = dict(fileio.read_npz(scores_file)) if scores_file.exists() else None
  if scores is not None and _stale_queries(scores, config):
    logging.info('canary audit: shadow run %d: scored with other queries; rescoring', m + 1)
    scores = None       # the pipeline below finds its stages done and only scores
  if scores is not None and (not real_student or 'real_student' in scores):
    return scores
  names = plan['class_names']
  base_paths = sorted((workdir / 'base' / 'train').glob('*/*.png'))
  canary_paths = _paths(workdir / 'base' / 'canaries', names, plan['canaries'].labels, 'canary')
  root = shadow_data(workdir, m, base_paths, canary_paths, plan['design'][m])
  run_dir = workdir / f'shadow_{m}' / 'run'
  test = fileio.read_npz(workdir / 'test.npz')
  test = (test['images'], test['labels'])
  c = shadow_config(config, m, root)
  if scores is None:
    logging.info('canary audit: shadow run %d of %d (%d canaries IN)', m + 1,
                 len(plan['design']), int(plan['design'][m].sum()))
    pipeline.run(c, str(run_dir), STAGES)
    scores = score_run(run_dir, plan['canaries'], test, c)
  if real_student:
    logging.info('canary audit: shadow run %d: the student on the real data', m + 1)
    c.evaluate.real_subset, c.evaluate.full_real = False, True
    pipeline.run(c, str(run_dir), 'evaluate')
    scores['real_student'], scores['real_student_test_accuracy'] = model_scores(
        stage_dir(run_dir, 'evaluate') / 'full_real', plan['canaries'], test, c.student.flip)
  fileio.atomic_write_npz(scores_file, **scores)
  return scores


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
        bootstrap: int = 200, audit_seed: int = 0, real_student: bool = False) -> str | None:
  """Trains the missing shadow runs among `shadow_ids`, then (all runs scored) writes the
  report and returns its table; None while runs are missing."""
  workdir = fileio.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  plan = prepare(config, workdir, num_canaries=num_canaries, num_shadows=num_shadows,
                 kind=kind, train_subset=train_subset, audit_seed=audit_seed)
  for m in parse_ids(shadow_ids, num_shadows):
    run_shadow(config, workdir, m, plan, real_student)
  files = [workdir / f'shadow_{m}' / 'scores.npz' for m in range(num_shadows)]
  if not all(f.exists() for f in files):
    return None
  runs = [fileio.read_npz(f) for f in files]
  targets = dict(TARGETS, **(REAL_STUDENT if real_student else {}))
  if not all(t in r for r in runs for t in targets):
    return None   # another process (--shadow_ids) still adds the real-data students
  scores = {t: np.stack([r[t] for r in runs]) for t in targets}
  results = evaluate_attacks(scores, plan['design'], bootstrap, audit_seed)
  summary = {
      'settings': plan['settings'], 'base_train_images': plan['base_size'],
      'privacy': _privacy_of(workdir),
      'test_accuracy': {t: {'mean': float(np.mean([r[f'{t}_test_accuracy'] for r in runs])),
                            'std': float(np.std([r[f'{t}_test_accuracy'] for r in runs]))}
                        for t in ('teacher', 'student', 'real_student') if t in targets},
      'targets': targets, 'attacks': results,
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
      f"- base train images: {summary['base_train_images']}; each canary IN half of the runs",
      '- privacy: ' + (f"(epsilon {p['epsilon']:.3g}, delta {p['delta']:g}), {p['accountant']}"
                       if p else 'none (not differentially private)'),
      f"- test accuracy over the runs: teacher {100 * acc['teacher']['mean']:.2f}% "
      f"(sd {100 * acc['teacher']['std']:.2f}), synthetic-trained student "
      f"{100 * acc['student']['mean']:.2f}% (sd {100 * acc['student']['std']:.2f})"
      + (f", student trained on the real data {100 * acc['real_student']['mean']:.2f}% "
         f"(sd {100 * acc['real_student']['std']:.2f})" if 'real_student' in acc else ''),
      '', '| target | attack | AUC | TPR at 1% FPR | TPR at 0.1% FPR | epsilon lower bound |',
      '|---|---|---|---|---|---|']
  for target, attacks in summary['attacks'].items():
    for attack, m in attacks.items():
      attack = f"**strongest**: {m['attack']}" if attack == 'strongest' else attack
      lines.append(f"| {summary['targets'][target]} | {attack} | {_fmt(m['auc'])} | "
                   f"{_fmt(m['tpr_at_0.01_fpr'])} | {_fmt(m['tpr_at_0.001_fpr'])} | "
                   f"{m['epsilon_lower_bound_95']:.2f} |")
  lines += ['', 'Chance is AUC 50% and TPR equal to the FPR. The epsilon lower bound holds with 95% '
            'confidence (Clopper-Pearson, delta 1e-5): a DP run must stay below its epsilon. '
            'Intervals: bootstrap 95% over the '
            f"{summary['attacks']['student']['lira']['num_in']} IN and "
            f"{summary['attacks']['student']['lira']['num_out']} OUT (run, canary) pairs.",
            '', f"Command: `{summary['command']}`", '']
  return '\n'.join(lines)


def _roc_figure(path, scores: dict, design: np.ndarray) -> None:
  import io
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 5))
  for target, s in scores.items():
    lira = augmented_lira_scores(s, design, 'pooled') if s.ndim == 3 else lira_scores(s, design)
    fpr, tpr = roc_curve(lira[design], lira[~design])
    ax.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=target)
  ax.plot([1e-4, 1], [1e-4, 1], 'k:', label='chance')
  ax.set(xscale='log', yscale='log', xlabel='false positive rate', ylabel='true positive rate',
         title='Canary audit, online LiRA')
  ax.legend(fontsize=8)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
  plt.close(fig)
  fileio.atomic_write_bytes(path, buf.getvalue())
