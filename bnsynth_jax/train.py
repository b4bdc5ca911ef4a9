"""One supervised training loop for the teacher and every student.

Small named functions in the style of flax/examples: `create_optimizer`,
`create_train_state`, `train_step`, `eval_step`, `evaluate`, `fit`. The step is
one `jax.jit` over the 'data' mesh axis: the batch is sharded, the state
replicated, and XLA reduces BN batch moments and gradients across devices.

Exact resume: the batch at step t comes from `PartitionedBatches.get(t)` and the
augmentation key is fold_in(seed, t), so a run restored from its checkpoint at
step k repeats exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from bnsynth_jax import artifacts, augment, checkpointing, fileio, metrics, models, parallel
from bnsynth_jax.errors import UserError
from bnsynth_jax.input_pipeline import Partition, PartitionedBatches, eval_batches


class TrainState(train_state.TrainState):
  batch_stats: Any


# ----------------------------------------------------------------------------
# State and optimiser


def create_learning_rate(cfg, steps_per_epoch: int, num_steps: int):
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup_steps=max(warmup, 0),
        decay_steps=max(num_steps, warmup + 1), end_value=0.0)
  if cfg.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
         optax.constant_schedule(cfg.learning_rate)], [max(warmup, 1)])
  raise UserError(f"unknown schedule {cfg.schedule!r}: use 'cosine' or 'constant'")


class ParamsEmaState(NamedTuple):
  ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
  """The last link of an optimiser chain: passes the updates through and keeps an
  exponential moving average of the parameters they produce (in the optimiser state, so
  checkpoints and resume carry it). `evaluated_params` returns it."""
  def init(params):
    return ParamsEmaState(jax.tree.map(lambda p: jnp.array(p, copy=True), params))

  def update(updates, state, params):
    new = optax.apply_updates(params, updates)
    return updates, ParamsEmaState(jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                                state.ema, new))
  return optax.GradientTransformation(init, update)


def evaluated_params(state: 'TrainState', cfg):
  """The parameters a run evaluates and saves: the EMA ones with cfg.ema_decay > 0."""
  if cfg.get('ema_decay', 0.0):
    return state.opt_state[-1].ema
  return state.params


def create_optimizer(cfg, lr: optax.Schedule) -> optax.GradientTransformation:
  return with_ema(cfg, _base_optimizer(cfg, lr))


def with_ema(cfg, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  decay = float(cfg.get('ema_decay', 0.0))
  if not 0.0 <= decay < 1.0:
    raise UserError(f'ema_decay={decay}: use 0 (off) or a decay in (0, 1), e.g. 0.99')
  # The BatchNorm running statistics stay the live model's (gathered under the raw weights).
  return optax.chain(tx, params_ema(decay)) if decay else tx


def _base_optimizer(cfg, lr: optax.Schedule) -> optax.GradientTransformation:
  # Decay kernels only (not BN scale/bias or biases), as is standard for ResNets.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if cfg.optimizer == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov))
  if cfg.optimizer == 'adamw':
    return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.optimizer == 'adam':
    return optax.adam(lr)
  raise UserError(f"unknown optimizer {cfg.optimizer!r}: use 'sgd', 'adam' or 'adamw'")


def create_train_state(rng: jax.Array, model: nn.Module, image_shape: Sequence[int],
                       tx: optax.GradientTransformation, mesh,
                       init: dict | None = None) -> TrainState:
  from bnsynth_jax.models import init_variables
  variables = init_variables(model, rng, image_shape)
  if init is not None:
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    for col in ('params', 'batch_stats'):
      if shapes(init[col]) != shapes(variables[col]):
        raise UserError(f'the starting {col} do not fit the model (different layers or '
                        'shapes): start from a checkpoint of the same model and classes')
    variables = {col: init[col] for col in ('params', 'batch_stats')}
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            batch_stats=variables['batch_stats'], tx=tx)
  return parallel.replicate(mesh, state)


# ----------------------------------------------------------------------------
# Steps


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def batch_targets(batch: Mapping[str, jax.Array], num_classes: int, label_smoothing: float,
                  use_soft_labels: bool) -> jax.Array:
  if use_soft_labels:
    return batch['soft_labels'].astype(jnp.float32)
  one_hot = jax.nn.one_hot(batch['labels'], num_classes)
  return optax.smooth_labels(one_hot, label_smoothing) if label_smoothing else one_hot


def train_step(state: TrainState, batch, step, *, base_key, cfg, mean, std, num_classes: int,
               labels: str = 'hard', soft_temperature: float = 1.0, views: dict | None = None):
  """One SGD step; its augmentation key is fold_in(base_key, step).

  labels: 'hard' (one-hot, optional smoothing), 'soft' (batch['soft_labels']) or
  'views' (batch['view_soft_labels'][:, epoch]: teacher labels of this epoch's exact
  crop of each image; `views` = {'key', 'steps_per_epoch', 'epochs'}) or 'mixed'
  (batch['images'] are the mixed views, softmax(batch['view_logits'] / T) the targets). Soft targets
  use the distillation loss T^2 * CE(targets, log_softmax(logits / T)).
  """
  aug_rng, mix_rng = jax.random.split(jax.random.fold_in(base_key, step))
  x = augment.to_unit(batch['images'])
  if labels == 'views':
    epoch = step // views['steps_per_epoch']
    x = augment.view_crop_flip(views['key'], epoch % views['epochs'], batch['index'], x,
                       cfg.crop_padding, cfg.flip)
    targets = jnp.take(batch['view_soft_labels'].astype(jnp.float32), epoch % views['epochs'],
                       axis=1)
  elif labels == 'mixed':   # the relabel stage's mixed views, as given (float pixels)
    targets = jax.nn.softmax(batch['view_logits'].astype(jnp.float32) / soft_temperature)
  else:
    x = augment.random_crop_flip(aug_rng, x, cfg.crop_padding, cfg.flip)
    targets = batch_targets(batch, num_classes, cfg.label_smoothing, labels == 'soft')
  x, targets = augment.mix(mix_rng, x, targets, cfg.mixup_alpha, cfg.cutmix_alpha)
  x = augment.standardise(x, mean, std)

  def loss_fn(params):
    logits, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                     x, train=True, mutable=['batch_stats'])
    if labels != 'hard':
      t = soft_temperature
      loss = t * t * jnp.mean(cross_entropy(logits / t, targets))
    else:
      loss = jnp.mean(cross_entropy(logits, targets))
    return loss, (logits, updates.get('batch_stats', {}))

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=new_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['labels'])
  return state, {'loss': loss, 'accuracy': accuracy}


def dp_train_step(state: TrainState, batch, step, *, base_key, cfg, mean, std,
                  num_classes: int, clip_norm: float, augmult: int, frozen_bn: bool = False,
                  trainable: str = 'all', model: nn.Module | None = None,
                  front_end_cached: bool = False):
  """One DP-SGD step: GroupNorm (no batch statistics), or a prior's BatchNorm frozen in
  inference mode (`frozen_bn`), so an example's gradient never sees the others. Each
  example's gradient, averaged over `augmult` augmentations of it, is clipped by
  jax_privacy.clipped_grad; the optimizer (`dp_optimizer`) adds the Gaussian noise to the
  sum and divides by the batch. `trainable` (privacy/prior.py): the parameters outside it
  get no gradient, so the clip norm is spent on those trained. A `model` with a
  `public_front_end` (a fixed transform with no parameters: scatternet.py) has it applied
  to every view of the batch once, outside the per-example gradients, and the rest
  (`from_front_end`) differentiated per example: the same gradients, far cheaper;
  `front_end_cached`: the batch already holds those outputs (privacy.FrontEndBatches: no
  augmentation, so every view of an example is the example)."""
  from jax_privacy import clipping   # only DP mode needs it
  from bnsynth_jax.privacy import prior
  mask = prior.trainable_mask(state.params, trainable)
  front_end = getattr(model, 'public_front_end', None)
  frozen = {'batch_stats': state.batch_stats} if frozen_bn else {}

  def views(images, rng):     # one example's augmult standardised views
    x = jnp.repeat(augment.to_unit(images), augmult, axis=0)
    return augment.standardise(augment.random_crop_flip(rng, x, cfg.crop_padding, cfg.flip),
                               mean, std)

  def example_loss(params, inputs, labels, rng):      # one example: inputs [1, ...]
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)
    variables = {'params': params, **frozen}
    if front_end is None:
      logits = state.apply_fn(variables, views(inputs, rng), train=not frozen_bn)
    else:    # the views' public transform, computed below for the whole batch
      logits = state.apply_fn(variables, inputs[0], train=not frozen_bn,
                              method='from_front_end')
    targets = jax.nn.one_hot(jnp.repeat(labels, augmult), num_classes)
    return jnp.mean(cross_entropy(logits, targets)), logits[:1]

  step_key = jax.random.fold_in(base_key, step)
  inputs = batch['images']
  if front_end_cached:
    inputs = jnp.repeat(inputs[:, None], augmult, axis=1)
  elif front_end is not None:
    inputs = public_front_end_views(front_end, views, inputs, step_key)
  grad_fn = clipping.clipped_grad(example_loss, has_aux=True, l2_clip_norm=clip_norm,
                                  batch_argnums=(1, 2), prng_argnum=3, return_values=True)
  grads, aux = grad_fn(state.params, inputs, batch['labels'], step_key)
  state = state.apply_gradients(grads=grads)
  # Each example's first augmented view's logits (jax_privacy stacks them: [B, K]).
  logits = aux.aux.reshape(batch['labels'].shape[0], -1)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['labels'])
  return state, {'loss': jnp.mean(aux.values), 'accuracy': accuracy}


def public_front_end_views(front_end, views, images, step_key):
  """[B, augmult, ...]: each example's views (its own key, split from the step key)
  through the public front end, batched."""
  keys = jax.random.split(step_key, images.shape[0])
  x = jax.vmap(views)(images[:, None], keys)                     # [B, augmult, H, W, C]
  out = front_end(x.reshape(-1, *x.shape[2:]))
  return out.reshape(*x.shape[:2], *out.shape[1:])


def dp_optimizer(cfg, lr: optax.Schedule, dp: dict) -> optax.GradientTransformation:
  """Gaussian noise of std noise_multiplier x clip_norm (the clipped sum's add/remove
  sensitivity; the accountant doubles it for replace-one) on the sum of clipped gradients,
  then the mean over the batch, then the usual optimizer (all post-processing)."""
  from jax_privacy import noise_addition
  from bnsynth_jax.privacy import prior
  privatizer = noise_addition.gaussian_privatizer(
      stddev=dp['noise_multiplier'] * dp['clip_norm'], prng_key=dp['noise_key'])
  tx = optax.chain(privatizer, optax.scale(1.0 / cfg.batch_size), _base_optimizer(cfg, lr))
  which = dp.get('trainable', 'all')
  if which != 'all':
    frozen = lambda params: jax.tree.map(lambda t: not t, prior.trainable_mask(params, which))
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), frozen))   # the prior's stay
  return with_ema(cfg, tx)   # post-processing of the noised updates


def eval_step(variables, batch, *, apply_fn, mean, std):
  logits = apply_fn(variables, augment.normalise(batch['images'], mean, std), train=False)
  labels, mask = batch['labels'], batch['mask']
  loss = cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'correct': jnp.sum(correct * mask), 'loss': jnp.sum(loss * mask),
          'count': jnp.sum(mask)}


@functools.lru_cache(maxsize=32)
def _jitted_eval(apply_fn, mean: tuple, std: tuple, mesh):
  return jax.jit(functools.partial(eval_step, apply_fn=apply_fn, mean=mean, std=std),
                 in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def evaluate(apply_fn, variables, partitions: Sequence[Partition], split_size: int,
             num_partitions: int, mean, std, batch_size: int, mesh=None) -> dict[str, float]:
  """Accuracy and mean loss over a whole split held as process-local partitions."""
  mesh = mesh or parallel.make_mesh()
  batch_size = parallel.round_up_batch(batch_size, mesh)
  step = _jitted_eval(apply_fn, tuple(map(float, mean)), tuple(map(float, std)), mesh)
  totals = None
  for batch in eval_batches(partitions, split_size, num_partitions, jax.process_count(),
                            batch_size):
    out = step(variables, parallel.to_global(mesh, batch))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.tree.map(float, parallel.to_host(totals))
  return {'accuracy': totals['correct'] / totals['count'],
          'loss': totals['loss'] / totals['count'], 'count': totals['count']}


# ----------------------------------------------------------------------------
# The loop


def num_train_steps(cfg, steps_per_epoch: int) -> int:
  return int(cfg.num_steps) if cfg.get('num_steps', 0) else int(
      round(cfg.epochs * steps_per_epoch))


def _jitted_train_step(cfg, mesh, step_key, mean, std, num_classes, labels, soft_temperature,
                       views, steps_per_epoch, dp=None):
  common = dict(base_key=step_key, cfg=cfg, mean=tuple(map(float, mean)),
                std=tuple(map(float, std)), num_classes=num_classes)
  if dp is not None:
    step = functools.partial(dp_train_step, clip_norm=dp['clip_norm'], augmult=dp['augmult'],
                             frozen_bn=dp.get('frozen_bn', False),
                             trainable=dp.get('trainable', 'all'), model=dp.get('model'),
                             front_end_cached=dp.get('front_end_cached', False),
                             **common)
  else:
    step = functools.partial(train_step, labels=labels, soft_temperature=soft_temperature,
                             views=None if views is None else {**views,
                                                               'steps_per_epoch': steps_per_epoch},
                             **common)
  return jax.jit(
      step,
      in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh),
                    parallel.replicated(mesh)),
      out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
      donate_argnums=0)


def _resume(name, ckpt_dir, progress_file, state, total_steps):
  """(state, start step, train seconds before, evaluation history) from the checkpoints."""
  state, start_step = checkpointing.restore_or_init(ckpt_dir, state)
  elapsed_before, history = 0.0, []
  if start_step and progress_file.exists():
    previous = fileio.read_json(progress_file)
    elapsed_before = float(previous.get('train_seconds', 0.0))
    history = [h for h in previous.get('history', []) if h['step'] <= start_step]
  if start_step:
    logging.info('%s: resuming from step %d of %d', name, start_step, total_steps)
  return state, start_step, elapsed_before, history


def _log_train_metrics(name, pending, lr, done, progress, writer, private: bool) -> None:
  """Logs the training loss and accuracy of the last steps; `private` (DP-SGD on private
  batches): only the learning rate, since the unnoised loss of private batches is not
  covered by the DP guarantee. The non-finite-loss abort still reads it (the data owner
  sees that a run stopped; docs/privacy.md)."""
  means = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
  shown = {} if private else means
  if writer:
    writer.write_scalars(done, {**{f'train_{k}': v for k, v in shown.items()},
                                'learning_rate': lr}, log=False)
  logging.info(progress.line(done, ''.join(f'{k} {v:.4f}, ' for k, v in shown.items())
                             + f'lr {lr:.4g}'))
  if not np.isfinite(means['loss']):
    raise UserError(f'{name}: the training loss became {means["loss"]} at step {done}: '
                    f'lower --config.{name}.learning_rate')


def _test_evaluation(name, model, cfg, test, mean, std, mesh, steps_per_epoch, history, writer):
  """run_eval(state, step) -> the test result (or None without a test split), logged."""
  def run_eval(state, step):
    if test is None:
      return None
    parts, size, nparts = test
    result = evaluate(model.apply, {'params': evaluated_params(state, cfg),
                                    'batch_stats': state.batch_stats},
                      parts, size, nparts, mean, std, cfg.eval_batch_size, mesh)
    entry = {'step': step, 'epoch': step / steps_per_epoch,
             'test_accuracy': result['accuracy'], 'test_loss': result['loss']}
    history.append(entry)
    if writer:
      writer.write_scalars(step, {'test_accuracy': result['accuracy'],
                                  'test_loss': result['loss']})
    logging.info('%s: step %d (epoch %.1f) test accuracy %.4f', name, step,
                 entry['epoch'], result['accuracy'])
    return result
  return run_eval


def fit(*, name: str, model: nn.Module, cfg, batches: PartitionedBatches,
        image_shape: Sequence[int], num_classes: int, mean, std, workdir, seed: int,
        test: tuple[Sequence[Partition], int, int] | None = None,
        writer: metrics.Writer | None = None, labels: str = 'hard',
        soft_temperature: float = 1.0, views: dict | None = None,
        on_step: Callable[[int], None] | None = None,
        init: dict | None = None, dp: dict | None = None) -> tuple[dict, dict[str, Any]]:
  """Trains `model` from scratch (or resumes) and returns (variables, summary).

  Args:
    workdir: the stage folder; checkpoints go to workdir/checkpoints.
    test: (partitions, split size, num_partitions) of the evaluation split.
    on_step: called with the step number after each step (tests use it to
      simulate a kill).
    init: {'params', 'batch_stats'} to start from instead of a random
      initialisation (fine-tuning); a checkpoint in workdir still wins.
    dp: DP-SGD ({'clip_norm', 'noise_multiplier', 'augmult', 'noise_key', with a prior
      'frozen_bn', 'trainable', and 'front_end_cached'}; `batches` must then be
      privacy.WholeSplitBatches, or privacy.FrontEndBatches with 'front_end_cached').
  """
  mesh = parallel.make_mesh()
  parallel.check_batch(cfg.batch_size, f'{name}.batch_size', mesh)
  steps_per_epoch = batches.steps_per_epoch
  total_steps = num_train_steps(cfg, steps_per_epoch)
  lr_schedule = create_learning_rate(cfg, steps_per_epoch, total_steps)
  init_key, step_key = jax.random.split(jax.random.key(seed))
  tx = dp_optimizer(cfg, lr_schedule, dp) if dp else create_optimizer(cfg, lr_schedule)
  state = create_train_state(init_key, model, image_shape, tx, mesh, init=init)
  ckpt_dir = fileio.path(workdir) / 'checkpoints'
  progress_file = fileio.path(workdir) / 'progress.json'
  state, start_step, elapsed_before, history = _resume(name, ckpt_dir, progress_file, state,
                                                       total_steps)
  step_fn = _jitted_train_step(cfg, mesh, step_key, mean, std, num_classes, labels,
                               soft_temperature, views, steps_per_epoch,
                               dp and {**dp, 'model': model})
  run_eval = _test_evaluation(name, model, cfg, test, mean, std, mesh, steps_per_epoch,
                              history, writer)
  eval_every = (max(1, int(round(cfg.eval_every_epochs * steps_per_epoch)))
                if cfg.eval_every_epochs else 0)
  progress = metrics.Progress(name, total_steps, start_step, cfg.batch_size, 'img')
  pending: list[dict[str, jax.Array]] = []
  t_run = time.perf_counter()
  for step in range(start_step, total_steps):
    state, step_metrics = step_fn(state, parallel.to_global(mesh, batches.get(step)),
                                  np.int32(step))
    pending.append(step_metrics)
    done = step + 1
    if step == start_step:
      jax.block_until_ready(step_metrics)
      progress.first_step_done(done)
    if done % cfg.log_every_steps == 0 or done == total_steps:
      _log_train_metrics(name, pending, float(lr_schedule(step)), done, progress, writer,
                         private=dp is not None)
      pending.clear()
    if eval_every and done % eval_every == 0 and done != total_steps:
      run_eval(state, done)
    if done % cfg.checkpoint_every_steps == 0 or done == total_steps:
      checkpointing.save(ckpt_dir, done, state)
      if parallel.is_main_process():
        fileio.atomic_write_json(progress_file, {
            'step': done, 'train_seconds': elapsed_before + time.perf_counter() - t_run,
            'history': history})
    if on_step is not None:
      on_step(done)
  # Commit the last save and close the manager: its helper threads end with this fit
  # rather than living on in the process (a later fit or resume opens a new one).
  checkpointing.close(ckpt_dir)
  summary = {'train_seconds': elapsed_before + time.perf_counter() - t_run, 'steps': total_steps,
             'steps_per_epoch': steps_per_epoch, 'epochs': total_steps / steps_per_epoch,
             'batch_size': cfg.batch_size, 'history': history}
  final = run_eval(state, total_steps)
  if final is not None:
    summary['test_accuracy'], summary['test_loss'] = final['accuracy'], final['loss']
  if writer:
    writer.flush()
  return {'params': evaluated_params(state, cfg), 'batch_stats': state.batch_stats}, summary


def fit_and_save(out, *, model_config, class_names, num_classes: int, image_shape, mean, std,
                 extra: Callable[[dict], dict], tensorboard=None, state_dir=None, **fit_args):
  """The ending every training stage shares: build the model, `fit` it with its training
  state (checkpoints, progress) in `state_dir` (default `out`; resuming from them), and
  write the model artifact in `out`, its manifest carrying `extra(summary)`. Returns
  (variables, summary)."""
  model = models.from_config(model_config, num_classes)
  writer = metrics.Writer(tensorboard) if tensorboard else None
  try:   # closed on an error too (an open event writer fails at interpreter exit)
    variables, summary = fit(model=model, num_classes=num_classes, image_shape=image_shape,
                             mean=mean, std=std, workdir=state_dir or out, writer=writer,
                             **fit_args)
  finally:
    if writer:
      writer.close()
  artifacts.save_model(out, model_config=model_config, variables=variables,
                       class_names=class_names, image_shape=image_shape, mean=mean, std=std,
                       extra=extra(summary))
  return variables, summary
