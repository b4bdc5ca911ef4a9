"""One writer per workdir: WORKDIR/.lock, held by process 0 for the whole run.

The lock file holds the holder's pid, host and start time (JSON), and is created
with O_CREAT | O_EXCL, so two runs racing for it cannot both win. A second run
stops at once with one line naming the holder. A lock whose pid is dead on this
host is stale (its run was killed with -9 or the machine rebooted): it is taken
over with a warning. A lock held from another host cannot be checked from here:
the message says how to remove it if that run is gone.

Process 0 decides and every process learns the outcome, so a multi-host run
either starts everywhere or stops everywhere. Remote workdirs (gs://) have no
exclusive create: they are not locked (logged).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time

from absl import logging

from bnsynth_jax import fileio, parallel
from bnsynth_jax.errors import UserError

LOCK_FILE = '.lock'


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:       # alive, owned by another user
    return True
  return True


def _describe(holder: dict) -> str:
  return (f'pid {holder.get("pid")} on host {holder.get("host")} since '
          f'{holder.get("started", "?")}')


def _try_create(path: str, record: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(json.dumps(record) + '\n')
    f.flush()
    os.fsync(f.fileno())
  return True


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.loads(f.read() or '{}')
  except (OSError, ValueError):
    return {}   # a lock being written or a garbled one: judged by its (missing) pid


def _acquire(workdir) -> str | None:
  """Takes the lock (process 0). Returns an error message, or None on success."""
  path = str(fileio.path(workdir) / LOCK_FILE)
  record = {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
  for _ in range(3):
    if _try_create(path, record):
      return None
    holder = _read(path)
    same_host = holder.get('host') == socket.gethostname()
    pid = holder.get('pid')
    if same_host and isinstance(pid, int) and not _pid_alive(pid):
      logging.warning('workdir %s: taking over the stale lock of %s (that process is gone)',
                      workdir, _describe(holder))
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
      continue
    if not holder and not same_host:
      time.sleep(0.2)   # created a moment ago by a racing run, not yet written: look again
      continue
    where = ('' if same_host else
             f'; if that run is gone, delete {path}')
    return (f'workdir {workdir} is in use by another run ({_describe(holder)}): wait for it to '
            f'finish or use another --workdir{where}')
  return f'workdir {workdir}: could not take {path}: delete it if no run is using the workdir'


@contextlib.contextmanager
def hold(workdir):
  """Holds the workdir lock for the duration of the block (process 0 takes it)."""
  remote = str(workdir).startswith('gs://')
  if remote:
    logging.info('workdir %s is remote: not locked; run one writer at a time', workdir)
  error = _acquire(workdir) if parallel.is_main_process() and not remote else None
  error = parallel.broadcast_from_main(error)
  if error:
    raise UserError(error)
  try:
    yield
  finally:
    if parallel.is_main_process() and not remote:
      path = str(fileio.path(workdir) / LOCK_FILE)
      if _read(path).get('pid') == os.getpid():
        with contextlib.suppress(FileNotFoundError):
          os.unlink(path)
