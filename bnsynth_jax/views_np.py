"""The portable release's view function and reader, in NumPy only (no JAX, no TensorFlow).

A release exported with `python -m bnsynth_jax.synthetic_data --export_to=OUT` holds

  OUT/train/<class>/NNNNNN.png   the images (lossless), NNNNNN = the image's index i
  OUT/views.npz                  per image i and student epoch e (see VIEWS_FIELDS):
      files            str     [N]        'train/<class>/NNNNNN.png' of image i
      labels           int32   [N]        the class each image was synthesised for
      soft_labels      float32 [N, K]     teacher softmax(logits / T) of the whole image
      crop_offsets     int32   [N, E, 2]  (top, left) of the view's H x W window in the image
                                          zero-padded by `crop_padding` pixels, each in [0, 2p]
      flips            bool    [N, E]     the view is mirrored left-right (after the crop)
      view_soft_labels float16 [N, E, K]  teacher softmax(logits / T) of that exact view
      crop_padding, temperature, epochs   int32 / float32 / int32 scalars
      class_names      str     [K]
  OUT/release.json               the same scalars, the normalisation (mean, std of [0, 1]
                                 pixels per channel) and provenance (the manifest's fields)

The recipe the package's own student follows with per-view labels: in epoch e (modulo E),
image i is shown as `apply_view(image_i, crop_offsets[i, e], flips[i, e], crop_padding)` with
target `view_soft_labels[i, e]`, and the loss is T^2 * cross-entropy(target,
softmax(logits / T)). Hard labels: `labels`, any augmentation. `apply_view` here equals the
package's JAX view function (bnsynth_jax.augment.apply_view_one) bit for bit, for uint8 or
float pixels.
"""

from __future__ import annotations

import json
import os

import numpy as np

VIEWS_FILE = 'views.npz'
RELEASE_FILE = 'release.json'
RELEASE_FORMAT = 'bnsynth-release-v1'
MIXED_FILE = 'mixed_views.npz'
# The relabel stage's mixed views (bnsynth_jax.relabel; in an export, views.npz holds them
# prefixed 'mixed_'): image i in student epoch e (modulo epochs) is mixed_views(images, mixed,
# [i], e), with target softmax(logits[i, e] / T).
MIXED_FIELDS = ('crop_offsets', 'flips', 'partners', 'boxes', 'lams', 'logits', 'crop_padding',
                'epochs')
VIEWS_FIELDS = ('files', 'labels', 'soft_labels', 'crop_offsets', 'flips', 'view_soft_labels',
                'crop_padding', 'temperature', 'epochs', 'class_names')


def apply_view(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
               crop_padding: int) -> np.ndarray:
  """The views of a batch: images [B, H, W, C] (or one [H, W, C] with offsets [2] and a
  scalar flip), offsets [B, 2] int, flips [B] bool -> same shape and dtype as images."""
  images = np.asarray(images)
  single = images.ndim == 3
  if single:
    images, offsets, flips = images[None], np.asarray(offsets)[None], np.asarray(flips)[None]
  b, h, w, _ = images.shape
  p = int(crop_padding)
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0))) if p else images
  offsets = np.asarray(offsets, np.int64).reshape(b, 2)
  flips = np.asarray(flips, bool).reshape(b)
  rows = offsets[:, :1] + np.arange(h)[None]                               # [B, H]
  cols = offsets[:, 1:] + np.where(flips[:, None], np.arange(w)[::-1], np.arange(w))  # [B, W]
  out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  return out[0] if single else out


def mixed_views(images: np.ndarray, mixed: dict[str, np.ndarray], indices,
                epoch: int) -> np.ndarray:
  """Float32 pixels [B, H, W, C] (0-255 scale) of images `indices` in student epoch `epoch`:
  each image's view (crop_offsets, flips), then its partner's view of the same epoch pasted
  in the box (top, left, height, width; CutMix) and blended with weight lams (Mixup: lam x own
  + (1 - lam) x partner's; 1 = none)."""
  images, idx = np.asarray(images), np.asarray(indices)
  e, p = int(epoch) % int(mixed['epochs']), int(mixed['crop_padding'])
  partner = mixed['partners'][idx, e]
  own = apply_view(images[idx], mixed['crop_offsets'][idx, e], mixed['flips'][idx, e], p)
  other = apply_view(images[partner], mixed['crop_offsets'][partner, e],
                     mixed['flips'][partner, e], p).astype(np.float32)
  _, h, w, _ = images.shape
  top, left, bh, bw = (mixed['boxes'][idx, e, k][:, None, None] for k in range(4))
  rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
  box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
  out = np.where(box[..., None], other, own.astype(np.float32))
  lam = mixed['lams'][idx, e].astype(np.float32)[:, None, None, None]
  blended = lam * out + (np.float32(1) - lam) * other
  return np.where(lam == 1, out, blended).astype(np.float32)


def load_views(root) -> dict[str, np.ndarray]:
  """OUT/views.npz as a dict of arrays (scalars as 0-d arrays)."""
  path = os.path.join(os.fspath(root), VIEWS_FILE)
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def load_release(root) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
  """(images uint8 [N, H, W, C] in index order, views.npz arrays, release.json) of an export.
  Reads the PNGs with Pillow."""
  from PIL import Image
  root = os.fspath(root)
  views = load_views(root)
  with open(os.path.join(root, RELEASE_FILE)) as f:
    release = json.load(f)
  images = []
  for name in views['files']:
    arr = np.asarray(Image.open(os.path.join(root, str(name))))
    images.append(arr[..., None] if arr.ndim == 2 else arr)
  return np.stack(images), views, release


def epoch_views(images: np.ndarray, views: dict[str, np.ndarray], epoch: int,
                indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(view images, soft targets) of `indices` (default all) in student epoch `epoch`."""
  e = int(epoch) % int(views['epochs'])
  idx = np.arange(len(images)) if indices is None else np.asarray(indices)
  x = apply_view(images[idx], views['crop_offsets'][idx, e], views['flips'][idx, e],
                 int(views['crop_padding']))
  return x, views['view_soft_labels'][idx, e]
