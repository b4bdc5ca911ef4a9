"""Scalars to TensorBoard and the log, and a progress line with rate and ETA.

clu's metric writers import TensorFlow; the stages must run without it, so
TensorBoard event files are written with tensorboardX (pure Python, a required
dependency), and scalars also go to the log. Only process 0 writes.
"""

from __future__ import annotations

import time
from typing import Mapping

import jax
from absl import logging


class Writer:
  """write_scalars(step, {name: value}) to TensorBoard and the log."""

  def __init__(self, logdir: str | None):
    self._tb = None
    if logdir and jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=str(logdir), flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float], log: bool = True) -> None:
    if jax.process_index() != 0:
      return
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, float(value), step)
    if log:
      text = ', '.join(f'{k}={float(v):.4g}' for k, v in scalars.items())
      logging.info('step %d: %s', step, text)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class _QuietLibraries:
  """Drops INFO/DEBUG records of orbax (it logs every save step by step)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  """Keeps the log readable: orbax's INFO chatter is filtered out (warnings stay)."""
  import logging as py_logging
  for handler in {logging.get_absl_handler(), *py_logging.getLogger().handlers}:
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
      handler.addFilter(_QuietLibraries())


def format_seconds(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


def progress(name: str, total: int, unit: str, every_seconds: float = 15.0):
  """update(done) logs "NAME: done/total (pct), rate UNIT/s, ETA" at most every
  `every_seconds` and at the end: for loops that take minutes outside training."""
  t0, last = time.perf_counter(), [0.0]

  def update(done: int) -> None:
    now = time.perf_counter()
    if now - last[0] < every_seconds and done < total:
      return
    last[0] = now
    rate = done / max(now - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0.0
    logging.info('%s: %d/%d (%.0f%%), %.1f %s/s, ETA %s', name, done, total,
                 100.0 * done / max(1, total), rate, unit, format_seconds(eta))
  return update


class Progress:
  """Rate and ETA over the steps done in this run (resumed steps are not timed)."""

  def __init__(self, name: str, total_steps: int, start_step: int, units_per_step: float,
               unit: str):
    self.name, self.total, self.start = name, total_steps, start_step
    self.units_per_step, self.unit = units_per_step, unit
    self._t0 = None
    self._s0 = start_step

  def first_step_done(self, step: int) -> None:
    """Start the clock after the first (compiling) step so rates are steady-state."""
    if self._t0 is None:
      self._t0, self._s0 = time.perf_counter(), step

  def rate(self, step: int) -> float:
    if self._t0 is None or step <= self._s0:
      return float('nan')
    return (step - self._s0) * self.units_per_step / (time.perf_counter() - self._t0)

  def line(self, step: int, extra: str = '') -> str:
    rate = self.rate(step)
    eta = ((self.total - step) * self.units_per_step / rate) if rate == rate and rate > 0 else 0
    pct = 100.0 * step / max(1, self.total)
    text = (f'{self.name}: step {step}/{self.total} ({pct:.0f}%), {rate:.1f} {self.unit}/s, '
            f'ETA {format_seconds(eta)}')
    return f'{text}, {extra}' if extra else text
