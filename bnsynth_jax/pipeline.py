"""Stage order, skip-if-done, resume, and the private-data boundary.

The stages are the records in STAGES, run in order; each is one function in its
own module, and none of those modules imports this one (they find folders through
bnsynth_jax.workdir). A stage is done when its manifest.json exists (written last,
atomically): it is then skipped. An unfinished stage resumes from its checkpoints.

Each stage records the configuration it depends on (its own section plus every
upstream section, and fingerprints of artifacts it reads from outside the workdir)
in WORKDIR/<stage>/stage_config.json before it writes anything else. A later run
with a different configuration is refused, naming the differing keys, unless
--overwrite is given, which deletes that stage and every later one.

The private-data boundary: only private stages are handed a `sources.PrivateData`.
`synthesize` and `student` are called without one, with a config whose data section
holds only the partition count (`public_config`), and their modules cannot import
the private sources (tests/test_resume_and_boundary.py checks the import graph).
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

from bnsynth_jax import (audit, config_lib, evaluation, fileio, ledger, owner, parallel, preflight,
                         privacy, relabel, report, stats, student, synthesis, teacher, workdir_lock)
from bnsynth_jax.errors import UserError
from bnsynth_jax.sources import PrivateData
from bnsynth_jax.workdir import is_done, stage_dir


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage. Adding a stage means adding its record to STAGES, in order."""
  name: str
  run: Callable[..., dict]          # run(config, workdir[, data]) -> report values
  sections: tuple[str, ...]         # config sections it depends on (upstream ones are added)
  private: bool                     # handed the PrivateData (and the full config)?
  report_keys: tuple[str, ...]      # report.json dot-paths it writes
  validate: Callable[[Any], None] | None = None      # config-only checks (the preflight runs them)
  inputs: Callable[[Any, Any], dict] | None = None   # fingerprints of the artifacts it reads
  # precheck(config, workdir, its stage config): checks that need the upstream artifacts,
  # run before the stage records anything (a refusal leaves the workdir as it was)
  precheck: Callable[[Any, Any, dict], None] | None = None


STAGES = (
    Stage('teacher', teacher.run, ('seed', 'data', 'model', 'teacher', 'privacy'), True,
          ('teacher', 'privacy'), teacher.validate),
    Stage('stats', stats.run, ('stats',), True, ('stats',), stats.validate),
    Stage('synthesize', synthesis.run, ('synthesis',), False, ('synthesis',),
          synthesis.validate, synthesis.input_fingerprints, synthesis.precheck),
    Stage('relabel', relabel.run, ('relabel',), False, ('relabel',), relabel.validate,
          relabel.input_fingerprints, relabel.precheck),
    Stage('student', student.run, ('student',), False, ('student',), student.validate),
    Stage('evaluate', evaluation.run, ('evaluate',), True, ('evaluate',)),
    Stage('audit', audit.run, ('audit',), True, ('audit',), audit.validate),
)
NAMES = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}
PRIVATE_STAGES = frozenset(stage.name for stage in STAGES if stage.private)


def public_config(config) -> ml_collections.ConfigDict:
  """The config handed to stages that are not private: the data section keeps only the
  partition count, so those stages do not even know where the private data is."""
  public = ml_collections.ConfigDict(config.to_dict())
  public.data = ml_collections.ConfigDict({'num_partitions': config.data.num_partitions})
  return public


# ----------------------------------------------------------------------------
# Stage bookkeeping


def _flatten(cfg: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(cfg, (ml_collections.ConfigDict, dict)):
    out = {}
    for k, v in cfg.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  if isinstance(cfg, tuple):
    cfg = list(cfg)
  return {prefix[:-1]: cfg}


def stage_config(config, stage: str, workdir=None) -> dict[str, Any]:
  """The flattened configuration `stage` depends on (its sections and all upstream), plus
  `inputs.*`: fingerprints of the artifacts the stage reads (given a workdir)."""
  flat = {}
  for s in STAGES[:NAMES.index(stage) + 1]:
    for section in s.sections:
      if section in config:
        flat.update(_flatten({section: config[section]}))
  flat = {k: v for k, v in flat.items()
          if k not in config_lib.VOLATILE_KEYS
          and k.split('.')[-1] not in config_lib.VOLATILE_KEYS}
  if 'privacy.teacher_fraction' in flat:
    _record_resolved_fraction(flat, config)
  if workdir is not None and BY_NAME[stage].inputs:
    flat.update({f'inputs.{k}': v for k, v in BY_NAME[stage].inputs(config, workdir).items()})
  return flat


def _record_resolved_fraction(flat: dict, config) -> None:
  """The teacher's share of epsilon as used, not how it was chosen: a fraction read by
  epsilon from privacy.teacher_fraction_by_epsilon is the same run as that fraction given
  (a workdir made before the table resumes where the table gives its fraction)."""
  flat.pop('privacy.teacher_fraction_by_epsilon', None)
  if privacy.enabled(config):
    try:
      flat['privacy.teacher_fraction'] = privacy.teacher_fraction(config.privacy)
    except UserError:
      pass                         # privacy.validate reports it before any stage runs


def _config_differences(stored: dict, current: dict) -> list[str]:
  """The keys whose value differs. A key only one side has comes from another code version:
  a conflict only where the current value is not the key's default (a new key's default is
  the behaviour the older version had; any other value changes what the stage computes)."""
  defaults = _flatten(config_lib.default_config())
  same = lambda a, b: fileio.to_json(a) == fileio.to_json(b)
  changed = [k for k in stored.keys() & current.keys() if not same(stored[k], current[k])]
  added = [k for k in current.keys() - stored.keys()
           if k in defaults and not same(defaults[k], current[k])]
  return sorted(changed + added)


def _shown(record: dict, key: str) -> str:
  return fileio.to_json(record[key]).strip() if key in record else '(not recorded)'


def clear_stage(workdir, stage: str) -> None:
  """Deletes a stage's folder and its report keys."""
  d = stage_dir(workdir, stage)
  if parallel.is_main_process() and d.exists():
    shutil.rmtree(str(d)) if not str(d).startswith('gs://') else d.rmtree()
  if stage in ledger.RELEASE_STAGES:
    owner.clear_stage(workdir, stage)     # an unfinished DP stage's secret and state too
  report.remove_keys(workdir, list(BY_NAME[stage].report_keys) + [f'timings.{stage}_seconds'])
  parallel.sync(f'clear-{stage}')


def claim_stage(config, workdir, stage: str, overwrite: bool) -> None:
  """Records the stage's config, or refuses a workdir made with a different one."""
  record = stage_dir(workdir, stage) / 'stage_config.json'
  current = stage_config(config, stage, workdir)
  # Process 0 reads the record; every process acts on what it found.
  stored = parallel.broadcast_from_main(fileio.read_json(record) if record.exists() else None)
  if stored is not None:
    diffs = _config_differences(stored, current)
    if not diffs:
      return
    if not overwrite:
      shown = '; '.join(f'{k}: {_shown(stored, k)} -> {_shown(current, k)}' for k in diffs[:3])
      more = f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else ''
      raise UserError(
          f'workdir {workdir} holds a {stage} stage made with a different config ({shown}'
          f'{more}): use a new --workdir, or pass --overwrite to replace that stage and the '
          'ones after it')
    for later in NAMES[NAMES.index(stage):]:
      clear_stage(workdir, later)
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


def parse_stages(spec: str) -> list[Stage]:
  if spec in ('', 'all'):
    return list(STAGES)
  wanted = [s.strip() for s in spec.split(',') if s.strip()]
  unknown = [s for s in wanted if s not in BY_NAME]
  if unknown:
    raise UserError(f'unknown stage(s) {", ".join(unknown)}: choose from '
                    f'{", ".join(NAMES)} (comma-separated) or all')
  return [s for s in STAGES if s.name in wanted]


def prepare(config, workdir: str, stages: str = 'all') -> tuple[list[Stage], PrivateData]:
  """Selects the stages and runs the preflight: every knowable check, and the values left
  at 0 derived into `config`, before anything is written. Raises UserError."""
  selected = parse_stages(stages)
  data = PrivateData(config.data)
  preflight.run(config, workdir, selected, data)
  return selected, data


def run(config, workdir: str, stages: str = 'all', overwrite: bool = False,
        prepared: tuple[list[Stage], PrivateData] | None = None) -> dict:
  """Runs the selected stages in order; returns the final report. `prepared`: what
  prepare(config, workdir, stages) returned, where the caller ran the preflight already."""
  selected, data = prepared or prepare(config, workdir, stages)
  check_workdir_writable(workdir)
  with workdir_lock.hold(workdir):
    return _run_stages(config, workdir, selected, data, overwrite)


def _stages_that_will_run(config, workdir, selected: list[Stage], overwrite: bool) -> list[str]:
  """The selected stages this run computes anew: unfinished ones, and with --overwrite
  every stage from the first whose recorded config differs."""
  out, clearing = [], False
  for stage in selected:
    record = stage_dir(workdir, stage.name) / 'stage_config.json'
    if overwrite and not clearing and record.exists():
      clearing = bool(_config_differences(fileio.read_json(record),
                                          stage_config(config, stage.name, workdir)))
    if clearing or not is_done(workdir, stage.name):
      out.append(stage.name)
  return out


def _check_privacy_spend(config, workdir, selected: list[Stage], data, overwrite) -> None:
  """DP mode: a stage that released before and runs again is a new release (ledger.py),
  refused before anything is cleared or written unless its cumulative spend is accepted."""
  if not privacy.enabled(config) or not ledger.load(workdir):
    return
  again = [s for s in _stages_that_will_run(config, workdir, selected, overwrite)
           if s in ledger.RELEASE_STAGES]
  if again:
    record = privacy.plan(config, data.split_size('train'))
    ledger.check_new_releases(workdir, again, record,
                              float(config.privacy.accept_cumulative_epsilon))


def _finish_release(config, workdir, stage: str) -> None:
  """A finished DP release stage: into the ledger (idempotent), its secret and training
  state deleted (nothing is left to resume), the cumulative spend in the report."""
  if not privacy.enabled(config) or stage not in ledger.RELEASE_STAGES:
    return
  manifest = fileio.read_json(stage_dir(workdir, stage) / 'manifest.json')
  record = manifest.get('privacy')
  if not record:
    return
  summary = ledger.record(workdir, stage, record, ledger.release_id(stage, manifest))
  owner.forget_secret(workdir, stage)
  owner.delete_training_state(workdir, stage)
  owner.delete_legacy_secrets(stage_dir(workdir, stage))
  report.update(workdir, {'privacy': {**record, 'cumulative': summary}})


def _remove_stale_temporaries(workdir, stage: str) -> None:
  """A killed run's half-written temporaries go before the stage resumes (process 0)."""
  if parallel.is_main_process():
    stale = fileio.remove_stale_temporaries(stage_dir(workdir, stage))
    if stale:
      logging.info('stage %s: removed %d temporary file(s) a killed run left', stage, len(stale))
  parallel.sync(f'clean-{stage}')


def _run_stages(config, workdir, selected: list[Stage], data, overwrite) -> dict:
  logging.info('devices: %s', parallel.describe_devices())
  _check_privacy_spend(config, workdir, selected, data, overwrite)
  report.update(workdir, {'environment': report.environment(),
                          'config': json.loads(config.to_json_best_effort())})
  for stage in selected:
    if stage.precheck and (overwrite or not is_done(workdir, stage.name)):
      stage.precheck(config, workdir, stage_config(config, stage.name, workdir))
    claim_stage(config, workdir, stage.name, overwrite)
    if is_done(workdir, stage.name):
      logging.info('stage %s: done already (%s), skipping', stage.name,
                   stage_dir(workdir, stage.name) / 'manifest.json')
      _finish_release(config, workdir, stage.name)
      continue
    logging.info('stage %s: starting', stage.name)
    _remove_stale_temporaries(workdir, stage.name)
    t0 = time.perf_counter()
    args = (config, workdir, data) if stage.private else (public_config(config), workdir)
    stage.run(*args)
    parallel.sync(f'stage-{stage.name}-done')
    _finish_release(config, workdir, stage.name)
    report.update(workdir, {'timings': {f'{stage.name}_seconds': time.perf_counter() - t0}})
    logging.info('stage %s: finished in %.1fs', stage.name, time.perf_counter() - t0)
  final = report.load(workdir)
  report.write_markdown(workdir)
  if parallel.is_main_process() and ('student' in final or 'audit' in final):
    print('\n' + report.utility_table(final), flush=True)
    if 'audit' in final:
      print('\n' + report.audit_table(final), flush=True)
    print(f'\nreport: {fileio.path(workdir) / "report.md"}', flush=True)
  return final
