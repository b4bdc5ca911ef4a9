"""The student stage: train a fresh network from scratch on the synthetic dataset alone.

This stage is called without a PrivateData handle (it is not a private stage): the
only data it can read is WORKDIR/synthetic. Labels are the target hard labels
(the seed paper's protocol) or the teacher's soft labels stored with the dataset
(distillation at the dataset's temperature). It is evaluated on real test data
by the evaluate stage, on the data owner's side.
"""

from __future__ import annotations

import jax
import numpy as np

from bnsynth_jax import config_lib, fileio, input_pipeline, parallel, report, synthetic_data, train
from bnsynth_jax.errors import UserError
from bnsynth_jax.workdir import stage_dir

LABELS = ('hard', 'soft', 'views')


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


def validate(config) -> None:
  cfg = config.student
  if cfg.labels not in LABELS:
    raise UserError(f"unknown student.labels {cfg.labels!r}: use one of {', '.join(LABELS)}")


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
  def summary_values(summary):
    return {'train_seconds': summary['train_seconds'], 'labels': cfg.labels,
            'num_images': len(ds), 'model': cfg.model.name, 'epochs': summary['epochs'],
            'steps': summary['steps']}

  _, summary = train.fit_and_save(
      stage_dir(workdir, 'student') / 'synthetic', model_config=cfg.model,
      class_names=manifest['class_names'], num_classes=manifest['num_classes'],
      image_shape=manifest['image_shape'], mean=manifest['mean'], std=manifest['std'],
      extra=lambda s: {'trained_on': 'synthetic', **summary_values(s),
                       **({'privacy': manifest['privacy']} if manifest.get('privacy') else {})},
      tensorboard=fileio.path(workdir) / 'tensorboard' / 'student',
      name='student', cfg=cfg, batches=batches, seed=seed + 1, labels=cfg.labels,
      soft_temperature=manifest['soft_label_temperature'],
      views=None if views is None else {'key': jax.random.key(views['seed']),
                                        'epochs': views['epochs']})
  values = summary_values(summary)
  if parallel.is_main_process():
    fileio.atomic_write_json(stage_dir(workdir, 'student') / 'manifest.json',
                             {'synthetic': values})
  report.update(workdir, {'student': {'synthetic': values}})
  return values
