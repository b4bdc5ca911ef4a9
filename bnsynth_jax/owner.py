"""The data owner's private corner of a workdir: WORKDIR/.owner/ (mode 0700).

In DP mode nothing that could undo the noise may sit in a folder a user hands out
(`teacher/`, `stats/`, `synthetic/`, the export). What only the owner may see lives
here instead:

* `secrets/<stage>.json`: the secret randomness of a DP stage in progress (DP-SGD batch
  sampling and noise key), 128 bits from the OS, needed only so that a killed stage
  resumes exactly. It is deleted when the stage finishes. The statistics stage needs
  none (its noise is drawn once, from the OS, when the noised sums are written).
* `teacher/`: the DP teacher's training state (orbax checkpoints, whose optimiser state
  holds the noise key, and progress.json), deleted when the teacher is final; its
  metrics.json (test accuracy, an unprotected split) and TensorBoard scalars stay.

Files here are created owner-only (0600 in a 0700 folder). Everything else the owner
keeps (evaluate/, audit/, report.md, report.json) is listed in docs/privacy.md.
"""

from __future__ import annotations

import os
import secrets
import shutil

from bnsynth_jax import fileio, parallel

FOLDER = '.owner'
SECRET_BITS = 128


def owner_dir(workdir):
  """WORKDIR/.owner, created owner-only (0700) on first use."""
  d = fileio.path(workdir) / FOLDER
  if parallel.is_main_process() and not d.exists():
    d.mkdir(parents=True, exist_ok=True)
    _restrict(d, 0o700)
  return d


def _restrict(p, mode: int) -> None:
  if not str(p).startswith('gs://'):
    os.chmod(str(p), mode)


def training_dir(workdir, stage: str):
  """Where a DP stage keeps its resumable training state: WORKDIR/.owner/<stage>/."""
  d = owner_dir(workdir) / stage
  if parallel.is_main_process():
    d.mkdir(parents=True, exist_ok=True)
    _restrict(d, 0o700)
  return d


def _secret_path(workdir, stage: str):
  d = owner_dir(workdir) / 'secrets'
  if parallel.is_main_process():
    d.mkdir(parents=True, exist_ok=True)
    _restrict(d, 0o700)
  return d / f'{stage}.json'


def stage_secret(workdir, stage: str) -> int:
  """The stage's secret (a SECRET_BITS-bit integer): drawn from the OS when the stage
  first starts and kept owner-only until `forget_secret`, so a resumed run continues
  with the same randomness. The same on every process."""
  value = None
  if parallel.is_main_process():
    target = _secret_path(workdir, stage)
    if target.exists():
      value = int(fileio.read_json(target)['secret'], 16)
    else:
      value = secrets.randbits(SECRET_BITS)
      fileio.atomic_write_json(target, {'secret': f'{value:x}', 'bits': SECRET_BITS})
      _restrict(target, 0o600)
  return int(parallel.broadcast_from_main(value))


def forget_secret(workdir, stage: str) -> None:
  """Deletes the stage's secret (its release is final: nothing left to resume)."""
  if parallel.is_main_process():
    target = fileio.path(workdir) / FOLDER / 'secrets' / f'{stage}.json'
    if target.exists():
      target.unlink()
  parallel.sync(f'forget-secret-{stage}')


def delete_training_state(workdir, stage: str) -> None:
  """Deletes a finished DP stage's checkpoints and progress (they hold the noise key)."""
  d = fileio.path(workdir) / FOLDER / stage
  if parallel.is_main_process():
    for name in ('checkpoints', 'progress.json'):
      p = d / name
      if p.is_dir():
        shutil.rmtree(str(p))
      elif p.exists():
        p.unlink()
  parallel.sync(f'forget-training-{stage}')


def clear_stage(workdir, stage: str) -> None:
  """A stage replaced (--overwrite): its secret and its whole training state go, so that
  the new run neither resumes the old one's steps nor reuses its randomness."""
  forget_secret(workdir, stage)
  d = fileio.path(workdir) / FOLDER / stage
  if parallel.is_main_process() and d.exists():
    shutil.rmtree(str(d))
  parallel.sync(f'clear-owner-{stage}')


def delete_legacy_secrets(stage_folder) -> None:
  """A DP stage finished by an older version kept its seed and checkpoints in the folder
  that is handed out: deleted."""
  if not parallel.is_main_process():
    return
  for name in ('.noise_seed', 'checkpoints'):
    p = fileio.path(stage_folder) / name
    if p.is_dir():
      shutil.rmtree(str(p))
    elif p.exists():
      p.unlink()
