"""The teacher stage: train a BatchNorm ResNet on the private data (or import one).

Output, WORKDIR/teacher/: variables.msgpack + manifest.json (artifacts.py), orbax
training checkpoints in checkpoints/, metrics.json with the evaluation history.
"""

from __future__ import annotations

import time

from absl import logging
import jax

from bnsynth_jax import artifacts, fileio, models, owner, parallel, privacy, report, train
from bnsynth_jax.privacy import class_means, prior
from bnsynth_jax.errors import UserError
from bnsynth_jax.workdir import stage_dir
from bnsynth_jax.sources import PrivateData
from bnsynth_jax.input_pipeline import PartitionedBatches


def validate(config) -> None:
  if config.teacher.pretrained and config.teacher.init_from:
    raise UserError('teacher.pretrained imports a finished teacher and teacher.init_from starts '
                    'training from one: set only one of them')
  privacy.validate(config)


def _load_matching(config, data: PrivateData, field: str):
  """Loads the teacher folder named by config.teacher.<field>, checked against config and data."""
  source_dir = config.teacher[field]
  model, variables, manifest = artifacts.load_model(source_dir)
  artifacts.check_same_model(manifest, config.model, f'teacher.{field} {source_dir}')
  info = data.info
  if list(info.class_names) != manifest['class_names'] or list(
      info.image_shape) != manifest['image_shape']:
    raise UserError(f'teacher.{field} {source_dir} was trained on classes '
                    f'{manifest["class_names"]} at {manifest["image_shape"]}, but the data has '
                    f'{list(info.class_names)} at {list(info.image_shape)}: use a matching '
                    f'dataset or train a teacher from scratch (teacher.{field}=\'\')')
  return model, variables, manifest


def _test_accuracy(model, variables, data: PrivateData, mean, std, batch_size: int) -> float:
  mesh = parallel.make_mesh()
  return train.evaluate(model.apply, parallel.replicate(mesh, variables), data.split('test'),
                        data.split_size('test'), data.num_partitions, mean, std, batch_size,
                        mesh)['accuracy']


def _import_pretrained(config, workdir, data: PrivateData) -> dict:
  """Copies a finished teacher artifact in, after checking it fits the config and data."""
  source_dir = config.teacher.pretrained
  model, variables, manifest = _load_matching(config, data, 'pretrained')
  accuracy = _test_accuracy(model, variables, data, manifest['mean'], manifest['std'],
                            config.teacher.eval_batch_size)
  logging.info('pretrained teacher %s: test accuracy %.4f (manifest says %s)', source_dir,
               accuracy, manifest.get('test_accuracy'))
  out = stage_dir(workdir, 'teacher')
  extra = {k: manifest[k] for k in ('train_seconds', 'epochs', 'command') if k in manifest}
  artifacts.save_model(out, model_config=config.model, variables=variables,
                       class_names=manifest['class_names'], image_shape=manifest['image_shape'],
                       mean=manifest['mean'], std=manifest['std'],
                       extra={**extra, 'test_accuracy': accuracy,
                              'imported_from': str(source_dir)})
  return {'test_accuracy': accuracy, 'train_seconds': manifest.get('train_seconds'),
          'train_examples': data.split_size('train'), 'pretrained': str(source_dir)}


def _dp_setup(config, workdir, data: PrivateData):
  """DP-SGD: the plan (noise multipliers and the composed budget), fixed-size batches drawn
  with the secret seed, the noise key, and the public prior's variables to start from
  (None: from scratch). Returns (batches, dp, manifest extra, start)."""
  record = privacy.plan(config, data.split_size('train'))
  start = None
  model = models.from_config(config.model, data.info.num_classes)
  if prior.enabled(config):
    record['prior'] = prior.record(config)
    start = prior.initial_variables(config, model, data.info.image_shape,
                                    jax.random.key(config.seed))
  secret = privacy.teacher_secret(config, workdir)
  batches = privacy.WholeSplitBatches(data.whole_split('train'), data.split_size('train'),
                                      config.teacher.batch_size, seed=secret,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
  cached = privacy.caches_front_end(config, model, batches.images)
  if cached:
    t0 = time.perf_counter()
    batches = privacy.FrontEndBatches(batches, model.public_front_end, *data.normalisation())
    logging.info('teacher: the public front end of the %d training images computed once in '
                 '%.1fs (%.0f MB; privacy.cache_front_end)', len(batches.features),
                 time.perf_counter() - t0, batches.features.nbytes / 2**20)
  dp = {'clip_norm': record['teacher']['clip_norm'],
        'noise_multiplier': record['teacher']['noise_multiplier'],
        'augmult': record['teacher']['augmult'],
        'noise_key': privacy.noise_key(secret),
        'frozen_bn': prior.frozen_batch_norm(config),
        'trainable': config.privacy.prior_trainable if prior.enabled(config) else 'all',
        'front_end_cached': cached}
  logging.info('teacher: DP-SGD, noise multiplier %.4g, clip norm %g, %d steps of %d: '
               '(epsilon %.4g, delta %g) with the statistics', dp['noise_multiplier'],
               dp['clip_norm'], record['teacher']['steps'], config.teacher.batch_size,
               record['epsilon'], record['delta'])
  return batches, dp, {'privacy': record}, start


def _training_folders(config, workdir):
  """(training-state folder, TensorBoard folder): the stage folder normally; in DP mode the
  owner-only WORKDIR/.owner/teacher/ (its checkpoints hold the DP-SGD noise key, its
  metrics the test split, which DP does not protect), so teacher/ holds only the release."""
  if privacy.enabled(config):
    return (owner.training_dir(workdir, 'teacher'),
            owner.owner_dir(workdir) / 'tensorboard' / 'teacher')
  return stage_dir(workdir, 'teacher'), fileio.path(workdir) / 'tensorboard' / 'teacher'


def _manifest_extra(summary: dict, train_examples: int, extra: dict, dp_mode: bool) -> dict:
  """What the teacher manifest carries beyond the model: in DP mode only public facts and
  the DP record (the test accuracy and the training time are the owner's)."""
  public = {'epochs': summary['epochs'], 'train_examples': train_examples, **extra}
  if dp_mode:
    return public
  return {'test_accuracy': summary['test_accuracy'], 'train_seconds': summary['train_seconds'],
          **public}


def _train(config, workdir, data: PrivateData) -> dict:
  out = stage_dir(workdir, 'teacher')
  info = data.info
  mean, std = data.normalisation()
  batches = PartitionedBatches(data.split('train'), data.num_partitions,
                               data.split_size('train'), config.teacher.batch_size,
                               seed=config.seed)
  start, extra, dp = None, {}, None
  if privacy.enabled(config):
    batches, dp, extra, start = _dp_setup(config, workdir, data)
  if config.teacher.init_from:
    _, start, source = _load_matching(config, data, 'init_from')
    logging.info('teacher: training starts from %s (test accuracy %s, %s epochs)',
                 config.teacher.init_from, source.get('test_accuracy'), source.get('epochs'))
    extra = {'init_from': str(config.teacher.init_from),
             'init_from_test_accuracy': source.get('test_accuracy'),
             'init_from_epochs': source.get('epochs')}
  state_dir, tensorboard = _training_folders(config, workdir)
  _, summary = train.fit_and_save(
      out, model_config=config.model, class_names=info.class_names,
      num_classes=info.num_classes, image_shape=info.image_shape, mean=mean, std=std,
      extra=lambda s: _manifest_extra(s, data.split_size('train'), extra, dp is not None),
      tensorboard=tensorboard, state_dir=state_dir,
      name='teacher', cfg=config.teacher, batches=batches, seed=config.seed,
      test=(data.split('test'), data.split_size('test'), data.num_partitions), init=start,
      dp=dp)
  if parallel.is_main_process():
    fileio.atomic_write_json(state_dir / 'metrics.json', summary)
  if dp is not None:
    report.update(workdir, {'privacy': extra['privacy']})
  return {'test_accuracy': summary['test_accuracy'], 'train_seconds': summary['train_seconds'],
          'train_examples': data.split_size('train')}


DATA_FREE_FEATURES = ('the data-free front end: the fixed scattering under GroupNorm at its '
                      'initial scale 1 and offset 0, no prior, nothing trained')


def _class_means_teacher(config, workdir, data: PrivateData) -> dict:
  """DP mode with privacy.head=class_means: the frozen prior with a head from noised class
  means (privacy/class_means.py) instead of DP-SGD; one pass over the training split."""
  record = privacy.plan(config, data.split_size('train'))
  model = models.from_config(config.model, data.info.num_classes)
  key = jax.random.key(config.seed)
  if prior.enabled(config):
    record['prior'] = prior.record(config)
    start = prior.initial_variables(config, model, data.info.image_shape, key)
  else:   # scatternet_linear*: features public by construction (class_means.problems)
    record['features'] = DATA_FREE_FEATURES
    start = models.init_variables(model, key, data.info.image_shape)
  model, variables, head = class_means.fit_teacher(
      config, data, start, noise_multiplier=record['teacher']['noise_multiplier'],
      rng=privacy.statistics_rng(config, 'class_means'))
  mean, std = data.normalisation()
  accuracy = _test_accuracy(model, variables, data, mean, std, config.teacher.eval_batch_size)
  artifacts.save_model(stage_dir(workdir, 'teacher'), model_config=config.model,
                       variables=variables, class_names=data.info.class_names,
                       image_shape=data.info.image_shape, mean=mean, std=std,
                       extra={'train_examples': data.split_size('train'), 'epochs': 0, **head,
                              'privacy': record})
  report.update(workdir, {'privacy': record})
  logging.info('teacher: class-means head, (epsilon %.4g, delta %g) with the statistics',
               record['epsilon'], record['delta'])
  return {'test_accuracy': accuracy, 'train_seconds': None,
          'train_examples': data.split_size('train')}


def run(config, workdir, data: PrivateData) -> dict:
  if config.teacher.pretrained:
    values = _import_pretrained(config, workdir, data)
  elif privacy.enabled(config) and class_means.enabled(config):
    values = _class_means_teacher(config, workdir, data)
  else:
    values = _train(config, workdir, data)
  report.update(workdir, {'teacher': values})
  if parallel.is_main_process():
    print(f'teacher test accuracy: {values["test_accuracy"]:.4f}', flush=True)
  return values
