"""The student stage: train a fresh network from scratch on the synthetic dataset alone.

This stage is called without a PrivateData handle (pipeline.PRIVATE_STAGES): the
only data it can read is WORKDIR/synthetic. Labels are the target hard labels
(the seed paper's protocol) or the teacher's soft labels stored with the dataset
(distillation at the dataset's temperature). It is evaluated on real test data
by the evaluate stage, on the data owner's side.
"""

from __future__ import annotations

import jax

from bnsynth_jax import (artifacts, fileio, input_pipeline, metrics, models, parallel, pipeline,
                         report, synthetic_data, train)
from bnsynth_jax.errors import UserError

LABELS = ('hard', 'soft')


def synthetic_partitions(ds: synthetic_data.SyntheticDataset, num_partitions: int,
                         partition_ids) -> list[input_pipeline.Partition]:
  n = len(ds)
  return [input_pipeline.Partition(p, ds.images[m], ds.labels[m],
                                   extras={'soft_labels': ds.soft_labels[m]})
          for p in partition_ids for m in [input_pipeline.partition_members(n, num_partitions, p)]]


def validate(config) -> None:
  cfg = config.student
  if cfg.labels not in LABELS:
    raise UserError(f"unknown student.labels {cfg.labels!r}: use 'hard' or 'soft'")
  parallel.check_batch(cfg.batch_size, 'student.batch_size')
  models.create_model(cfg.model.name, 2, stem=cfg.model.stem, dtype=cfg.model.dtype)


def run(config, workdir) -> dict:
  cfg = config.student
  ds = synthetic_data.load_synthetic(pipeline.stage_dir(workdir, 'synthesize'))
  manifest = ds.manifest
  num_partitions = input_pipeline.resolve_num_partitions(config.data, jax.process_count())
  partition_ids = input_pipeline.partition_ids_for_process(
      num_partitions, jax.process_index(), jax.process_count())
  parts = synthetic_partitions(ds, num_partitions, partition_ids)
  batches = input_pipeline.PartitionedBatches(parts, num_partitions, len(ds), cfg.batch_size,
                                              seed=config.seed)
  model = models.create_model(cfg.model.name, manifest['num_classes'], stem=cfg.model.stem,
                              dtype=cfg.model.dtype)
  out = pipeline.stage_dir(workdir, 'student') / 'synthetic'
  writer = metrics.Writer(fileio.path(workdir) / 'tensorboard' / 'student')
  use_soft = cfg.labels == 'soft'
  variables, summary = train.fit(
      name='student', model=model, cfg=cfg, batches=batches,
      image_shape=manifest['image_shape'], num_classes=manifest['num_classes'],
      mean=manifest['mean'], std=manifest['std'], workdir=out, seed=config.seed + 1,
      writer=writer, use_soft_labels=use_soft,
      soft_temperature=manifest['soft_label_temperature'])
  writer.close()
  values = {'train_seconds': summary['train_seconds'], 'labels': cfg.labels,
            'num_images': len(ds), 'model': cfg.model.name, 'epochs': summary['epochs'],
            'steps': summary['steps']}
  artifacts.save_model(out, model_config=cfg.model, variables=variables,
                       class_names=manifest['class_names'], image_shape=manifest['image_shape'],
                       mean=manifest['mean'], std=manifest['std'],
                       extra={'trained_on': 'synthetic', **values})
  if parallel.is_main_process():
    fileio.atomic_write_json(pipeline.stage_dir(workdir, 'student') / 'manifest.json',
                             {'synthetic': values})
  report.update(workdir, {'student': {'synthetic': values}})
  return values


pipeline.register(pipeline.Stage('student', run, validate))
