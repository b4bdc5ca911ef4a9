"""report.json (machine-readable, the design.md contract) and report.md (for people).

Every stage merges its keys into WORKDIR/report.json through `update`; the file
is rewritten atomically and only by process 0.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

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


def image_grid(images: np.ndarray, rows: int, cols: int, pad: int = 1,
               scale: int = 1) -> np.ndarray:
  """[rows*cols, H, W, C] uint8 -> one uint8 picture (missing cells stay white)."""
  n, h, w, c = images.shape
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for k in range(min(n, rows * cols)):
    r, q = divmod(k, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + q * (w + pad):pad + q * (w + pad) + w] = images[k]
  if scale > 1:
    grid = grid.repeat(scale, 0).repeat(scale, 1)
  return grid


def write_png(target, picture: np.ndarray) -> None:
  import io
  from PIL import Image
  arr = picture[..., 0] if picture.shape[-1] == 1 else picture
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  fileio.atomic_write_bytes(target, buf.getvalue())


def write_class_grid(target, images: np.ndarray, labels: np.ndarray, num_classes: int,
                     per_class: int = 10) -> None:
  """One row per class, `per_class` samples each (the first ones of that class)."""
  h = images.shape[1]
  cells = np.full((num_classes * per_class, *images.shape[1:]), 255, np.uint8)
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)[:per_class]
    cells[c * per_class:c * per_class + len(idx)] = images[idx]
  scale = max(1, 64 // h)   # small images (8x8 digits) are enlarged to be visible
  write_png(target, image_grid(cells, num_classes, per_class, scale=scale))
