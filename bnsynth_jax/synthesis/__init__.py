"""Synthesis: optimise images from noise until the teacher's BN statistics match.

Two methods share the objective (objective.py: BN matching + CE + TV, class-wise targets)
and everything here (inputs, the dataset loop, shards, resume, reuse, the final
measurements): synthesis.method=pixels (pixels.py, the images are the variables) and
synthesis.method=generator (generator.py, a small generator with a meta-learned
initialisation and per-batch latents makes each batch in a few steps, Fast-DFKD style).

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from bnsynth_jax import (artifacts, augment, checkpointing, fileio, metrics, models,
                         parallel, report, synthetic_data)
from bnsynth_jax.errors import UserError
from bnsynth_jax.synthesis import generator
# Re-exported: the objective and the pixel method are part of this module's interface.
from bnsynth_jax.synthesis.objective import (Problem, bn_matching_loss, feature_similarity,
                                             make_loss_fn, total_variation)
from bnsynth_jax.synthesis.pixels import (SynthState, batch_keys, create_optimizer, make_init,
                                          make_step, state_shardings)
from bnsynth_jax.workdir import stage_dir, stats_dir, teacher_dir

METHODS = ('pixels', 'generator')
AUGMENTS = ('jitter_flip', 'random_resized_crop', 'none')
SCOPES = ('global', 'per_device')
NORMS = ('l2', 'squared_l2')


# ----------------------------------------------------------------------------
# Final measurements (both methods)


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


def load_inputs(cfg, teacher_folder, stats_folder) -> Inputs:
  """Loads and cross-checks the teacher and statistics artifacts."""
  model, variables, teacher_manifest = artifacts.load_model(teacher_folder, dtype=cfg.dtype)
  eval_model, _, _ = artifacts.load_model(teacher_folder, dtype='float32')
  statistics, stats_manifest = artifacts.load_statistics(stats_folder, teacher_manifest, variables)
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
  if cfg.method == 'generator':   # (pixel runs keep the record they always had)
    run_info['generator'] = {'method': cfg.method, **cfg.generator.to_dict()}
  info_path = out_dir / 'run_info.json'
  if info_path.exists():
    stored = fileio.read_json(info_path)
    if stored != run_info:
      diff = sorted(k for k in stored.keys() | run_info.keys()
                    if stored.get(k) != run_info.get(k))
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
  if config.synthesis.method == 'generator':
    teacher = teacher_dir(config, workdir)
    if (teacher / 'manifest.json').exists():
      generator.check(fileio.read_json(teacher / 'manifest.json')['image_shape'])
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
  if cfg.method == 'generator':
    tx = generator.create_optimizer(cfg)
    init_fn, sharding = generator.make_init(problem, cfg, tx, mesh, seed)
    step, lowres_step = generator.make_step(problem, cfg, tx, mesh, sharding, seed), None
  else:
    tx = create_optimizer(cfg, total_iterations)
    init_fn, sharding = make_init(problem, tx, mesh, cfg.batch_size, seed)
    step = make_step(problem, cfg, tx, mesh, sharding, seed)
    lowres_step = (make_step(problem, cfg, tx, mesh, sharding, seed, lowres=True)
                   if cfg.multires_iterations else None)
  return _Run(
      cfg=cfg, mesh=mesh, init=init_fn, step=step, lowres_step=lowres_step,
      finalize=make_finalize(problem, cfg, mesh),
      labeler=make_view_labeler(problem, cfg, mesh, view_seed(seed)) if cfg.view_epochs else None,
      teacher_vars=parallel.replicate(mesh, inputs.teacher_vars),
      targets=parallel.replicate(mesh, inputs.targets),
      student_vars=(parallel.replicate(mesh, inputs.student_vars)
                    if inputs.student_vars is not None else None),
      total_iterations=total_iterations)


def _batch_iterations(cfg, i: int) -> int:
  if cfg.method == 'generator':
    return generator.iterations_of_batch(cfg, i)
  return cfg.multires_iterations + cfg.iterations


def _start_batch(run: _Run, inputs: Inputs, out_dir, seed: int, i: int):
  """Batch i's initial state (and, for the generator, the initialisation it starts from)."""
  run.total_iterations = _batch_iterations(run.cfg, i)
  if run.cfg.method != 'generator':
    return run.init(np.int32(i)), None
  start = generator.load_init(out_dir, inputs.problem, run.cfg, seed, i)
  return run.init(np.int32(i), parallel.replicate(run.mesh, start)), start


def _end_batch(run: _Run, out_dir, i: int, state, start) -> None:
  """The generator's next initialisation, written before batch i's shard (resume reads it)."""
  if run.cfg.method == 'generator':
    adapted = parallel.to_host(state.params)
    generator.save_init(out_dir, i, generator.meta_update(start, adapted,
                                                          float(run.cfg.generator.meta_lr)))


def _log_iteration(run: _Run, i: int, done: int, latest: dict, where: str) -> None:
  if not all(np.isfinite(v) for v in latest.values()):
    raise UserError(f'synthesis batch {i} reached a non-finite loss at iteration {done} '
                    f'({latest}): lower synthesis.learning_rate or the loss weights; '
                    'nothing of this batch was written')
  if run.writer:
    offset = sum(_batch_iterations(run.cfg, j) for j in range(i))
    run.writer.write_scalars(offset + done, latest, log=False)
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
  if cfg.method == 'generator' and todo != list(range(num_batches - len(todo), num_batches)):
    raise UserError(f'{out_dir} misses batch shards out of order: a generator synthesis makes '
                    'its batches in sequence; rerun it with --overwrite')
  run.progress = metrics.Progress('synthesize', sum(_batch_iterations(cfg, i) for i in todo), 0,
                                  batch, 'image-iterations')
  for n, i in enumerate(todo):
    t_batch = time.perf_counter()
    labels = parallel.to_global(run.mesh, labels_all[i * batch:(i + 1) * batch][
        _process_slice(batch)])
    state, start_params = _start_batch(run, inputs, out_dir, seed, i)
    _, bn_initial = run.finalize(state.x, labels, run.teacher_vars, run.targets)
    ckpt_dir = out_dir / 'inflight' / f'batch-{i:05d}'
    images_done = (num_batches - len(todo) + n) * batch
    where = f'batch {i + 1}/{num_batches}, {images_done}/{num_images} images done,'
    state, start, t_loop = _optimise_batch(run, i, state, labels, ckpt_dir, where)
    jax.block_until_ready(state)
    loop_seconds = time.perf_counter() - t_loop
    shard, label_seconds = _finish_batch(run, i, state, labels, bn_initial)
    _end_batch(run, out_dir, i, state, start_params)
    checkpointing.close(ckpt_dir)
    if parallel.is_main_process():
      synthetic_data.write_shard(out_dir, i, shard)
      synthetic_data.write_samples(out_dir, i + 1, inputs.problem.num_classes)  # watchable
      # Steady-state rate: the first (compiling) iteration of each batch is not timed.
      timings[str(i)] = {'seconds': time.perf_counter() - t_batch,
                         'loop_seconds': loop_seconds,
                         'loop_image_iterations': batch * (run.total_iterations - start - 1),
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
      'method': cfg.method,
      # Optimiser steps per image (the generator: the mean over batches, warm-up included).
      'iterations': float(np.mean([_batch_iterations(cfg, i) for i in range(num_batches)]))
                    if cfg.method == 'generator' else cfg.multires_iterations + cfg.iterations,
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
  if cfg.method not in METHODS:
    raise UserError(f"unknown synthesis.method {cfg.method!r}: use {' or '.join(METHODS)}")
  if cfg.method == 'generator':
    if cfg.get('reuse_from'):
      raise UserError('synthesis.reuse_from copies batches that do not depend on the others; a '
                      'generator batch starts where the previous one left the generator: drop '
                      'reuse_from or use method=pixels')
    if cfg.stats_scope != 'global' or cfg.multires_iterations or cfg.adi_weight:
      raise UserError('synthesis.method=generator supports stats_scope=global without '
                      'multires_iterations or adi_weight: set those, or use method=pixels')
    g = cfg.generator
    if g.steps < 1 or g.width < 1 or g.latent_dim < 1 or not 0 < g.meta_lr <= 1:
      raise UserError(f'synthesis.generator: steps={g.steps}, width={g.width}, latent_dim='
                      f'{g.latent_dim}, meta_lr={g.meta_lr}: use steps, width, latent_dim >= 1 '
                      'and meta_lr in (0, 1]')
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
  for key, folder, field in (('teacher_sha256', teacher_dir(config, workdir), 'variables_sha256'),
                             ('statistics_sha256', stats_dir(config, workdir),
                              'statistics_sha256')):
    manifest = folder / 'manifest.json'
    if manifest.exists():
      out[key] = fileio.read_json(manifest).get(field)
  return out


def inherited_privacy(config, workdir, inputs) -> dict:
  """A synthesis of another folder's DP release (synthesis.stats_dir): the report carries
  that release's (epsilon, delta) and names the folder, since this workdir's own teacher
  and stats stages, which would have put them there, did not run."""
  record = inputs.stats_manifest.get('privacy')
  if not (config.synthesis.stats_dir and record):
    return {}
  return {'privacy': {**record, 'inherited_from': str(stats_dir(config, workdir))}}


def run(config, workdir) -> dict:
  cfg = config.synthesis
  inputs = load_inputs(cfg, teacher_dir(config, workdir), stats_dir(config, workdir))
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
  report.update(workdir, {'synthesis': summary, **inherited_privacy(config, workdir, inputs)})
  if parallel.is_main_process():
    print(f"synthesis: {summary['num_images']} images, BN loss {summary['bn_loss_initial']:.4f} "
          f"-> {summary['bn_loss_final']:.4f}, teacher agreement "
          f"{summary['teacher_agreement']:.4f}, "
          f"{summary['image_iterations_per_second'] or float('nan'):.1f} image-iterations/s",
          flush=True)
  return summary
