"""report.json (machine-readable, the design.md contract) and report.md (for people).

Every stage merges its keys into WORKDIR/report.json through `update`; the file
is rewritten atomically and only by process 0.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

from bnsynth_jax import fileio


def _merge(base: dict, new: Mapping[str, Any]) -> dict:
  for key, value in new.items():
    if isinstance(value, Mapping) and isinstance(base.get(key), dict):
      _merge(base[key], value)
    else:
      base[key] = dict(value) if isinstance(value, Mapping) else value
  return base


def load(workdir) -> dict:
  path = fileio.path(workdir) / 'report.json'
  return fileio.read_json(path) if path.exists() else {}


def update(workdir, values: Mapping[str, Any]) -> dict:
  """Deep-merges `values` into report.json and returns the whole report."""
  report = _merge(load(workdir), values)
  if jax.process_index() == 0:
    fileio.atomic_write_json(fileio.path(workdir) / 'report.json', report)
  return report


def remove_keys(workdir, top_level: list[str]) -> None:
  report = load(workdir)
  if any(k in report for k in top_level) and jax.process_index() == 0:
    for k in top_level:
      report.pop(k, None)
    fileio.atomic_write_json(fileio.path(workdir) / 'report.json', report)


def get(report: Mapping[str, Any], dotted: str, default=None):
  node: Any = report
  for part in dotted.split('.'):
    if not isinstance(node, Mapping) or part not in node:
      return default
    node = node[part]
  return node
