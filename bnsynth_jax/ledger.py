"""The workdir's privacy ledger: every DP release made from it, and their composition.

WORKDIR/privacy_ledger.json lists each DP release (the DP-SGD teacher, the noised
statistics) when it is written, with its mechanism's parameters. A stage that is run
again (`--overwrite`, or its folder deleted) makes a second, independent release of the
same private data: both count. Before such a run starts, the cumulative (epsilon, delta)
of every release in the ledger plus the new ones is computed by the same PLD accountant;
the run is refused unless `privacy.accept_cumulative_epsilon` is at least that much. The
report shows the cumulative figure.

The ledger counts what this workdir released. Releases from other workdirs on the same
private data add up too; the data owner must count those.
"""

from __future__ import annotations

import math
import time

from bnsynth_jax import fileio, parallel, privacy
from bnsynth_jax.errors import UserError

FILE = 'privacy_ledger.json'
RELEASE_STAGES = ('teacher', 'stats')


def _path(workdir):
  return fileio.path(workdir) / FILE


def load(workdir) -> list[dict]:
  p = _path(workdir)
  return list(fileio.read_json(p)['releases']) if p.exists() else []


# A release is named by its artifact's sha256: the same across a resume (the noise is the
# secret's), new for any other noise or setting.
RELEASE_HASH = {'teacher': 'variables_sha256', 'stats': 'statistics_sha256'}


def release_id(stage: str, manifest: dict) -> str:
  return f"{RELEASE_HASH[stage]}:{manifest[RELEASE_HASH[stage]]}"


def mechanism_of(stage: str, record: dict) -> dict:
  """The ledger's description of one stage's mechanism, from the plan record."""
  part = record[stage]
  if stage == 'teacher' and 'steps' not in part:       # the class-means head: one Gaussian
    return {'kind': 'gaussian', 'noise_multiplier': part['noise_multiplier']}
  if stage == 'teacher':
    return {'kind': 'dpsgd_fixed_batch', 'noise_multiplier': part['noise_multiplier'],
            'batch_size': part['batch_size'], 'accounted_examples': part['accounted_examples'],
            'steps': part['steps']}
  return {'kind': 'gaussian', 'noise_multiplier': part['noise_multiplier']}


def event_of(mechanism: dict):
  if mechanism['kind'] == 'dpsgd_fixed_batch':
    return privacy.teacher_event(mechanism['noise_multiplier'], mechanism['batch_size'],
                                 mechanism['accounted_examples'], mechanism['steps'])
  return privacy.stats_event(mechanism['noise_multiplier'])


def cumulative_epsilon(mechanisms: list[dict], delta: float) -> float:
  return privacy.epsilon_of([event_of(m) for m in mechanisms], delta) if mechanisms else 0.0


def record(workdir, stage: str, plan_record: dict, release: str) -> dict:
  """Adds the release (idempotent on its id) and returns the ledger summary."""
  releases = load(workdir)
  if not any(r['id'] == release for r in releases):
    releases.append({'id': release, 'stage': stage, 'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
                     'private': bool(plan_record.get('private', True)),
                     'mechanism': mechanism_of(stage, plan_record),
                     'epsilon_alone': plan_record[stage]['epsilon_alone']})
  summary = summarize(releases, float(plan_record['delta']))
  if parallel.is_main_process():
    fileio.atomic_write_json(_path(workdir), {'releases': releases, 'cumulative': summary})
  return summary


def summarize(releases: list[dict], delta: float) -> dict:
  return {'epsilon': cumulative_epsilon([r['mechanism'] for r in releases], delta),
          'delta': delta, 'releases': len(releases),
          'by_stage': {s: sum(r['stage'] == s for r in releases) for s in RELEASE_STAGES}}


def check_new_releases(workdir, stages: list[str], plan_record: dict, accepted: float) -> None:
  """Refuses new releases of stages the ledger has released already, unless the user
  accepted the cumulative epsilon (privacy.accept_cumulative_epsilon)."""
  releases = load(workdir)
  again = [s for s in stages if any(r['stage'] == s for r in releases)]
  if not again:
    return
  delta = float(plan_record['delta'])
  total = cumulative_epsilon([r['mechanism'] for r in releases]
                             + [mechanism_of(s, plan_record) for s in stages], delta)
  if total > accepted:
    shown = math.ceil(total * 1e4) / 1e4      # rounded up: passing it back is accepted
    raise UserError(
        f'workdir {workdir} released the {" and ".join(again)} under DP already '
        f'({len(releases)} release(s) in {FILE}); running {"them" if len(again) > 1 else "it"} '
        f'again is another release of the same private data, cumulative epsilon {total:.4g} '
        f'(delta {delta:g}): pass --config.privacy.accept_cumulative_epsilon={shown:g} to '
        'accept that spend, or keep the finished stages')
