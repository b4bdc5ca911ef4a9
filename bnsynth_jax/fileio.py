"""Atomic writes: a temporary name in the same folder, then a rename.

Every file that another stage or a user reads goes through here, so a kill at
any moment leaves either the old file or the new one, never half of one. Paths
may be local or remote (gs://...) through etils.epath.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import io
import json
import os
import signal
import threading
import uuid
import zipfile
from typing import Any

import numpy as np
from etils import epath


def path(p) -> epath.Path:
  return epath.Path(os.path.expanduser(str(p)) if not str(p).startswith('gs://') else p)


@contextlib.contextmanager
def deferred_signals():
  """Ctrl-C / SIGTERM arriving inside the block take effect when it ends (main thread)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  pending = []
  previous = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    previous[sig] = signal.getsignal(sig)
    signal.signal(sig, lambda signum, frame: pending.append((signum, frame)))
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for signum, frame in pending[:1]:
      handler = previous[signum]
      if callable(handler):
        handler(signum, frame)
      elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


def atomic_write_bytes(target, data: bytes) -> None:
  """Writes `data` to a temporary name beside `target`, then renames it into place.

  An interrupt (Ctrl-C, SIGTERM) during the write is deferred until the file is in
  place; a failed write (disk full, permission lost) removes its temporary file and
  leaves `target` as it was.
  """
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'.{target.name}.tmp-{uuid.uuid4().hex[:8]}'   # (TEMPORARY_GLOB)
  with deferred_signals():
    try:
      with tmp.open('wb') as f:
        f.write(data)
        if hasattr(f, 'fileno'):
          try:
            f.flush()
            os.fsync(f.fileno())
          except io.UnsupportedOperation:
            pass
          except OSError as e:      # filesystems without fsync; ENOSPC etc. propagate
            if e.errno not in (errno.EINVAL, errno.ENOTSUP):
              raise
      tmp.replace(target)   # os.replace: atomic on POSIX filesystems
    except BaseException:
      with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
      raise


TEMPORARY_GLOB = '.*.tmp-*'


def remove_stale_temporaries(folder) -> list:
  """Deletes the temporary files a killed writer left under `folder`; returns their paths.

  Call only while no writer is running (a stage's start, under the workdir lock): each
  temporary belongs to a write that never reached its rename, so nothing refers to it.
  """
  folder = path(folder)
  if not folder.exists():
    return []
  stale, pending = [], [folder]
  while pending:                # (epath has no recursive glob on remote paths)
    for p in pending.pop().iterdir():
      if p.is_dir():
        pending.append(p)
      elif fnmatch.fnmatch(p.name, TEMPORARY_GLOB):
        stale.append(p)
  for p in stale:
    with contextlib.suppress(OSError):
      p.unlink()
  return stale


def atomic_write_text(target, text: str) -> None:
  atomic_write_bytes(target, text.encode('utf-8'))


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  raise TypeError(f'not JSON serialisable: {type(o).__name__}')


def to_json(obj: Any) -> str:
  return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + '\n'


def atomic_write_json(target, obj: Any) -> None:
  atomic_write_text(target, to_json(obj))


def read_json(source) -> Any:
  return json.loads(path(source).read_text())


def npz_bytes(**arrays: np.ndarray) -> bytes:
  """An .npz that np.load reads, byte-for-byte reproducible (np.savez stamps the time)."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', compression=zipfile.ZIP_STORED) as zf:
    for name in sorted(arrays):
      info = zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0))
      info.external_attr = 0o644 << 16
      member = io.BytesIO()
      arr = np.asarray(arrays[name])   # (ascontiguousarray would make 0-d arrays 1-d)
      np.lib.format.write_array(member, arr if arr.flags.c_contiguous else arr.copy(),
                                allow_pickle=False)
      zf.writestr(info, member.getvalue())
  return buf.getvalue()


def atomic_write_npz(target, **arrays: np.ndarray) -> str:
  """Writes a reproducible .npz atomically; returns its sha256."""
  data = npz_bytes(**arrays)
  atomic_write_bytes(target, data)
  return hashlib.sha256(data).hexdigest()


def read_npz_bytes(data: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def read_npz(source) -> dict[str, np.ndarray]:
  return read_npz_bytes(path(source).read_bytes())
