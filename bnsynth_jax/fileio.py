"""Atomic writes: a temporary name in the same folder, then a rename.

Every file that another stage or a user reads goes through here, so a kill at
any moment leaves either the old file or the new one, never half of one. Paths
may be local or remote (gs://...) through etils.epath.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import numpy as np
from etils import epath


def path(p) -> epath.Path:
  return epath.Path(os.path.expanduser(str(p)) if not str(p).startswith('gs://') else p)


def atomic_write_bytes(target, data: bytes) -> None:
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'.{target.name}.tmp-{uuid.uuid4().hex[:8]}'
  with tmp.open('wb') as f:
    f.write(data)
    if hasattr(f, 'fileno'):
      try:
        f.flush()
        os.fsync(f.fileno())
      except (OSError, io.UnsupportedOperation):
        pass
  tmp.replace(target)   # os.replace: atomic on POSIX filesystems


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


def atomic_write_npz(target, **arrays: np.ndarray) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write_bytes(target, buf.getvalue())


def read_npz(source) -> dict[str, np.ndarray]:
  with path(source).open('rb') as f:
    with np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
