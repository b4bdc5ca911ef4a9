"""Synthesis: optimise images from noise until the teacher's BN statistics match.

Objective for a batch x (normalised input space) with target labels y:

  x~   = augment(x)          random shift (roll) + flip, or random resized crop
  L_bn = sum_l w_l (||mu_l(x~) - m_l|| + ||s2_l(x~) - v_l||)
         global: moments over the whole (global) batch; classwise: per class c over
         the images of class c in the batch, against m_lc, v_lc, averaged over the
         classes present. w_1 = first_bn_multiplier, other w_l = 1.
  L    = a_bn L_bn + a_ce CE(teacher(x~), y) + a_tv2 TV_l2(x) + a_tv1 TV_l1(x)
         + a_l2 ||x|| [+ a_adi (1 - JS(student, teacher))] [+ a_div D(x~)]
         D = mean cosine similarity of the teacher's penultimate features over the pairs
         of distinct images of one class in the batch (a batch-level diversity term)

The BN inputs are captured inside the teacher's own Flax forward pass
(`models.capture_bn_inputs`): the model code that trained the teacher is the code
that synthesises. The teacher runs in inference mode.

One `jax.jit` step over the 'data' mesh axis: images, labels and optimiser state
are sharded, the teacher and the targets replicated. With stats_scope=global the
moments reduce over the global batch (XLA all-reduces the sums: the same numbers
as one device). With stats_scope=per_device each device matches on its own
slice inside `jax.shard_map` (what the single-GPU PyTorch peers do; cheaper on
pods).

Dataset-scale generation: N = images_per_class x classes images in batches of B,
K iterations each. Batch i uses the key fold_in(seed, i) and the labels
(arange(N) % C)[iB:(i+1)B], so the output does not depend on device or process
count, and a resumed run repeats nothing: finished batches are shards on disk,
the batch in flight resumes from its last orbax checkpoint. Nor does batch i depend
on N: synthesis.reuse_from copies the batches of a set made with the same teacher,
statistics and settings but another image count (grow 2,000 images to 10,000, or
take the first 1,000 of them) instead of computing them again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from bnsynth_jax import (artifacts, augment, checkpointing, fileio, metrics, models,
                         parallel, report, synthetic_data)
from bnsynth_jax.errors import UserError
from bnsynth_jax.workdir import stage_dir

AUGMENTS = ('jitter_flip', 'random_resized_crop', 'none')
SCOPES = ('global', 'per_device')
NORMS = ('l2', 'squared_l2')


@flax.struct.dataclass
class SynthState:
  x: jax.Array             # [B, H, W, C] images in normalised space, float32
  opt_state: Any
  best_x: jax.Array
  best_loss: jax.Array     # scalar
  iteration: jax.Array     # int32 scalar


# ----------------------------------------------------------------------------
# Losses


def total_variation(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(L2, L1) total variation over the four neighbour directions (DeepInversion's form)."""
  diffs = (x[:, :, :-1, :] - x[:, :, 1:, :], x[:, :-1, :, :] - x[:, 1:, :, :],
           x[:, 1:, :-1, :] - x[:, :-1, 1:, :], x[:, :-1, :-1, :] - x[:, 1:, 1:, :])
  l2 = sum(jnp.sqrt(jnp.sum(jnp.square(d))) for d in diffs)
  l1 = sum(jnp.mean(jnp.abs(d)) for d in diffs)
  return l2, l1


def _distance(a: jax.Array, b: jax.Array, norm: str) -> jax.Array:
  sq = jnp.sum(jnp.square(a - b), axis=-1)
  return jnp.sqrt(sq + 1e-12) if norm == 'l2' else sq


def bn_matching_loss(captured: Mapping[tuple[str, ...], jax.Array], targets, layer_weights,
                     labels: jax.Array | None, num_classes: int, norm: str = 'l2'):
  """Sum over layers of w_l (||mu - m|| + ||s2 - v||); class-wise when labels is given.

  Args:
    captured: {layer path: BN input [N, H, W, ch]}.
    targets: {'mean': {name: [ch] or [C, ch]}, 'var': {...}} (name = '/'.join(path)).
    layer_weights: {name: weight}.
    labels: None for global matching; int labels [N] for class-wise matching.
  Returns:
    (loss, {name: per-layer loss}).
  """
  total, per_layer = 0.0, {}
  for path, a in captured.items():
    name = '/'.join(path)
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))   # bf16 -> f32; f64 stays
    m, v = targets['mean'][name], targets['var'][name]
    # One pass over the activations: sums of d = a - m and d^2, shifted by the (constant)
    # target mean m so that E[d^2] - E[d]^2 does not cancel. XLA fuses both sums into one
    # reduction; a two-pass variance would write a full-size (a - mu) tensor per layer,
    # in the forward and again in the backward pass (benchmarks/profile_synthesis.py).
    shift = jax.lax.stop_gradient(m).astype(a.dtype)
    if labels is None:
      d = a - shift
      s1 = jnp.mean(d, axis=(0, 1, 2))
      s2 = jnp.mean(jnp.square(d), axis=(0, 1, 2)) - jnp.square(s1)   # biased
      mu = s1 + shift
      layer = _distance(mu, m, norm) + _distance(s2, v, norm)
    else:
      w = jax.nn.one_hot(labels, num_classes, dtype=a.dtype)       # [N, C]
      hw = a.shape[1] * a.shape[2]
      n = jnp.sum(w, axis=0) * hw                                   # [C]
      safe_n = jnp.maximum(n, 1.0)[:, None]
      d = a - shift[labels][:, None, None, :]                       # each image: its class's m
      s1 = jnp.einsum('nc,nk->ck', w, jnp.sum(d, axis=(1, 2))) / safe_n
      s2 = (jnp.einsum('nc,nk->ck', w, jnp.sum(jnp.square(d), axis=(1, 2))) / safe_n -
            jnp.square(s1))
      mu = s1 + shift
      present = (n > 0).astype(a.dtype)
      per_class = _distance(mu, m, norm) + _distance(s2, v, norm)    # [C]
      layer = jnp.sum(per_class * present) / jnp.maximum(jnp.sum(present), 1.0)
    per_layer[name] = layer
    total = total + layer_weights[name] * layer
  return total, per_layer


def js_competition(teacher_logits, student_logits, temperature: float) -> jax.Array:
  """DeepInversion's adaptive term: 1 - clip(JS(student, teacher), 0, 1), softened by T."""
  p = jnp.clip(jax.nn.softmax(student_logits / temperature), 1e-3, 1.0)
  q = jnp.clip(jax.nn.softmax(teacher_logits / temperature), 1e-3, 1.0)
  m = 0.5 * (p + q)
  kl_m = lambda a: jnp.mean(jnp.sum(m * (jnp.log(m) - jnp.log(a)), axis=-1))
  js = 0.5 * kl_m(p) + 0.5 * kl_m(q)
  return 1.0 - jnp.clip(js, 0.0, 1.0)


def feature_similarity(features: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cosine similarity of features [N, D] over the pairs (i != j) of one class: the
  diversity term (0 where no class has two images in the batch)."""
  f = features * jax.lax.rsqrt(jnp.sum(jnp.square(features), -1, keepdims=True) + 1e-12)
  same = labels[:, None] == labels[None, :]
  pairs = same & ~jnp.eye(labels.shape[0], dtype=bool)
  sims = jnp.where(pairs, f @ f.T, 0.0)
  return jnp.sum(sims) / jnp.maximum(jnp.sum(pairs), 1)


def downsample2(x):
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') / 4.0


# ----------------------------------------------------------------------------
# The step




@dataclasses.dataclass(frozen=True)
class Problem:
  """What stays fixed during a synthesis run (closed over by the jitted functions)."""
  model: Any                 # the teacher in the synthesis dtype
  eval_model: Any            # the teacher in float32 (final measurements, soft labels)
  num_classes: int
  image_shape: tuple[int, int, int]
  classwise: bool
  layer_weights: dict[str, float]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  student: Any = None        # adaptive competition: a student model, or None

  @property
  def bounds(self):
    mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
    return (0.0 - mean) / std, (1.0 - mean) / std


def make_loss_fn(problem: Problem, cfg, lowres: bool = False) -> Callable:
  """loss_fn(x, labels, rng, teacher_vars, targets, student_vars) -> (loss, terms)."""

  def loss_fn(x, labels, rng, teacher_vars, targets, student_vars):
    x_aug = augment.augment(rng, x, cfg)
    if lowres:
      x_aug = downsample2(x_aug)
    if cfg.diversity_weight:
      (logits, features), captured = models.capture_bn_inputs(
          problem.model, teacher_vars, x_aug, return_features=True)
    else:
      logits, captured = models.capture_bn_inputs(problem.model, teacher_vars, x_aug)
    logits = logits.astype(jnp.float32)
    bn, _ = bn_matching_loss(captured, targets, problem.layer_weights,
                             labels if problem.classwise else None, problem.num_classes,
                             cfg.bn_norm)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    tv_l2, tv_l1 = total_variation(x)
    l2 = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2, 3))))
    loss = (cfg.bn_weight * bn + cfg.ce_weight * ce + cfg.tv_l2_weight * tv_l2 +
            cfg.tv_l1_weight * tv_l1 + cfg.l2_weight * l2)
    terms = {'bn': bn, 'ce': ce, 'tv_l2': tv_l2, 'tv_l1': tv_l1, 'l2': l2}
    if cfg.diversity_weight:
      div = feature_similarity(features.astype(jnp.float32), labels)
      loss = loss + cfg.diversity_weight * div
      terms['diversity'] = div
    if problem.student is not None:
      student_logits = problem.student.apply(student_vars, x_aug, train=False)
      adi = js_competition(logits, student_logits.astype(jnp.float32), cfg.adi_temperature)
      loss = loss + cfg.adi_weight * adi
      terms['adi'] = adi
    terms['loss'] = loss
    return loss, terms

  return loss_fn


def create_optimizer(cfg, total_iterations: int) -> optax.GradientTransformation:
  if cfg.schedule == 'cosine':
    lr = optax.cosine_decay_schedule(cfg.learning_rate, max(total_iterations, 1))
  elif cfg.schedule == 'constant':
    lr = cfg.learning_rate
  else:
    raise UserError(f"unknown synthesis.schedule {cfg.schedule!r}: use 'cosine' or 'constant'")
  if cfg.optimizer == 'adam':
    return optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  if cfg.optimizer == 'sgd':
    return optax.sgd(lr, momentum=cfg.b1)
  if cfg.optimizer == 'lion':
    return optax.lion(lr, b1=cfg.b1, b2=cfg.b2)
  raise UserError(f"unknown synthesis.optimizer {cfg.optimizer!r}: use adam, sgd or lion")


def state_shardings(state, mesh, batch_shape):
  """Leaves shaped like the image batch are sharded on 'data'; the rest replicated."""
  data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)
  return jax.tree.map(lambda leaf: data if tuple(leaf.shape) == tuple(batch_shape) else repl,
                      state)


def batch_keys(seed: int, batch_index):
  """(noise key, iteration key) of batch `batch_index`: fold_in(seed, i), split in two."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), batch_index))


def make_init(problem: Problem, tx, mesh, batch_size: int, seed: int):
  """init(batch_index) -> SynthState: clipped N(0, 1) noise from batch i's key."""
  shape = (batch_size, *problem.image_shape)
  lo, hi = problem.bounds

  def init(batch_index):
    noise_key = batch_keys(seed, batch_index)[0]
    x = jnp.clip(jax.random.normal(noise_key, shape, jnp.float32), lo, hi)
    return SynthState(x=x, opt_state=tx.init(x), best_x=x,
                      best_loss=jnp.asarray(jnp.inf, jnp.float32),
                      iteration=jnp.asarray(0, jnp.int32))

  abstract = jax.eval_shape(init, np.int32(0))
  shardings = state_shardings(abstract, mesh, shape)
  return jax.jit(init, in_shardings=parallel.replicated(mesh), out_shardings=shardings), shardings


def make_step(problem: Problem, cfg, tx, mesh, state_sharding, seed: int, lowres: bool = False):
  """The jitted step: (state, labels, batch_index, teacher, targets, student) -> (state, terms).

  Iteration t of batch i augments with fold_in(iteration key of batch i, t).
  """
  value_and_grad = jax.value_and_grad(make_loss_fn(problem, cfg, lowres), has_aux=True)
  grad_fn = value_and_grad
  if cfg.stats_scope == 'per_device':
    axis = parallel.DATA_AXIS

    num_devices = mesh.devices.size

    def local_grad(x, labels, rng, teacher_vars, targets, student_vars):
      if num_devices > 1:   # each device its own augmentation; one device = global scope
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
      (loss, terms), grad = value_and_grad(x, labels, rng, teacher_vars, targets, student_vars)
      return (jax.lax.pmean(loss, axis), jax.lax.pmean(terms, axis)), grad

    grad_fn = jax.shard_map(local_grad, mesh=mesh,
                            in_specs=(P(axis), P(axis), P(), P(), P(), P()),
                            out_specs=((P(), P()), P(axis)))
  lo, hi = problem.bounds

  def step(state: SynthState, labels, batch_index, teacher_vars, targets, student_vars):
    rng = jax.random.fold_in(batch_keys(seed, batch_index)[1], state.iteration)
    (loss, terms), grad = grad_fn(state.x, labels, rng, teacher_vars, targets, student_vars)
    updates, opt_state = tx.update(grad, state.opt_state, state.x)
    x = jnp.clip(optax.apply_updates(state.x, updates), lo, hi)
    # The loss was measured at state.x. A low-resolution (multires warm-up) loss is not
    # comparable with full-resolution ones (often lower): only full-resolution iterates can
    # be the kept best, else an image never optimised at full resolution is released.
    better = jnp.logical_and(not lowres, loss < state.best_loss)
    return SynthState(x=x, opt_state=opt_state,
                      best_x=jnp.where(better, state.x, state.best_x),
                      best_loss=jnp.where(better, loss, state.best_loss),
                      iteration=state.iteration + 1), terms

  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(state_sharding, data, repl, repl, repl, repl),
                 out_shardings=(state_sharding, repl), donate_argnums=0)


def make_finalize(problem: Problem, cfg, mesh):
  """Measures the released (uint8) images: BN loss, per-image CE, confidence, soft labels."""

  def finalize(x, labels, teacher_vars, targets):
    images = augment.to_uint8(x, problem.mean, problem.std)
    xq = augment.normalise(images, problem.mean, problem.std)
    logits, captured = models.capture_bn_inputs(problem.eval_model, teacher_vars, xq)
    bn, _ = bn_matching_loss(captured, targets, problem.layer_weights,
                             labels if problem.classwise else None, problem.num_classes,
                             cfg.bn_norm)
    probs = jax.nn.softmax(logits)
    per_image = {
        'images': images,
        'labels': labels,
        'loss': optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        'confidence': jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0],
        'soft_labels': jax.nn.softmax(logits / cfg.soft_label_temperature),
    }
    return per_image, bn

  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(finalize, in_shardings=(data, data, repl, repl),
                 out_shardings=(data, repl))


def make_view_labeler(problem: Problem, cfg, mesh, seed: int):
  """labeler(images_u8, indices, epoch, teacher) -> teacher softmax(logits / T) of the view
  augment.view_crop_flip(key(seed), epoch, indices) of each image (the student replays it)."""
  view_key = jax.random.key(seed)

  def labeler(images, indices, epoch, teacher_vars):
    x = augment.view_crop_flip(view_key, epoch, indices, augment.to_unit(images),
                               cfg.view_crop_padding, cfg.view_flip)
    x = augment.standardise(x, problem.mean, problem.std)
    logits = problem.eval_model.apply(teacher_vars, x, train=False).astype(jnp.float32)
    return jax.nn.softmax(logits / cfg.soft_label_temperature)

  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(labeler, in_shardings=(data, data, repl, repl), out_shardings=data)


def view_seed(seed: int) -> int:
  return seed + 1_000_003


# ----------------------------------------------------------------------------
# Inputs: the teacher artifact and the statistics artifact (no private data)


@dataclasses.dataclass
class Inputs:
  problem: Problem
  teacher_vars: Any
  targets: Any
  student_vars: Any
  teacher_manifest: dict
  stats_manifest: dict


def load_inputs(cfg, teacher_dir, stats_dir) -> Inputs:
  """Loads and cross-checks the teacher and statistics artifacts."""
  model, variables, teacher_manifest = artifacts.load_model(teacher_dir, dtype=cfg.dtype)
  eval_model, _, _ = artifacts.load_model(teacher_dir, dtype='float32')
  statistics, stats_manifest = artifacts.load_statistics(stats_dir, teacher_manifest, variables)
  layers = stats_manifest['layers']
  weights = {name: (cfg.first_bn_multiplier if i == 0 else 1.0)
             for i, name in enumerate(layers)}
  targets = {'mean': {k: np.asarray(v, np.float32) for k, v in statistics['mean'].items()},
             'var': {k: np.asarray(v, np.float32) for k, v in statistics['var'].items()}}
  student, student_vars = None, None
  if cfg.adi_weight:
    if not cfg.adi_student:
      raise UserError('synthesis.adi_weight > 0 needs a student to compete with: set '
                      'synthesis.adi_student to a model folder (e.g. WORKDIR/student/synthetic)')
    student, student_vars, student_manifest = artifacts.load_model(cfg.adi_student,
                                                                   dtype=cfg.dtype)
    if student_manifest['class_names'] != teacher_manifest['class_names']:
      raise UserError(f'synthesis.adi_student {cfg.adi_student} has other classes than the '
                      'teacher: use a student trained for the same classes')
  problem = Problem(model=model, eval_model=eval_model,
                    num_classes=teacher_manifest['num_classes'],
                    image_shape=tuple(teacher_manifest['image_shape']),
                    classwise=stats_manifest['kind'] == 'classwise', layer_weights=weights,
                    mean=tuple(teacher_manifest['mean']), std=tuple(teacher_manifest['std']),
                    student=student)
  return Inputs(problem, variables, targets, student_vars, teacher_manifest, stats_manifest)


def target_labels(num_images: int, num_classes: int) -> np.ndarray:
  """Class-balanced labels: image j has class j % C (every batch of a multiple of C is balanced)."""
  return (np.arange(num_images) % num_classes).astype(np.int32)


# ----------------------------------------------------------------------------
# Dataset-scale generation


def _process_slice(global_batch: int) -> slice:
  per = global_batch // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def _check_run_info(inputs: Inputs, cfg, out_dir, seed: int, num_images: int,
                    total_iterations: int) -> None:
  """A resumed run must be the same run: same teacher, statistics and settings."""
  run_info = {'teacher_sha256': inputs.teacher_manifest['variables_sha256'],
              'statistics_sha256': inputs.stats_manifest['statistics_sha256'],
              'num_images': num_images, 'batch_size': cfg.batch_size, 'seed': seed,
              'total_iterations': total_iterations, 'view_epochs': cfg.view_epochs}
  info_path = out_dir / 'run_info.json'
  if info_path.exists():
    stored = fileio.read_json(info_path)
    if stored != run_info:
      diff = sorted(k for k in run_info if stored.get(k) != run_info[k])
      raise UserError(f'{out_dir} holds a partial synthesis from other inputs ({", ".join(diff)} '
                      'differ): use a new workdir, or --overwrite')
  elif parallel.is_main_process():
    fileio.atomic_write_json(info_path, run_info)


# Stage-config keys a reused synthesis may differ in: the image count, and the sections whose
# effect on synthesis is pinned by the teacher and statistics sha256 (inputs.*, compared).
_REUSE_FREE = ('synthesis.images_per_class',)
_REUSE_PINNED = ('teacher.', 'privacy.', 'stats.')


def reuse_source(reuse_from) -> Any:
  """The synthetic folder synthesis.reuse_from names (a workdir or its synthetic/ folder)."""
  root = fileio.path(reuse_from)
  for candidate in (root / 'synthetic', root):
    if (candidate / 'run_info.json').exists():
      return candidate
  raise UserError(f'synthesis.reuse_from={reuse_from} holds no synthesis (no run_info.json in it '
                  'or in its synthetic/ folder): point it at a workdir whose synthesize stage '
                  'has started, or drop it')


def reuse_differences(own: dict, other: dict) -> list[str]:
  """The stage-config keys that make another synthesis's batches not this run's."""
  diffs = [k for k in ('inputs.teacher_sha256', 'inputs.statistics_sha256')
           if own.get(k) is None or own.get(k) != other.get(k)]
  return sorted(diffs + [
      k for k in own.keys() & other.keys()
      if k not in _REUSE_FREE and not k.startswith(_REUSE_PINNED) and not k.startswith('inputs.')
      and fileio.to_json(own[k]) != fileio.to_json(other[k])])


def precheck(config, workdir, stage_config: dict) -> None:
  """Before the stage records anything (pipeline.Stage.precheck): synthesis.reuse_from must
  name a synthesis made with this run's teacher, statistics and settings (its stage config
  covers every run_info field but the image count); else UserError naming the differences."""
  reuse_from = config.synthesis.get('reuse_from')
  if not reuse_from:
    return
  other_record = reuse_source(reuse_from) / 'stage_config.json'
  if not other_record.exists():
    raise UserError(f'synthesis.reuse_from needs a synthesis made by the pipeline ({other_record} '
                    'is missing): run it with python -m bnsynth_jax.main, or drop reuse_from')
  diffs = reuse_differences(stage_config, fileio.read_json(other_record))
  if diffs:
    raise UserError(f'synthesis.reuse_from={reuse_from} was made with other settings '
                    f'({", ".join(diffs[:4])}{" ..." if len(diffs) > 4 else ""} differ): its '
                    'batches are not this run\'s; point it at a synthesis that differs only in '
                    'images_per_class, or drop it')


def _reuse_batches(out_dir, source, labels_all: np.ndarray, num_batches: int,
                   timings: dict) -> int:
  """Copies the batches this run lacks from `source` (checked by precheck); returns how
  many. Main process only."""
  # A finished source records each shard's sha256: a copied shard must match it.
  manifest = source / 'manifest.json'
  recorded = ({e['file']: e['sha256'] for e in fileio.read_json(manifest)['shards']}
              if manifest.exists() else {})
  other_timings = (fileio.read_json(source / 'timings.json')
                   if (source / 'timings.json').exists() else {})
  batch, copied = len(labels_all) // num_batches, 0
  for i in range(num_batches):
    mine, theirs = synthetic_data.shard_path(out_dir, i), synthetic_data.shard_path(source, i)
    if mine.exists() or not theirs.exists():
      continue
    data = theirs.read_bytes()
    if theirs.name in recorded and hashlib.sha256(data).hexdigest() != recorded[theirs.name]:
      raise UserError(f'{theirs} was altered since its synthesis finished (sha256 differs from '
                      f'{manifest}): drop synthesis.reuse_from or use another source')
    if not np.array_equal(fileio.read_npz_bytes(data)['labels'],
                          labels_all[i * batch:(i + 1) * batch]):
      raise UserError(f'{theirs} holds other labels than batch {i} of this run: drop '
                      'synthesis.reuse_from or use another source')
    fileio.atomic_write_bytes(mine, data)
    if str(i) in other_timings:
      timings[str(i)] = {**other_timings[str(i)], 'reused_from': str(source)}
    copied += 1
  if copied:
    fileio.atomic_write_json(out_dir / 'timings.json', timings)
  logging.info('synthesize: reused %d of %d batches from %s (same teacher, statistics and '
               'settings)', copied, num_batches, source)
  return copied


@dataclasses.dataclass
class _Run:
  """What every batch of one synthesis run shares: compiled functions, replicated inputs."""
  cfg: Any
  mesh: Any
  init: Callable
  step: Callable
  lowres_step: Callable | None
  finalize: Callable
  labeler: Callable | None
  teacher_vars: Any
  targets: Any
  student_vars: Any
  total_iterations: int
  progress: metrics.Progress | None = None
  writer: metrics.Writer | None = None
  on_iteration: Callable[[int, int], None] | None = None
  done_iterations: int = 0


def _prepare_run(inputs: Inputs, cfg, seed: int, total_iterations: int) -> _Run:
  problem, mesh = inputs.problem, parallel.make_mesh()
  tx = create_optimizer(cfg, total_iterations)
  init_fn, sharding = make_init(problem, tx, mesh, cfg.batch_size, seed)
  return _Run(
      cfg=cfg, mesh=mesh, init=init_fn,
      step=make_step(problem, cfg, tx, mesh, sharding, seed),
      lowres_step=(make_step(problem, cfg, tx, mesh, sharding, seed, lowres=True)
                   if cfg.multires_iterations else None),
      finalize=make_finalize(problem, cfg, mesh),
      labeler=make_view_labeler(problem, cfg, mesh, view_seed(seed)) if cfg.view_epochs else None,
      teacher_vars=parallel.replicate(mesh, inputs.teacher_vars),
      targets=parallel.replicate(mesh, inputs.targets),
      student_vars=(parallel.replicate(mesh, inputs.student_vars)
                    if inputs.student_vars is not None else None),
      total_iterations=total_iterations)


def _log_iteration(run: _Run, i: int, done: int, latest: dict, where: str) -> None:
  if not all(np.isfinite(v) for v in latest.values()):
    raise UserError(f'synthesis batch {i} reached a non-finite loss at iteration {done} '
                    f'({latest}): lower synthesis.learning_rate or the loss weights; '
                    'nothing of this batch was written')
  if run.writer:
    run.writer.write_scalars(i * run.total_iterations + done, latest, log=False)
  logging.info(run.progress.line(
      run.done_iterations, f'{where} iteration {done}/{run.total_iterations}, loss '
      f"{latest['loss']:.4f}, bn {latest['bn']:.4f}, ce {latest['ce']:.4f}"))


def _optimise_batch(run: _Run, i: int, state, labels, ckpt_dir, where: str):
  """Runs (or resumes) batch i's iterations from its initial `state`; returns (state, first
  iteration, loop start)."""
  cfg, batch_index = run.cfg, np.int32(i)
  state, start = checkpointing.restore_or_init(ckpt_dir, state)
  if start:
    logging.info('synthesize: batch %d resumes at iteration %d', i, start)
  pending, t_loop = [], time.perf_counter()
  for it in range(start, run.total_iterations):
    fn = run.lowres_step if it < cfg.multires_iterations else run.step
    state, terms = fn(state, labels, batch_index, run.teacher_vars, run.targets,
                      run.student_vars)
    pending.append(terms)
    done = it + 1
    if it == start:   # the first iteration compiles: time the loop from here on
      jax.block_until_ready(terms)
      run.progress.first_step_done(run.done_iterations + 1)
      t_loop = time.perf_counter()
    run.done_iterations += 1
    if done % cfg.log_every_iterations == 0 or done == run.total_iterations:
      latest = {k: float(v) for k, v in parallel.to_host(pending[-1]).items()}
      pending.clear()
      _log_iteration(run, i, done, latest, where)
    if (cfg.checkpoint_every_iterations and done % cfg.checkpoint_every_iterations == 0
        and done < run.total_iterations):
      checkpointing.save(ckpt_dir, done, state)
    if run.on_iteration is not None:
      run.on_iteration(i, done)
  return state, start, t_loop


def _finish_batch(run: _Run, i: int, state, labels, bn_initial) -> tuple[dict, float]:
  """The batch's images, per-image losses, BN losses and per-view labels, on the host; and
  the seconds the per-view labelling took (teacher forward passes, images x view epochs)."""
  cfg, batch = run.cfg, run.cfg.batch_size
  final_x = state.best_x if cfg.keep_best else state.x
  per_image, bn_final = run.finalize(final_x, labels, run.teacher_vars, run.targets)
  host = {k: np.asarray(v) for k, v in parallel.to_host(per_image).items()}
  bn_values = np.asarray([float(parallel.to_host(bn_initial)),
                          float(parallel.to_host(bn_final))], np.float32)
  if not (np.all(np.isfinite(host['loss'])) and np.all(np.isfinite(bn_values))):
    raise UserError(f'synthesis batch {i} ended with a non-finite loss: lower '
                    'synthesis.learning_rate; nothing of this batch was written')
  t_label = time.perf_counter()
  if run.labeler is not None:   # per-view soft labels: [B, epochs, K], float16 to stay small
    indices = parallel.to_global(run.mesh, np.arange(i * batch, (i + 1) * batch,
                                                     dtype=np.int32)[_process_slice(batch)])
    per_epoch = [parallel.to_host(run.labeler(per_image['images'], indices, np.int32(e),
                                              run.teacher_vars))
                 for e in range(cfg.view_epochs)]
    host['view_soft_labels'] = np.stack(per_epoch, axis=1).astype(np.float16)
  label_seconds = time.perf_counter() - t_label
  return {**host, 'bn_loss_initial': bn_values[0], 'bn_loss_final': bn_values[1]}, label_seconds


def generate(inputs: Inputs, cfg, out_dir, seed: int, writer: metrics.Writer | None = None,
             on_iteration: Callable[[int, int], None] | None = None) -> dict:
  """Generates (or finishes) the whole dataset in out_dir; returns a summary."""
  out_dir = fileio.path(out_dir)
  num_images = cfg.images_per_class * inputs.problem.num_classes
  batch = cfg.batch_size
  num_batches = num_images // batch
  total_iterations = cfg.multires_iterations + cfg.iterations
  labels_all = target_labels(num_images, inputs.problem.num_classes)
  _check_run_info(inputs, cfg, out_dir, seed, num_images, total_iterations)
  timings_path = out_dir / 'timings.json'
  timings = fileio.read_json(timings_path) if timings_path.exists() else {}
  if cfg.get('reuse_from'):
    # The pipeline's precheck compared the settings on every process; process 0 copies.
    error = None
    if parallel.is_main_process():
      try:
        _reuse_batches(out_dir, reuse_source(cfg.reuse_from), labels_all, num_batches, timings)
      except UserError as e:   # an altered source shard: every process stops with it
        error = str(e)
    error = parallel.broadcast_from_main(error)
    if error:
      raise UserError(error)
  run = _prepare_run(inputs, cfg, seed, total_iterations)
  run.writer, run.on_iteration = writer, on_iteration
  # Process 0 decides what is left to do (hosts may see the filesystem at different times).
  todo = parallel.broadcast_from_main(
      [i for i in range(num_batches) if not synthetic_data.shard_path(out_dir, i).exists()])
  if len(todo) < num_batches:
    logging.info('synthesize: %d of %d batches done already, resuming', num_batches - len(todo),
                 num_batches)
  run.progress = metrics.Progress('synthesize', len(todo) * total_iterations, 0, batch,
                                  'image-iterations')
  for n, i in enumerate(todo):
    t_batch = time.perf_counter()
    labels = parallel.to_global(run.mesh, labels_all[i * batch:(i + 1) * batch][
        _process_slice(batch)])
    state = run.init(np.int32(i))
    _, bn_initial = run.finalize(state.x, labels, run.teacher_vars, run.targets)
    ckpt_dir = out_dir / 'inflight' / f'batch-{i:05d}'
    images_done = (num_batches - len(todo) + n) * batch
    where = f'batch {i + 1}/{num_batches}, {images_done}/{num_images} images done,'
    state, start, t_loop = _optimise_batch(run, i, state, labels, ckpt_dir, where)
    jax.block_until_ready(state)
    loop_seconds = time.perf_counter() - t_loop
    shard, label_seconds = _finish_batch(run, i, state, labels, bn_initial)
    checkpointing.close(ckpt_dir)
    if parallel.is_main_process():
      synthetic_data.write_shard(out_dir, i, shard)
      synthetic_data.write_samples(out_dir, i + 1, inputs.problem.num_classes)  # watchable
      # Steady-state rate: the first (compiling) iteration of each batch is not timed.
      timings[str(i)] = {'seconds': time.perf_counter() - t_batch,
                         'loop_seconds': loop_seconds,
                         'loop_image_iterations': batch * (total_iterations - start - 1),
                         'view_label_seconds': label_seconds}
      fileio.atomic_write_json(timings_path, timings)
      if ckpt_dir.exists():
        ckpt_dir.rmtree()
    parallel.sync(f'synthesis-batch-{i}')
  return finish(inputs, cfg, out_dir, seed, num_batches, timings)


def finish(inputs: Inputs, cfg, out_dir, seed: int, num_batches: int, timings: dict) -> dict:
  """Writes the manifest (last) and the sample grid; returns the summary for the report."""
  shards, arrays = synthetic_data.scan_shards(out_dir, num_batches)
  problem = inputs.problem
  cat = {k: np.concatenate([a[k] for a in arrays]) for k in ('labels', 'confidence')}
  agree = np.concatenate([np.argmax(a['soft_labels'], -1) == a['labels'] for a in arrays])
  loop_seconds = sum(t['loop_seconds'] for t in timings.values())
  image_iterations = sum(t['loop_image_iterations'] for t in timings.values())
  summary = {
      'num_images': int(len(cat['labels'])),
      'iterations': cfg.multires_iterations + cfg.iterations,
      'stats_kind': inputs.stats_manifest['kind'],
      'bn_loss_initial': float(np.mean([float(a['bn_loss_initial']) for a in arrays])),
      'bn_loss_final': float(np.mean([float(a['bn_loss_final']) for a in arrays])),
      'teacher_agreement': float(np.mean(agree)),
      'mean_confidence': float(np.mean(cat['confidence'])),
      'seconds': sum(t['seconds'] for t in timings.values()),
      'image_iterations_per_second': image_iterations / loop_seconds if loop_seconds else None,
      # Where the time went: the per-view labelling is images x view_epochs teacher forwards.
      'view_label_seconds': sum(t.get('view_label_seconds', 0.0) for t in timings.values()),
      'view_label_forward_passes': int(len(cat['labels'])) * int(cfg.view_epochs),
      'dtype': cfg.dtype, 'stats_scope': cfg.stats_scope,
      # Batches copied by synthesis.reuse_from (their seconds are the source's).
      'reused_batches': sum(1 for t in timings.values() if 'reused_from' in t),
  }
  if parallel.is_main_process():
    synthetic_data.write_samples(out_dir, num_batches, problem.num_classes)
    fileio.atomic_write_json(out_dir / 'metrics.json', summary)
    synthetic_data.write_manifest(
        out_dir, shards,
        images_per_class=cfg.images_per_class, num_classes=problem.num_classes,
        class_names=inputs.teacher_manifest['class_names'],
        image_shape=list(problem.image_shape), mean=list(problem.mean), std=list(problem.std),
        teacher_sha256=inputs.teacher_manifest['variables_sha256'],
        teacher_model=inputs.teacher_manifest['model'],
        statistics_sha256=inputs.stats_manifest['statistics_sha256'],
        stats_kind=inputs.stats_manifest['kind'],
        soft_label_temperature=cfg.soft_label_temperature,
        views=({'epochs': cfg.view_epochs, 'crop_padding': cfg.view_crop_padding,
                'flip': cfg.view_flip, 'seed': view_seed(seed),
                'temperature': cfg.soft_label_temperature} if cfg.view_epochs else None),
        seed=seed, synthesis_config=json.loads(cfg.to_json_best_effort()),
        # DP mode: the (epsilon, delta) of the teacher and statistics this set post-processes
        **({'privacy': inputs.stats_manifest['privacy']}
           if 'privacy' in inputs.stats_manifest else {}))
    inflight = out_dir / 'inflight'
    if inflight.exists():
      inflight.rmtree()
  parallel.sync('synthesis-finish')
  return summary


# ----------------------------------------------------------------------------
# The stage (no private data: it reads the teacher and statistics artifacts only)


def validate(config) -> None:
  cfg = config.synthesis
  checks = [('augment', AUGMENTS), ('stats_scope', SCOPES), ('bn_norm', NORMS),
            ('dtype', ('float32', 'bfloat16'))]
  for key, allowed in checks:
    if cfg[key] not in allowed:
      raise UserError(f'unknown synthesis.{key} {cfg[key]!r}: use one of {", ".join(allowed)}')
  if cfg.get('reuse_from'):
    reuse_source(cfg.reuse_from)
  if cfg.images_per_class < 0 or cfg.batch_size < 0 or cfg.iterations < 1:
    raise UserError(f'synthesis.images_per_class={cfg.images_per_class}, batch_size='
                    f'{cfg.batch_size}, iterations={cfg.iterations}: use images_per_class and '
                    'batch_size >= 1 (0 = derived) and iterations >= 1')


def input_fingerprints(config, workdir) -> dict:
  """The teacher and statistics a synthesis was made from (recorded in its stage_config):
  a finished synthesis is not reused for another teacher or other statistics."""
  cfg = config.synthesis
  out = {}
  for key, folder, field in (('teacher_sha256', cfg.teacher_dir or stage_dir(workdir, 'teacher'),
                              'variables_sha256'),
                             ('statistics_sha256', cfg.stats_dir or stage_dir(workdir, 'stats'),
                              'statistics_sha256')):
    manifest = fileio.path(folder) / 'manifest.json'
    if manifest.exists():
      out[key] = fileio.read_json(manifest).get(field)
  return out


def run(config, workdir) -> dict:
  cfg = config.synthesis
  teacher_dir = cfg.teacher_dir or stage_dir(workdir, 'teacher')
  stats_dir = cfg.stats_dir or stage_dir(workdir, 'stats')
  inputs = load_inputs(cfg, teacher_dir, stats_dir)
  num_images = cfg.images_per_class * inputs.problem.num_classes
  if num_images % cfg.batch_size:
    raise UserError(f'synthesis.batch_size={cfg.batch_size} does not divide the '
                    f'{num_images} images ({cfg.images_per_class} per class x '
                    f'{inputs.problem.num_classes} classes): choose a divisor')
  if cfg.multires_iterations and any(s % 2 for s in inputs.problem.image_shape[:2]):
    raise UserError('synthesis.multires_iterations needs even image sizes: set it to 0')
  writer = metrics.Writer(fileio.path(workdir) / 'tensorboard' / 'synthesis')
  try:   # closed on a refusal too (an open event writer fails at interpreter exit)
    summary = generate(inputs, cfg, stage_dir(workdir, 'synthesize'), config.seed, writer)
  finally:
    writer.close()
  report.update(workdir, {'synthesis': summary})
  if parallel.is_main_process():
    print(f"synthesis: {summary['num_images']} images, BN loss {summary['bn_loss_initial']:.4f} "
          f"-> {summary['bn_loss_final']:.4f}, teacher agreement "
          f"{summary['teacher_agreement']:.4f}, "
          f"{summary['image_iterations_per_second'] or float('nan'):.1f} image-iterations/s",
          flush=True)
  return summary
