"""The student stage: train a fresh network on the synthetic dataset alone.

From scratch by default; with student.init_from_prior from the public prior's variables
(privacy.prior, declared public: reading it costs nothing, and the student still sees no
private data).

This stage is called without a PrivateData handle (it is not a private stage): the
only data it can read is WORKDIR/synthetic. Labels are the target hard labels
(the seed paper's protocol) or the teacher's soft labels stored with the dataset
(distillation at the dataset's temperature). It is evaluated on real test data
by the evaluate stage, on the data owner's side.
"""

from __future__ import annotations

import jax
import numpy as np

from bnsynth_jax import (config_lib, fileio, input_pipeline, parallel, relabel, report,
                         synthetic_data, train, views_np)
from bnsynth_jax.errors import UserError
from bnsynth_jax.privacy import prior
from bnsynth_jax.workdir import stage_dir

LABELS = ('hard', 'soft', 'views', 'mixed')


def synthetic_partitions(ds: synthetic_data.SyntheticDataset, num_partitions: int,
                         partition_ids, with_views: bool = False) -> list[input_pipeline.Partition]:
  n = len(ds)
  parts = []
  for p in partition_ids:
    m = input_pipeline.partition_members(n, num_partitions, p)
    extras = {'soft_labels': ds.soft_labels[m], 'index': m.astype(np.int32)}
    if with_views:
      extras['view_soft_labels'] = ds.view_soft_labels[m]
    parts.append(input_pipeline.Partition(p, ds.images[m], ds.labels[m], extras=extras))
  return parts


def check_views(cfg, manifest) -> dict:
  """The student must replay exactly the views the teacher labelled."""
  views = manifest.get('views')
  if not views:
    raise UserError('student.labels=views needs per-view soft labels: synthesise with '
                    'synthesis.view_epochs > 0 (e.g. the student\'s epochs)')
  if (cfg.crop_padding, bool(cfg.flip)) != (views['crop_padding'], bool(views['flip'])):
    raise UserError(f'student.crop_padding/flip ({cfg.crop_padding}, {cfg.flip}) differ from the '
                    f'views the teacher labelled ({views["crop_padding"]}, {views["flip"]}): set '
                    'them equal to synthesis.view_crop_padding / view_flip')
  # Mixup / CutMix on top of the views is allowed: a mixed image gets the lambda-mix of
  # the two views' teacher labels, an approximation (the teacher never saw the mixture).
  return views


class MixedViewBatches:
  """The student's batches with labels=mixed: batch `step` of `batches`, each image replaced by
  its mixed view of the epoch (views_np.mixed_views, what the teacher labelled) and given the
  teacher's logits of it ('view_logits'). Every process holds the whole (public) synthetic set,
  since a partner may sit in another partition."""

  def __init__(self, batches: input_pipeline.PartitionedBatches, images: np.ndarray,
               mixed: dict[str, np.ndarray]):
    self.batches, self.images, self.mixed = batches, images, mixed
    self.steps_per_epoch = batches.steps_per_epoch

  def get(self, step: int) -> dict[str, np.ndarray]:
    batch = dict(self.batches.get(step))
    epoch = step // self.steps_per_epoch
    index = batch['index']
    batch['images'] = views_np.mixed_views(self.images, self.mixed, index, epoch)
    batch['view_logits'] = self.mixed['logits'][index, epoch % int(self.mixed['epochs'])]
    return batch


def validate(config) -> None:
  cfg = config.student
  problems = prior.student_problems(config)
  if problems:
    raise UserError(problems[0])
  if cfg.labels not in LABELS:
    raise UserError(f"unknown student.labels {cfg.labels!r}: use one of {', '.join(LABELS)}")
  if cfg.labels == 'mixed' and not relabel.enabled(config):
    raise UserError('student.labels=mixed needs the mixed-view labels: set relabel.epochs > 0 '
                    '(e.g. the student\'s epochs)')
  if cfg.labels == 'mixed' and (cfg.mixup_alpha or cfg.cutmix_alpha):
    raise UserError('student.labels=mixed shows the mixed views the teacher labelled: set '
                    'student.mixup_alpha=0 and student.cutmix_alpha=0 (relabel.mix mixes)')


def run(config, workdir) -> dict:
  cfg = config.student
  seed = config_lib.student_seed(config)
  ds = synthetic_data.load_synthetic(stage_dir(workdir, 'synthesize'))
  manifest = ds.manifest
  num_partitions, partition_ids = input_pipeline.local_partitions(config.data)
  views = check_views(cfg, manifest) if cfg.labels == 'views' else None
  parts = synthetic_partitions(ds, num_partitions, partition_ids, with_views=views is not None)
  batches = input_pipeline.PartitionedBatches(parts, num_partitions, len(ds), cfg.batch_size,
                                              seed=seed)
  if cfg.labels == 'mixed':
    batches = MixedViewBatches(batches, ds.images, relabel.load_mixed(workdir))
  start = prior.student_start(config, manifest['num_classes'], manifest['image_shape'], seed)

  def summary_values(summary):
    return {'train_seconds': summary['train_seconds'], 'labels': cfg.labels,
            'num_images': len(ds), 'model': cfg.model.name, 'epochs': summary['epochs'],
            'steps': summary['steps'], 'init': prior.student_record(config) or 'random'}

  _, summary = train.fit_and_save(
      stage_dir(workdir, 'student') / 'synthetic', model_config=cfg.model,
      class_names=manifest['class_names'], num_classes=manifest['num_classes'],
      image_shape=manifest['image_shape'], mean=manifest['mean'], std=manifest['std'],
      extra=lambda s: {'trained_on': 'synthetic', **summary_values(s),
                       **({'privacy': manifest['privacy']} if manifest.get('privacy') else {})},
      tensorboard=fileio.path(workdir) / 'tensorboard' / 'student',
      name='student', cfg=cfg, batches=batches, seed=seed + 1, labels=cfg.labels, init=start,
      soft_temperature=(cfg.mixed_temperature if cfg.labels == 'mixed'
                        else manifest['soft_label_temperature']),
      views=None if views is None else {'key': jax.random.key(views['seed']),
                                        'epochs': views['epochs']})
  values = summary_values(summary)
  if parallel.is_main_process():
    fileio.atomic_write_json(stage_dir(workdir, 'student') / 'manifest.json',
                             {'synthetic': values})
  report.update(workdir, {'student': {'synthetic': values}})
  return values
