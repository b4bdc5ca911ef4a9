"""The evaluate stage: every model on the real test split, with a fair baseline.

Runs on the data owner's side. The baseline student is trained with the
identical recipe (student config: model, optimiser, epochs, augmentation) on a
class-balanced random subset of the real training split holding as many images
per class as the synthetic dataset, so the synthetic student's accuracy has its
fair comparison: evaluate.ratio = synthetic / real_subset.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from bnsynth_jax import (artifacts, config_lib, fileio, input_pipeline, parallel, report,
                         synthetic_data, train)
from bnsynth_jax.privacy import prior
from bnsynth_jax.sources import PrivateData
from bnsynth_jax.workdir import stage_dir, teacher_dir

# The real-subset baseline's members: indices into the private train split.
MEMBERS_FILE = 'real_subset_members.npz'


def _train_real_student(config, workdir, data, name, parts, size, teacher_manifest):
  cfg = config.student
  seed = config_lib.student_seed(config)
  batches = input_pipeline.PartitionedBatches(parts, data.num_partitions, size, cfg.batch_size,
                                              seed=seed)

  start = prior.student_start(config, teacher_manifest['num_classes'],
                              teacher_manifest['image_shape'], seed)

  def summary_values(summary):
    return {'test_accuracy': summary['test_accuracy'],
            'train_seconds': summary['train_seconds'], 'num_images': size, 'labels': 'hard',
            'model': cfg.model.name, 'epochs': summary['epochs'], 'steps': summary['steps'],
            'init': prior.student_record(config) or 'random'}

  _, summary = train.fit_and_save(
      stage_dir(workdir, 'evaluate') / name, model_config=cfg.model,
      class_names=teacher_manifest['class_names'], num_classes=teacher_manifest['num_classes'],
      image_shape=teacher_manifest['image_shape'], mean=teacher_manifest['mean'],
      std=teacher_manifest['std'], extra=lambda s: {'trained_on': name, **summary_values(s)},
      tensorboard=fileio.path(workdir) / 'tensorboard' / name,
      name=name, cfg=cfg, batches=batches, seed=seed + 1, init=start,
      test=(data.split('test'), data.split_size('test'), data.num_partitions))
  return summary_values(summary)


def run(config, workdir, data: PrivateData) -> dict:
  mesh = parallel.make_mesh()
  teacher_manifest = artifacts.load_model(teacher_dir(config, workdir))[2]
  test = (data.split('test'), data.split_size('test'), data.num_partitions)
  model, variables, student_manifest = artifacts.load_model(
      stage_dir(workdir, 'student') / 'synthetic')
  result = train.evaluate(model.apply, parallel.replicate(mesh, variables), *test,
                          student_manifest['mean'], student_manifest['std'],
                          config.student.eval_batch_size, mesh)
  values = {'synthetic': {'test_accuracy': result['accuracy']}}
  logging.info('synthetic-trained student: test accuracy %.4f', result['accuracy'])
  synth_manifest = synthetic_data.read_manifest(stage_dir(workdir, 'synthesize'))
  per_class = synth_manifest['images_per_class']
  if config.evaluate.real_subset:
    parts, members = input_pipeline.balanced_subset(
        data.split('train'), data.split_size('train'), data.num_partitions, per_class,
        teacher_manifest['num_classes'], seed=config.seed)
    if parallel.is_main_process():
      # The audit scores exactly these members (it does not recompute them).
      fileio.atomic_write_npz(stage_dir(workdir, 'evaluate') / MEMBERS_FILE,
                              indices=members.astype(np.int64))
    values['real_subset'] = _train_real_student(config, workdir, data, 'real_subset', parts,
                                                len(members), teacher_manifest)
    values['real_subset']['images_per_class'] = per_class
    values['ratio'] = result['accuracy'] / max(values['real_subset']['test_accuracy'], 1e-12)
  if config.evaluate.full_real:
    values['full_real'] = _train_real_student(config, workdir, data, 'full_real',
                                              data.split('train'), data.split_size('train'),
                                              teacher_manifest)
  if parallel.is_main_process():
    fileio.atomic_write_json(stage_dir(workdir, 'evaluate') / 'manifest.json', values)
  report.update(workdir, {'evaluate': values})
  return values
