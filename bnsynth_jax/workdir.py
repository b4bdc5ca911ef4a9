"""Where each stage's artifacts live in a workdir, and whether a stage is done.

Stages import this small module to find their own and upstream folders; none
imports the pipeline. A stage's folder is its name, except synthesize's
(`synthetic/`, the dataset it holds).
"""

from __future__ import annotations

from bnsynth_jax import fileio, parallel

FOLDERS = {'synthesize': 'synthetic'}     # stage -> folder, where they differ
MANIFEST = 'manifest.json'                # written last: its presence means "done"


def stage_dir(workdir, stage: str):
  return fileio.path(workdir) / FOLDERS.get(stage, stage)


def teacher_dir(config, workdir):
  """The teacher the later stages use: synthesis.teacher_dir if given, else WORKDIR/teacher."""
  return fileio.path(config.synthesis.teacher_dir or stage_dir(workdir, 'teacher'))


def stats_dir(config, workdir):
  """The statistics synthesis matches: synthesis.stats_dir if given, else WORKDIR/stats."""
  return fileio.path(config.synthesis.stats_dir or stage_dir(workdir, 'stats'))


def is_done(workdir, stage: str) -> bool:
  """Process 0 looks; every process gets the same answer."""
  return parallel.broadcast_from_main((stage_dir(workdir, stage) / MANIFEST).exists())
