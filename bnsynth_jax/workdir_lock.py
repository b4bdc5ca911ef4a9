"""One writer per workdir: WORKDIR/.lock, held by process 0 for the whole run.

The lock file holds the holder's pid, host and start time (JSON), and is created
with O_CREAT | O_EXCL, so two runs racing for it cannot both win. A second run
stops at once with one line naming the holder. A lock whose pid is dead on this
host is stale (its run was killed with -9 or the machine rebooted): it is taken
over with a warning. Pids are reused (after a reboot, or when a container's pid
namespace starts again), so where /proc exists the lock also records the
holder's process identity (boot id and process start tick): a live pid with
another identity is a new process, and the lock is stale too. A lock held from
another host cannot be checked from here: the message says how to remove it if
that run is gone.

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


def _process_identity(pid: int) -> str | None:
  """'BOOT_ID:START_TICKS' of a live pid, or None where /proc cannot tell (macOS)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
    with open('/proc/sys/kernel/random/boot_id') as f:
      boot = f.read().strip()
  except OSError:
    return None
  # Field 22 (starttime); the command name (field 2) may hold spaces: split after its ')'.
  return f'{boot}:{stat.rsplit(")", 1)[1].split()[19]}'


def _holder_gone(holder: dict) -> bool:
  """True when the holder (on this host) is no longer running: pid dead, or reused."""
  pid = holder.get('pid')
  if not isinstance(pid, int):
    return False
  if not _pid_alive(pid):
    return True
  recorded = holder.get('process')
  current = _process_identity(pid)
  return bool(recorded and current and recorded != current)


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
            'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'process': _process_identity(os.getpid())}
  for _ in range(3):
    if _try_create(path, record):
      return None
    holder = _read(path)
    same_host = holder.get('host') == socket.gethostname()
    if same_host and _holder_gone(holder):
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
