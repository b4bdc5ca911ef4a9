"""Checkpoints: orbax behind two functions, plus the portable final-variables file.

* `save(directory, step, state)` / `restore_or_init(directory, state)`: training
  checkpoints (orbax CheckpointManager, atomic, async, multi-host safe). The
  restored state keeps the shardings of the `state` you pass in.
* `save_variables` / `load_variables`: a model's final {params, batch_stats} as one
  msgpack file (flax.serialization), small and independent of the orbax version:
  the artifact that later stages, other machines and pretrained/ read.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from bnsynth_jax import fileio

_MANAGERS: dict[str, ocp.CheckpointManager] = {}


def _manager(directory) -> ocp.CheckpointManager:
  key = str(directory)
  if key not in _MANAGERS:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=True)
    _MANAGERS[key] = ocp.CheckpointManager(fileio.path(directory), options=options)
  return _MANAGERS[key]


def save(directory, step: int, state: Any) -> None:
  """Saves `state` at `step` (asynchronously; `wait()` before relying on it).

  Here and in wait/close, Ctrl-C and SIGTERM take effect once orbax is done: an interrupt
  inside orbax's own calls would leave its threads half-stopped and print their tracebacks.
  """
  with fileio.deferred_signals():
    _manager(directory).save(step, args=ocp.args.StandardSave(state), force=True)


def restore_or_init(directory, state: Any) -> tuple[Any, int]:
  """Returns (restored state, its step), or (state, 0) if no checkpoint exists."""
  manager = _manager(directory)
  step = manager.latest_step()
  if step is None:
    return state, 0
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return restored, int(step)


def wait() -> None:
  """Blocks until every pending asynchronous save has been committed."""
  with fileio.deferred_signals():
    for manager in _MANAGERS.values():
      manager.wait_until_finished()


def close_all() -> None:
  """Finishes every pending save and closes every manager (before an early exit)."""
  for key in list(_MANAGERS):
    close(key)


def close(directory) -> None:
  manager = _MANAGERS.pop(str(directory), None)
  if manager is not None:
    with fileio.deferred_signals():
      manager.wait_until_finished()
      manager.close()


def save_variables(target, variables: Any) -> str:
  """Writes variables as msgpack atomically; returns their content hash."""
  host = jax.tree.map(np.asarray, variables)
  data = serialization.msgpack_serialize(serialization.to_state_dict(host))
  fileio.atomic_write_bytes(target, data)
  return hashlib.sha256(data).hexdigest()


def load_variables(source) -> tuple[dict, str]:
  """Returns (variables as nested dicts of numpy arrays, content hash)."""
  data = fileio.path(source).read_bytes()
  return serialization.msgpack_restore(data), hashlib.sha256(data).hexdigest()


def variables_hash(variables: Any) -> str:
  host = jax.tree.map(np.asarray, variables)
  data = serialization.msgpack_serialize(serialization.to_state_dict(host))
  return hashlib.sha256(data).hexdigest()
