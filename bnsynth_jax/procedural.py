"""Images of a random process, public by construction: the data of the data-free prior.

`--config.data.source=procedural` trains a teacher on them (configs/procedural_prior.py),
which DP mode then fine-tunes on the private images (privacy.prior): a prior that needs
no data at all, in the spirit of Baradad et al. 2021 (learning to see by looking at
noise) and DP-RandP (Tang et al. 2023).

Each class is a random glyph: 2 or 3 quadratic Bezier strokes, drawn once per class from
`data.procedural_seed`. Each image renders its class's glyph under a random affine
jitter (scale, rotation, shear, shift) and stroke width at 4x the image size, then
averages 4x4 blocks (as the 8x8 digits were made from 32x32 bitmaps), over a background
of random discs in colour ("dead leaves") when the images have 3 channels. Every image
is a function of (seed, split, index): the same command gives the same images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


SPLITS = {'train': 0, 'test': 1}
SUPERSAMPLE = 4
CURVE_POINTS = 24


def glyphs(num_classes: int, seed: int) -> np.ndarray:
  """[C, S=3, 3 control points, 2] quadratic Bezier strokes in [0.1, 0.9]^2 (a class of 2
  strokes repeats its first)."""
  out = np.zeros((num_classes, 3, 3, 2))
  for c in range(num_classes):
    rng = np.random.default_rng([seed, 1, c])
    strokes = rng.uniform(0.1, 0.9, (3, 3, 2))
    if rng.random() < 0.5:
      strokes[2] = strokes[0]
    out[c] = strokes
  return out


def _curve_points(strokes: np.ndarray) -> np.ndarray:
  t = np.linspace(0, 1, CURVE_POINTS)[:, None]
  p0, p1, p2 = strokes[:, 0, None], strokes[:, 1, None], strokes[:, 2, None]
  return ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2).reshape(-1, 2)


def _jitter(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  angle, shear = rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.2)
  scale = rng.uniform(0.8, 1.1, 2)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  a = rot @ np.array([[1, shear], [0, 1]]) * scale
  return (points - 0.5) @ a.T + 0.5 + rng.uniform(-0.08, 0.08, 2)


def _grid(size: int) -> np.ndarray:
  hi = size * SUPERSAMPLE
  ys, xs = np.meshgrid((np.arange(hi) + 0.5) / hi, (np.arange(hi) + 0.5) / hi, indexing='ij')
  return np.stack([xs.ravel(), ys.ravel()], 1)


def _downsample(canvas: np.ndarray, size: int) -> np.ndarray:
  return canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, -1).mean((1, 3))


LEAF_SPREAD = 0.2     # a disc's colour: the background's, each channel moved by up to this


def _dead_leaves(rng: np.random.Generator, grid: np.ndarray, channels: int) -> np.ndarray:
  """Random discs over a random colour, each disc's colour near the background's: texture
  and edges everywhere, but of lower contrast than the glyph (at full contrast a ResNet-20
  stays at chance on 64 classes for 10 epochs: the glyph is lost among the discs)."""
  base = rng.uniform(LEAF_SPREAD, 1 - LEAF_SPREAD, channels)
  canvas = np.tile(base, (len(grid), 1))
  for _ in range(rng.integers(5, 15)):
    centre, radius = rng.uniform(0, 1, 2), rng.uniform(0.05, 0.4)
    inside = np.sum((grid - centre) ** 2, 1) < radius ** 2
    canvas[inside] = base + rng.uniform(-LEAF_SPREAD, LEAF_SPREAD, channels)
  return canvas


def render(label: int, rng: np.random.Generator, templates: np.ndarray, size: int,
           channels: int) -> np.ndarray:
  """One uint8 [size, size, channels] image of class `label`."""
  grid = _grid(size)
  points = _jitter(_curve_points(templates[label]), rng)
  width = rng.uniform(0.07, 0.13)
  d2 = np.min(np.sum((grid[:, None] - points[None]) ** 2, -1), 1)
  ink = (d2 < width ** 2).astype(np.float64)[:, None]
  if channels == 1:
    canvas = ink * rng.uniform(0.7, 1.0)
  else:
    background = _dead_leaves(rng, grid, channels)
    colour = rng.uniform(0, 1, channels)     # at least 0.3 from the background's mean
    colour = np.where(np.abs(colour - background.mean(0)) < 0.3, 1 - colour, colour)
    canvas = background * (1 - ink) + colour * ink
  image = _downsample(canvas, size)
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def generate(split: str, indices: Sequence[int], *, num_classes: int, size: int, channels: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, size, size, channels], labels int32 [n]): example i of a split has
  label i % num_classes and its own random stream (seed, split, i)."""
  templates = glyphs(num_classes, seed)
  labels = np.asarray(indices, np.int64) % num_classes
  images = np.stack([render(int(y), np.random.default_rng([seed, 2, SPLITS[split], int(i)]),
                            templates, size, channels) for i, y in zip(indices, labels)])
  return images, labels.astype(np.int32)
