"""Stage order, skip-if-done, resume, and the private-data boundary.

Stages run in order; each is one function in its own module. A stage is done
when its manifest.json exists (written last, atomically): it is then skipped.
An unfinished stage resumes from its checkpoints.

Each stage records the configuration it depends on (its own section plus every
upstream section) in WORKDIR/<stage>/stage_config.json before it writes
anything else. A later run with a different configuration is refused, naming
the differing keys, unless --overwrite is given, which deletes that stage and
every later one.

The private-data boundary: only the stages in PRIVATE_STAGES are handed a
`PrivateData`. `synthesize` and `student` are called without one, and with a
config whose data section holds only the partition count (`public_config`), so
no code path of theirs can find, let alone read, a private image.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from bnsynth_jax import (config_lib, fileio, input_pipeline, parallel, preflight, report,
                         workdir_lock)
from bnsynth_jax.errors import UserError

STAGES = ('teacher', 'stats', 'synthesize', 'student', 'evaluate', 'audit')
# The config sections each stage depends on (upstream sections are added).
STAGE_SECTIONS = {
    'teacher': ('seed', 'data', 'model', 'teacher'),
    'stats': ('stats',),
    'synthesize': ('synthesis',),
    'student': ('student',),
    'evaluate': ('evaluate',),
    'audit': ('audit',),
}
PRIVATE_STAGES = frozenset({'teacher', 'stats', 'evaluate', 'audit'})
STAGE_DIRS = {'teacher': 'teacher', 'stats': 'stats', 'synthesize': 'synthetic',
              'student': 'student', 'evaluate': 'evaluate', 'audit': 'audit'}
# The report.json keys (dot-paths) each stage writes, removed when the stage is replaced.
REPORT_KEYS = {'teacher': ['teacher'], 'stats': ['stats'], 'synthesize': ['synthesis'],
               'student': ['student'],
               'evaluate': ['student.synthetic.test_accuracy', 'student.real_subset',
                            'student.full_real', 'student.ratio'],
               'audit': ['audit']}


# ----------------------------------------------------------------------------
# Private data access (teacher, stats, evaluate, audit only)


class PrivateData:
  """The private dataset, loaded lazily and once per run, this process's partitions."""

  def __init__(self, data_config):
    self.config = data_config
    self._source = None
    self._splits: dict[str, list[input_pipeline.Partition]] = {}
    self._info = None
    self.num_partitions = input_pipeline.resolve_num_partitions(data_config,
                                                                jax.process_count())
    self.partition_ids = input_pipeline.partition_ids_for_process(
        self.num_partitions, jax.process_index(), jax.process_count())

  def reset(self) -> None:
    """Forgets the source (after preflight changed the data config it was made from)."""
    self._source, self._info, self._splits = None, None, {}

  @property
  def source(self) -> input_pipeline.Source:
    if self._source is None:
      self._source = input_pipeline.create_source(self.config)
    return self._source

  @property
  def info(self) -> input_pipeline.DatasetInfo:
    if self._info is None:
      self._info = self.source.info()
    return self._info

  def split(self, which: str) -> list[input_pipeline.Partition]:
    """`which` is 'train' or 'test' (mapped to data.train_split / test_split)."""
    name = self.config.train_split if which == 'train' else self.config.test_split
    if name not in self._splits:
      t0 = time.perf_counter()
      self._splits[name] = self.source.load(name, self.partition_ids, self.num_partitions)
      n = sum(len(p) for p in self._splits[name])
      logging.info('loaded %d %s images (%d of %d partitions) in %.1fs', n, name,
                   len(self.partition_ids), self.num_partitions, time.perf_counter() - t0)
    return self._splits[name]

  def split_size(self, which: str) -> int:
    name = self.config.train_split if which == 'train' else self.config.test_split
    return self.info.num_examples[name]

  def normalisation(self) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of pixel values in [0, 1]: from the config, else the train split."""
    c = self.info.image_shape[-1]
    if self.config.mean or self.config.std:
      mean, std = list(map(float, self.config.mean)), list(map(float, self.config.std))
      if len(mean) != c or len(std) != c or min(std) <= 0:
        raise UserError(f'data.mean/data.std must each hold {c} values (std > 0), got '
                        f'{tuple(mean)} / {tuple(std)}')
      return mean, std
    sums = parallel.sum_across_processes(input_pipeline.channel_sums(self.split('train')))
    mean, std = input_pipeline.moments_from_sums(sums)
    return mean.tolist(), std.tolist()


def public_config(config) -> ml_collections.ConfigDict:
  """The config handed to stages outside PRIVATE_STAGES: the data section keeps only the
  partition count, so those stages do not even know where the private data is."""
  public = ml_collections.ConfigDict(config.to_dict())
  public.data = ml_collections.ConfigDict({'num_partitions': config.data.num_partitions})
  return public


# ----------------------------------------------------------------------------
# Stage bookkeeping


def stage_dir(workdir, stage: str):
  return fileio.path(workdir) / STAGE_DIRS[stage]


def is_done(workdir, stage: str) -> bool:
  """Process 0 looks; every process gets the same answer."""
  return parallel.broadcast_from_main((stage_dir(workdir, stage) / 'manifest.json').exists())


def _flatten(cfg: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(cfg, (ml_collections.ConfigDict, dict)):
    out = {}
    for k, v in (cfg.items() if isinstance(cfg, dict) else cfg.items()):
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  if isinstance(cfg, tuple):
    cfg = list(cfg)
  return {prefix[:-1]: cfg}


def stage_config(config, stage: str) -> dict[str, Any]:
  """The flattened configuration `stage` depends on (its sections and all upstream)."""
  sections: list[str] = []
  for s in STAGES[:STAGES.index(stage) + 1]:
    sections.extend(STAGE_SECTIONS[s])
  flat = {}
  for section in sections:
    if section in config:
      flat.update(_flatten({section: config[section]}))
  return {k: v for k, v in flat.items()
          if k not in config_lib.VOLATILE_KEYS
          and k.split('.')[-1] not in config_lib.VOLATILE_KEYS}


def _config_differences(stored: dict, current: dict) -> list[str]:
  # Keys only one side has come from a different code version: not a conflict.
  return sorted(k for k in stored.keys() & current.keys()
                if fileio.to_json(stored[k]) != fileio.to_json(current[k]))


def clear_stage(workdir, stage: str) -> None:
  """Deletes a stage's folder and its report keys."""
  d = stage_dir(workdir, stage)
  if parallel.is_main_process() and d.exists():
    shutil.rmtree(str(d)) if not str(d).startswith('gs://') else d.rmtree()
  report.remove_keys(workdir, REPORT_KEYS[stage] + [f'timings.{stage}_seconds'])
  parallel.sync(f'clear-{stage}')


def claim_stage(config, workdir, stage: str, overwrite: bool) -> None:
  """Records the stage's config, or refuses a workdir made with a different one."""
  d = stage_dir(workdir, stage)
  record = d / 'stage_config.json'
  current = stage_config(config, stage)
  # Process 0 reads the record; every process acts on what it found.
  stored = parallel.broadcast_from_main(fileio.read_json(record) if record.exists() else None)
  if stored is not None:
    diffs = _config_differences(stored, current)
    if diffs:
      if not overwrite:
        shown = '; '.join(f'{k}: {fileio.to_json(stored[k]).strip()} -> '
                          f'{fileio.to_json(current[k]).strip()}' for k in diffs[:3])
        more = f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else ''
        raise UserError(
            f'workdir {workdir} holds a {stage} stage made with a different config ({shown}'
            f'{more}): use a new --workdir, or pass --overwrite to replace that stage and the '
            'ones after it')
      for later in STAGES[STAGES.index(stage):]:
        clear_stage(workdir, later)
    else:
      return
  if parallel.is_main_process():
    fileio.atomic_write_json(record, current)
  parallel.sync(f'claim-{stage}')


def check_workdir_writable(workdir) -> None:
  path = fileio.path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write-probe-{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise UserError(f'workdir {workdir} is not writable ({e.strerror or e}): choose another '
                    '--workdir') from None


# ----------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class Stage:
  name: str
  run: Callable[..., dict]          # run(config, workdir, [data]) -> report values
  validate: Callable[[Any], None] | None = None   # cheap checks before anything runs


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> None:
  _REGISTRY[stage.name] = stage


def _load_stages() -> None:
  # Imported here so that importing pipeline stays light; each module registers itself.
  from bnsynth_jax import teacher  # noqa: F401
  for optional in ('stats', 'synthesis', 'student', 'evaluation', 'audit'):
    try:
      __import__(f'bnsynth_jax.{optional}')
    except ModuleNotFoundError as e:
      if e.name != f'bnsynth_jax.{optional}':
        raise


def parse_stages(spec: str) -> list[str]:
  _load_stages()
  available = [s for s in STAGES if s in _REGISTRY]
  if spec in ('', 'all'):
    return available
  wanted = [s.strip() for s in spec.split(',') if s.strip()]
  unknown = [s for s in wanted if s not in STAGES]
  if unknown:
    raise UserError(f'unknown stage(s) {", ".join(unknown)}: choose from '
                    f'{", ".join(available)} (comma-separated) or all')
  missing = [s for s in wanted if s not in _REGISTRY]
  if missing:
    raise UserError(f'stage(s) {", ".join(missing)} are not available in this version')
  return [s for s in STAGES if s in wanted]


def prepare(config, workdir: str, stages: str = 'all') -> tuple[list[str], PrivateData]:
  """Selects the stages and runs the preflight: every knowable check, and the values left
  at 0 derived into `config`, before anything is written. Raises UserError."""
  selected = parse_stages(stages)
  data = PrivateData(config.data)
  preflight.run(config, workdir, selected, data,
                {name: _REGISTRY[name].validate for name in selected})
  return selected, data


def run(config, workdir: str, stages: str = 'all', overwrite: bool = False) -> dict:
  """Runs the selected stages in order; returns the final report."""
  selected, data = prepare(config, workdir, stages)
  check_workdir_writable(workdir)
  with workdir_lock.hold(workdir):
    return _run_stages(config, workdir, selected, data, overwrite)


def _run_stages(config, workdir, selected, data, overwrite) -> dict:
  logging.info('devices: %s', parallel.describe_devices())
  report.update(workdir, {'environment': report.environment(),
                          'config': json.loads(config.to_json_best_effort())})
  for name in selected:
    stage = _REGISTRY[name]
    claim_stage(config, workdir, name, overwrite)
    if is_done(workdir, name):
      logging.info('stage %s: done already (%s), skipping', name,
                   stage_dir(workdir, name) / 'manifest.json')
      continue
    logging.info('stage %s: starting', name)
    t0 = time.perf_counter()
    args = ((config, workdir, data) if name in PRIVATE_STAGES
            else (public_config(config), workdir))
    stage.run(*args)
    parallel.sync(f'stage-{name}-done')
    report.update(workdir, {'timings': {f'{name}_seconds': time.perf_counter() - t0}})
    logging.info('stage %s: finished in %.1fs', name, time.perf_counter() - t0)
  final = report.load(workdir)
  report.write_markdown(workdir)
  if parallel.is_main_process() and ('student' in final or 'audit' in final):
    print('\n' + report.utility_table(final), flush=True)
    if 'audit' in final:
      print('\n' + report.audit_table(final), flush=True)
    print(f'\nreport: {fileio.path(workdir) / "report.md"}', flush=True)
  return final
