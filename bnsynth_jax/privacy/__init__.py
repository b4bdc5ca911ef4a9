"""Differential privacy: the budget, its accounting, DP-SGD batches, and noised statistics.

`--config.privacy.epsilon=E` (0 = off) makes the two things computed from private data
and handed to synthesis differentially private, with one (epsilon, delta) for both:

* the teacher's weights, by DP-SGD: every step a fixed-size batch drawn uniformly
  without replacement (independently per step, from secret randomness), each example's
  gradient (averaged over `privacy.augmult` augmentations of it) clipped to L2 norm
  `privacy.clip_norm` by `jax_privacy.clipped_grad`, the sum noised by
  `jax_privacy.noise_addition.gaussian_privatizer` with standard deviation
  noise_multiplier x the clipped sum's sensitivity. BatchNorm mixes the examples of a
  batch, so the teacher must be `model.norm=group` (GroupNorm + weight standardisation).
* the class-wise statistics, by the Gaussian mechanism (`noisy_classwise_statistics`):
  per example, the vector of its per-channel spatial means and spatial means of squares
  over every recorded layer is clipped to L2 norm R = `privacy.stats_clip_norm`, and a
  count coordinate of value R is appended. Per class, the sum of these vectors gets
  Gaussian noise of standard deviation noise_multiplier x 2R: replacing one example
  changes one class's sum by at most 2R, or two classes' sums by at most R*sqrt(2)
  each (2R together, the count coordinates included). The counts are therefore noised
  too (not public), and mean and variance are derived from the noised sums.

Adjacency is replace-one (a record substituted), the relation of fixed-size batches:
the teacher's steps are accounted as jax_privacy's DpsgdTrainingAccountant does for
`SamplingMethod.FIXED_BATCH_SIZE` (Poisson-subsampled Gaussian with the sensitivity
doubled), the statistics as one Gaussian mechanism, and the two are composed by a
dp_accounting PLD accountant. The budget is split by `privacy.teacher_fraction` (where it
is 0, by the fraction `privacy.teacher_fraction_by_epsilon` lists for this epsilon): each
part is calibrated at delta/2 on its own, and the composition is what is reported
(never more than the epsilon asked for; a plan that would exceed it is refused before
training). Everything after the stats stage (synthesis, per-view labels, students,
evaluation) only post-processes these two releases, so the synthetic set inherits the
guarantee. Normalisation constants are public in this mode (data.mean/std: a public
prior's recorded mean/std when privacy.prior is set, else 0.5), not computed from the
private images.

Secret randomness (bnsynth_jax/owner.py): the DP-SGD batch sampling and noise key come from
a 128-bit secret drawn from the OS when the teacher stage first starts, kept owner-only in
WORKDIR/.owner/secrets/ (never in a folder that is handed out) so that a killed run
resumes exactly, and deleted with the teacher's checkpoints when the teacher is final.
The statistics noise is drawn from the OS once, when the noised sums are written, and
kept nowhere. `privacy.noise_seed` fixes both for tests and audits only: a run with it
is recorded as not private (`private: false` in every record).

DP-SGD batches are uniform draws from the whole training split, on any number of
processes: every process holds the whole split (DP mode's data sets are small) and takes
its slice of the one global draw. Partitions of a sorted listing would make each
partition's sampling depend on the data order (one replaced record can move others
between partitions); a draw from the whole split does not (WholeSplitBatches).
"""

from __future__ import annotations

import math
import secrets
from typing import Sequence

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bnsynth_jax.errors import UserError
from bnsynth_jax.input_pipeline import Partition

ACCOUNTANT = 'pld'
MAX_NOISE_MULTIPLIER = 500.0     # a budget needing more noise than this is refused
MIN_NOISE_MULTIPLIER = 0.5       # less noise than this protects nothing (and PLD grows slow)
PUBLIC_MEAN, PUBLIC_STD = 0.5, 0.5
NOT_PRIVATE = ('privacy.noise_seed fixed the noise and the batch sampling (tests and audits '
               'only): anyone with the config can regenerate and subtract the noise')


def enabled(config) -> bool:
  return float(config.get('privacy', {}).get('epsilon', 0.0) or 0.0) > 0


def validate(config) -> None:
  """Config-only checks of DP mode (the preflight runs them with the teacher's)."""
  if not enabled(config):
    if config.get('privacy') and config.privacy.epsilon < 0:
      raise UserError(f'privacy.epsilon={config.privacy.epsilon} is negative: give a positive '
                      'epsilon, or 0 to turn DP mode off')
    return
  from bnsynth_jax.privacy import class_means, prior
  p = config.privacy
  problems = prior.problems(config) + class_means.problems(config)
  if config.model.get('norm', 'batch') != 'group' and not prior.enabled(config):
    problems.append('privacy.epsilon > 0 trains the teacher with per-example gradients, which '
                    'BatchNorm in training mode mixes across the batch: set '
                    '--config.model.norm=group (or fine-tune a public prior, privacy.prior, '
                    'whose BatchNorm statistics stay frozen); the tuned DP defaults, with a '
                    'data-free prior, are configs/digits_dp.py and configs/cifar10.py:cpu_dp')
  if config.teacher.pretrained or config.teacher.init_from:
    problems.append('privacy.epsilon > 0 needs a teacher trained here by DP-SGD: unset '
                    'teacher.pretrained / teacher.init_from (a public starting point is '
                    'privacy.prior, with privacy.prior_is_public=True)')
  if not 0 < p.delta < 1:
    problems.append(f'privacy.delta={p.delta} must be in (0, 1), e.g. 1e-5')
  try:
    fraction = teacher_fraction(p)
  except UserError as e:
    problems.append(str(e))
  else:
    if not 0 < fraction < 1:
      problems.append(f'privacy.teacher_fraction={fraction} must be in (0, 1): the share of '
                      'epsilon spent on the teacher, the rest on the statistics')
  if not p.clip_norm > 0:
    problems.append(f'privacy.clip_norm={p.clip_norm} must be positive')
  if p.stats_clip_norm < 0:
    problems.append(f'privacy.stats_clip_norm={p.stats_clip_norm} must be positive (0 = derived)')
  if p.augmult < 1:
    problems.append(f'privacy.augmult={p.augmult} must be at least 1')
  if problems:
    raise UserError('\n'.join(problems))


def fraction_table(text: str) -> list[tuple[float, float]]:
  """privacy.teacher_fraction_by_epsilon, 'E:F,E:F,...', as (epsilon, fraction) pairs
  sorted by epsilon: each epsilon finite, >= 0 and listed once, each fraction in (0, 1)."""
  pairs = {}
  for item in filter(None, (t.strip() for t in text.split(','))):
    try:
      e, f = (float(v) for v in item.split(':'))
    except ValueError:
      e = f = math.nan
    if not (math.isfinite(e) and e >= 0 and 0 < f < 1) or e in pairs:
      raise UserError(f'privacy.teacher_fraction_by_epsilon={text!r}: {item!r} is not '
                      'EPSILON:FRACTION with a new epsilon >= 0 and a fraction in (0, 1); '
                      "write e.g. '1:0.7,8:0.5'")
    pairs[e] = f
  return sorted(pairs.items())


def fraction_entry(p) -> tuple[float, float] | None:
  """The (epsilon, fraction) entry of privacy.teacher_fraction_by_epsilon that applies when
  privacy.teacher_fraction is 0: the largest epsilon <= privacy.epsilon, else the smallest
  epsilon's; None when teacher_fraction is set."""
  if p.teacher_fraction:
    return None
  table = fraction_table(p.get('teacher_fraction_by_epsilon', ''))
  if not table:
    raise UserError('privacy.teacher_fraction=0 takes the fraction from '
                    "privacy.teacher_fraction_by_epsilon, which is empty: set one (e.g. "
                    "'1:0.7,8:0.5') or a teacher_fraction in (0, 1)")
  below = [entry for entry in table if entry[0] <= float(p.epsilon)]
  return below[-1] if below else table[0]


def teacher_fraction(p) -> float:
  """The share of epsilon spent on the teacher: privacy.teacher_fraction, or where it is 0
  the fraction privacy.teacher_fraction_by_epsilon gives this epsilon (fraction_entry)."""
  entry = fraction_entry(p)
  return float(p.teacher_fraction) if entry is None else entry[1]


def _fraction_source(p) -> dict:
  entry = fraction_entry(p)
  if entry is None:
    return {}
  return {'teacher_fraction_from': f'privacy.teacher_fraction_by_epsilon='
                                   f'{p.teacher_fraction_by_epsilon!r}, entry {entry[0]:g}'}


# ----------------------------------------------------------------------------
# Accounting


def teacher_event(noise_multiplier: float, batch_size: int, num_samples: int,
                  steps: int) -> dp_accounting.DpEvent:
  """DP-SGD with fixed-size batches under replace-one adjacency, as jax_privacy's
  DpsgdTrainingAccountant accounts SamplingMethod.FIXED_BATCH_SIZE."""
  q = batch_size / float(num_samples)
  step = dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(noise_multiplier / 2.0))
  return dp_accounting.SelfComposedDpEvent(step, steps)


def class_means_event(noise_multiplier: float) -> dp_accounting.DpEvent:
  """The class-means head (privacy/class_means.py): one Gaussian mechanism on per-class
  sums of unit vectors, noise relative to the replace-one sensitivity 2."""
  return dp_accounting.GaussianDpEvent(noise_multiplier)


def _class_means_head(config) -> bool:
  return config.privacy.get('head', 'dpsgd') == 'class_means'


def stats_event(noise_multiplier: float) -> dp_accounting.DpEvent:
  """The noised class-wise sums: one Gaussian mechanism, noise relative to the replace-one
  sensitivity 2R."""
  return dp_accounting.GaussianDpEvent(noise_multiplier)


def epsilon_of(events, delta: float) -> float:
  accountant = dp_accounting.pld.PLDAccountant()
  accountant.compose(dp_accounting.ComposedDpEvent(list(events)))
  return float(accountant.get_epsilon(delta))


def _calibrate(make_event, target_epsilon: float, delta: float, what: str) -> float:
  try:
    sigma = dp_accounting.calibrate_dp_mechanism(
        dp_accounting.pld.PLDAccountant, make_event, target_epsilon, delta,
        dp_accounting.ExplicitBracketInterval(MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER),
        tol=1e-3)
  except (ValueError, RuntimeError):      # not bracketed: either end already meets it
    sigma = (MIN_NOISE_MULTIPLIER if epsilon_of([make_event(MIN_NOISE_MULTIPLIER)], delta)
             <= target_epsilon else math.inf)
  if not sigma <= MAX_NOISE_MULTIPLIER or epsilon_of([make_event(sigma)], delta) > target_epsilon:
    raise UserError(f'privacy: epsilon {target_epsilon:.4g} for the {what} needs a noise '
                    f'multiplier above {MAX_NOISE_MULTIPLIER:g}, where nothing is learned: raise '
                    'privacy.epsilon or privacy.delta, or (teacher) use fewer epochs / a '
                    'smaller batch')
  return float(sigma)


def _calibrate_rest(teacher: dp_accounting.DpEvent, target: float, delta: float,
                    upper: float) -> float:
  """The smallest statistics noise multiplier (<= upper, which meets the budget by basic
  composition) whose composition with `teacher` stays within `target`: bisection on the
  teacher's privacy loss distribution, computed once."""
  accountant = dp_accounting.pld.PLDAccountant()
  accountant.compose(teacher)
  teacher_pld = accountant._pld          # pylint: disable=protected-access
  pld = dp_accounting.pld.privacy_loss_distribution

  def total(sigma):
    gaussian = pld.from_gaussian_mechanism(standard_deviation=sigma,
                                           value_discretization_interval=1e-4)
    return teacher_pld.compose(gaussian).get_epsilon_for_delta(delta)

  lo, hi = MIN_NOISE_MULTIPLIER, upper
  if total(hi) > target:
    return upper
  for _ in range(40):
    mid = math.sqrt(lo * hi)
    lo, hi = (lo, mid) if total(mid) <= target else (mid, hi)
    if hi / lo < 1.001:
      break
  return hi


def teacher_steps(config, train_size: int) -> int:
  cfg = config.teacher
  if cfg.get('num_steps', 0):
    return int(cfg.num_steps)
  return int(round(cfg.epochs * (train_size // cfg.batch_size)))


def plan(config, train_size: int) -> dict:
  """Calibrates the noise multipliers left at 0 and composes the budget; refuses a plan
  whose epsilon exceeds privacy.epsilon. Returns the record written into every manifest.
  DP-SGD draws its batches from the whole split (WholeSplitBatches): the sampling rate is
  batch / train_size on any number of processes."""
  p = config.privacy
  target, delta = float(p.epsilon), float(p.delta)
  n = int(train_size)
  steps = teacher_steps(config, train_size)
  batch = int(config.teacher.batch_size)
  if not 0 < batch <= n:
    raise UserError(f'privacy: teacher.batch_size={batch} must be between 1 and the {n} '
                    'training images: lower --config.teacher.batch_size')
  fraction = teacher_fraction(p)
  head = _class_means_head(config)
  make_teacher = (class_means_event if head else
                  lambda s: teacher_event(s, batch, n, steps))
  teacher_sigma = float(p.teacher_noise_multiplier) or _calibrate(
      make_teacher, target * fraction, delta / 2,
      'teacher (class-means head)' if head else 'teacher (DP-SGD)')
  stats_sigma = float(p.stats_noise_multiplier)
  if not stats_sigma:
    # The rest of the budget, measured on the composition (not at delta/2 on its own).
    alone = _calibrate(stats_event, target * (1 - fraction), delta / 2, 'statistics')
    stats_sigma = _calibrate_rest(make_teacher(teacher_sigma), target, delta, alone)
  teacher_eps = epsilon_of([make_teacher(teacher_sigma)], delta)
  stats_eps = epsilon_of([stats_event(stats_sigma)], delta)
  total = epsilon_of([make_teacher(teacher_sigma), stats_event(stats_sigma)], delta)
  if total > target * (1 + 1e-6):
    raise UserError(f'privacy: this plan spends epsilon {total:.4g} > privacy.epsilon={target:g} '
                    f'(teacher noise multiplier {teacher_sigma:.4g}, statistics '
                    f'{stats_sigma:.4g}): leave privacy.*_noise_multiplier at 0 to calibrate, '
                    'or raise them')
  return {
      'epsilon': total, 'delta': delta, 'target_epsilon': target,
      'private': not p.noise_seed,
      **({} if not p.noise_seed else {'not_private_because': NOT_PRIVATE}),
      'accountant': f'dp_accounting PLD ({ACCOUNTANT}), replace-one adjacency',
      'teacher_fraction': fraction, **_fraction_source(p),
      'teacher': (_class_means_record(teacher_sigma, n, teacher_eps) if head else
                  {'mechanism': 'DP-SGD (fixed-size batches, per-example clipping, Gaussian)',
                   'noise_multiplier': teacher_sigma, 'clip_norm': float(p.clip_norm),
                   'batch_size': batch, 'steps': steps, 'accounted_examples': n,
                   'sampling_rate': batch / n, 'augmult': int(p.augmult),
                   'epsilon_alone': teacher_eps}),
      'stats': {'mechanism': 'Gaussian on clipped per-example moment vectors, per class, '
                             'counts noised', 'noise_multiplier': stats_sigma,
                'clip_norm': float(p.stats_clip_norm) or 'sqrt(vector length)',
                'epsilon_alone': stats_eps},
      'post_processing': 'synthesis, per-view labels, students and evaluation read only the '
                         'DP teacher and the DP statistics',
  }


def _class_means_record(sigma: float, n: int, epsilon_alone: float) -> dict:
  return {'mechanism': 'Gaussian on per-class sums of unit-normalised public projections of '
                       'public features (a frozen prior\'s or a data-free front end\'s; '
                       'class-means head, privacy/class_means.py)',
          'noise_multiplier': sigma, 'sensitivity': 2.0, 'accounted_examples': n,
          'epsilon_alone': epsilon_alone}


# ----------------------------------------------------------------------------
# Secret randomness


def teacher_secret(config, workdir) -> int:
  """The DP-SGD secret: privacy.noise_seed (tests, not private), else the teacher stage's
  128-bit owner-only secret (owner.py), deleted when the teacher is final."""
  from bnsynth_jax import owner
  if config.privacy.noise_seed:
    return int(config.privacy.noise_seed)
  return owner.stage_secret(workdir, 'teacher')


def noise_key(secret: int) -> jax.Array:
  """A raw threefry PRNG key (uint32[2]) holding 64 bits of the secret: full entropy (a
  key searched from the released weights has 2**64 candidates)."""
  bits = (secret ^ (secret >> 64)) & (2**64 - 1)
  return jnp.asarray(np.array([bits >> 32, bits & 0xFFFFFFFF], np.uint32))


NOISE_STREAMS = {'statistics': 7, 'class_means': 11}


def statistics_rng(config, purpose: str = 'statistics') -> np.random.Generator:
  """The noise of a one-shot mechanism (the statistics, the class-means head): fresh OS
  randomness (128 bits) kept nowhere; privacy.noise_seed fixes it for tests (not private),
  one stream per purpose."""
  if config.privacy.noise_seed:
    return np.random.default_rng([int(config.privacy.noise_seed), NOISE_STREAMS[purpose]])
  return np.random.default_rng(secrets.randbits(128))


class WholeSplitBatches:
  """DP-SGD batches: at every step one draw of `global_batch` examples uniformly without
  replacement from the whole split (all partitions, in partition order), independent of
  every other step (not an epoch permutation, whose accounting differs); this process
  takes its slice (process p of P: rows p*B/P to (p+1)*B/P of the draw, sorted), which is
  what parallel.to_global expects. The draw depends on (seed, step, split size) only --
  not on the data order, the partition count or the process count -- so resume is exact
  and 1 process equals 2."""

  def __init__(self, partitions: Sequence[Partition], split_size: int, global_batch: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    parts = sorted(partitions, key=lambda part: part.index)
    if sum(len(part) for part in parts) != split_size:
      raise ValueError(f'DP-SGD needs the whole training split ({split_size} examples) on '
                       f'every process, got {sum(len(part) for part in parts)}')
    if not 0 < global_batch <= split_size or global_batch % process_count:
      raise UserError(f'privacy: teacher.batch_size={global_batch} must be between 1 and the '
                      f'{split_size} training images and a multiple of the {process_count} '
                      'processes: change --config.teacher.batch_size')
    self.images = np.concatenate([part.images for part in parts])
    self.labels = np.concatenate([part.labels for part in parts])
    self.split_size, self.global_batch, self.seed = split_size, global_batch, seed
    self.steps_per_epoch = split_size // global_batch
    share = global_batch // process_count
    self._rows = slice(process_index * share, (process_index + 1) * share)

  def global_indices(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step])
    return np.sort(rng.choice(self.split_size, self.global_batch, replace=False))

  def local_indices(self, step: int) -> np.ndarray:
    """This process's rows of the step's draw."""
    return self.global_indices(step)[self._rows]

  def get(self, step: int) -> dict[str, np.ndarray]:
    idx = self.local_indices(step)
    return {'images': self.images[idx], 'labels': self.labels[idx]}


FRONT_END_CACHE_MAX_BYTES = 8 * 2**30    # above: the front end per step, as without the cache


def caches_front_end(config, model, images: np.ndarray) -> bool:
  """Whether DP-SGD trains on the public front end's outputs computed once
  (FrontEndBatches): privacy.cache_front_end, a model with a `public_front_end`
  (scatternet*), the teacher's images unaugmented (crop_padding 0, flip off), so that
  every step would transform the very same images again, and outputs of `images` that fit
  FRONT_END_CACHE_MAX_BYTES of host memory."""
  front_end = getattr(model, 'public_front_end', None)
  if not (config.privacy.get('cache_front_end', True) and front_end is not None
          and not config.teacher.crop_padding and not config.teacher.flip):
    return False
  nbytes = front_end_bytes(front_end, images)
  if nbytes > FRONT_END_CACHE_MAX_BYTES:
    logging.info('privacy: the front end of %d images would take %.1f GiB: computed at every '
                 'step instead', len(images), nbytes / 2**30)
    return False
  return True


def front_end_bytes(front_end, images: np.ndarray) -> int:
  """Host bytes of the front end's float32 outputs for `images` (shapes only)."""
  out = jax.eval_shape(front_end, jax.ShapeDtypeStruct(images.shape, jnp.float32))
  return int(np.prod(out.shape)) * 4


class FrontEndBatches:
  """WholeSplitBatches whose images are replaced by their public front end's outputs,
  computed once per training image here instead of at every step: the same draws, the same
  inputs to the per-example gradients (train.dp_train_step with `front_end_cached`), for
  N transforms instead of steps x batch (a 60-epoch ScatterNet teacher on 5,000 images:
  5,000 instead of 245,760). The features live in host memory: N x their size (5,000
  CIFAR-10 images under scatternet_*: 311 MB); privacy.cache_front_end=False turns it off.
  Nothing is released: the transform is public, and the head's DP-SGD is unchanged."""

  def __init__(self, batches: WholeSplitBatches, front_end, mean, std, chunk: int = 250):
    self.steps_per_epoch = batches.steps_per_epoch
    self.features = front_end_features(front_end, batches.images, mean, std, chunk)
    self.labels = batches.labels
    self.local_indices = batches.local_indices    # the draw (its images are not kept)

  def get(self, step: int) -> dict[str, np.ndarray]:
    idx = self.local_indices(step)
    return {'images': self.features[idx], 'labels': self.labels[idx]}


def front_end_features(front_end, images: np.ndarray, mean, std, chunk: int) -> np.ndarray:
  """front_end(standardised images), in chunks of one shape (the last padded), on host."""
  from bnsynth_jax import augment
  transform = jax.jit(lambda x: front_end(augment.normalise(x, mean, std)))
  n = len(images)
  padded = np.concatenate([images, np.zeros((-n % chunk, *images.shape[1:]), images.dtype)])
  return np.concatenate([np.asarray(transform(padded[i:i + chunk]))
                         for i in range(0, len(padded), chunk)])[:n]


# ----------------------------------------------------------------------------
# Noised class-wise statistics


def moment_vectors(captured: dict[str, jax.Array], scales: dict[str, float]) -> jax.Array:
  """Per example, the per-channel spatial means / s and means of squares / s^2 of every
  layer's input (s: the layer's public scale), concatenated in the order of `captured`
  ([N, 2 * sum of channels]). The scales put every layer on one footing, so that the
  clipping bound is not spent on the deep layers' large activations."""
  parts = []
  for name, a in captured.items():
    a = a.astype(jnp.float32) / scales[name]
    parts += [jnp.mean(a, axis=(1, 2)), jnp.mean(jnp.square(a), axis=(1, 2))]
  return jnp.concatenate(parts, axis=1)


def public_scales(model, variables, image_shape, num_probe: int = 64) -> dict[str, float]:
  """Each normalisation layer's input RMS on uniform-noise images: a function of the (DP)
  teacher and public noise only, so it costs no privacy."""
  from bnsynth_jax import artifacts, models   # models imports nothing of ours; keep it lazy
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1.0, 1.0, (num_probe, *image_shape)), jnp.float32)
  _, captured = models.capture_bn_inputs(model, variables, x)
  return {artifacts.layer_key(p): float(jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32)))))
          or 1.0 for p, a in captured.items()}


def clipped_class_sums(vectors: jax.Array, labels: jax.Array, mask: jax.Array,
                       num_classes: int, clip_norm: float):
  """Per class: the sum of the example vectors clipped to L2 norm clip_norm, with a count
  coordinate of value clip_norm appended ([C, D + 1]); and how many were clipped."""
  norms = jnp.linalg.norm(vectors, axis=1)
  clip_norm = clip_norm or math.sqrt(vectors.shape[1])
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
  clipped = vectors * scale[:, None]
  rows = jnp.concatenate([clipped, jnp.full((len(norms), 1), clip_norm, jnp.float32)], axis=1)
  weights = jax.nn.one_hot(labels, num_classes) * mask[:, None]
  return weights.T @ rows, jnp.sum((norms > clip_norm) * mask)


VAR_FLOOR = 1e-3      # of the layer's scale squared: a noised variance is at least this


def noised_moments(sums: np.ndarray, layer_channels: dict[str, int], scales: dict[str, float],
                   clip_norm: float, noise_multiplier: float, rng: np.random.Generator):
  """Adds the Gaussian noise to the per-class sums ([C, D + 1], float64) and derives
  {'mean', 'var'} per layer (in the layer's own units) and the noised counts. Returns
  (statistics, counts)."""
  clip_norm = clip_norm or math.sqrt(sums.shape[1] - 1)
  noisy = sums + rng.normal(0.0, noise_multiplier * 2.0 * clip_norm, sums.shape)
  counts = np.maximum(noisy[:, -1] / clip_norm, 1.0)
  out, offset = {'mean': {}, 'var': {}}, 0
  for name, c in layer_channels.items():
    mean = noisy[:, offset:offset + c] / counts[:, None]
    square = noisy[:, offset + c:offset + 2 * c] / counts[:, None]
    out['mean'][name] = mean * scales[name]
    out['var'][name] = np.maximum(square - np.square(mean), VAR_FLOOR) * scales[name] ** 2
    offset += 2 * c
  return out, counts
