"""The on-disk synthetic dataset: format, loader, tf.data source, PNG export.

Format (WORKDIR/synthetic/, "bnsynth-synthetic-v1"):
  shards/shard-NNNNN.npz   one per synthesis batch, written atomically, reproducible bytes:
      images        uint8  [B, H, W, C]   de-normalised pixels
      labels        int32  [B]            target class
      loss          float32[B]            teacher cross-entropy on the released (uint8) image
      confidence    float32[B]            teacher probability of the target class
      soft_labels   float32[B, K]         teacher softmax at manifest['soft_label_temperature']
      view_soft_labels float16[B, E, K]   (if manifest['views']) teacher softmax of each image's
                                          crop+flip in each of E student epochs
      bn_loss_initial, bn_loss_final  float32 scalars (the batch's BN loss on noise / result)
  manifest.json            format, counts, classes, image shape, normalisation, teacher and
                           statistics sha256, the synthesis config, each shard's sha256.
                           Written last: its presence means the dataset is complete.
  samples.png              a grid of samples per class.
Timings live apart (timings.json, report.json) so that the dataset itself is
byte-identical however often the run was interrupted.

Command line: python -m bnsynth_jax.synthetic_data --synthetic_dir=W/synthetic \
                  --export_to=OUT
  the portable release: lossless PNG folder OUT/train/<class>/NNNNNN.png, OUT/views.npz
  (per image and student epoch: crop offsets, flip bit, soft label) and OUT/release.json;
  bnsynth_jax.views_np (NumPy only) documents them and replays the views in any framework.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
from typing import Any

import numpy as np

from bnsynth_jax import fileio, report
from bnsynth_jax.errors import UserError

FORMAT = 'bnsynth-synthetic-v1'
ARRAY_FIELDS = ('images', 'labels', 'loss', 'confidence', 'soft_labels')


def shard_path(directory, index: int):
  return fileio.path(directory) / 'shards' / f'shard-{index:05d}.npz'


def write_shard(directory, index: int, arrays: dict[str, np.ndarray]) -> str:
  return fileio.atomic_write_npz(shard_path(directory, index), **arrays)


def scan_shards(directory, num_shards: int) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
  """The shards' manifest entries (file, image count, sha256) and their arrays."""
  entries, arrays = [], []
  for i in range(num_shards):
    path = shard_path(directory, i)
    data = path.read_bytes()
    shard = fileio.read_npz_bytes(data)
    entries.append({'file': path.name, 'num_images': int(len(shard['labels'])),
                    'sha256': hashlib.sha256(data).hexdigest()})
    arrays.append(shard)
  return entries, arrays


def write_manifest(directory, shards: list[dict], **fields) -> dict[str, Any]:
  """Writes manifest.json, last: the dataset's format, its image count, the provenance
  `fields` (classes, image shape, normalisation, teacher and statistics sha256, views,
  synthesis config) and each shard's entry."""
  manifest = {'format': FORMAT, 'num_images': sum(s['num_images'] for s in shards), **fields,
              'shards': shards}
  fileio.atomic_write_json(fileio.path(directory) / 'manifest.json', manifest)
  return manifest


def write_samples(directory, num_shards: int, num_classes: int, per_class: int = 10) -> None:
  """samples.png: up to `per_class` images of each class from the first finished shards
  (rewritten as shards finish, so a long synthesis can be watched)."""
  images, labels = [], []
  for i in range(num_shards):
    shard = fileio.read_npz(shard_path(directory, i))
    images.append(shard['images'])
    labels.append(shard['labels'])
    if np.all(np.bincount(np.concatenate(labels), minlength=num_classes) >= per_class):
      break
  if images:
    report.write_class_grid(fileio.path(directory) / 'samples.png', np.concatenate(images),
                            np.concatenate(labels), num_classes, per_class=per_class)


@dataclasses.dataclass
class SyntheticDataset:
  images: np.ndarray          # uint8 [N, H, W, C]
  labels: np.ndarray          # int32 [N]
  soft_labels: np.ndarray     # float32 [N, K]
  loss: np.ndarray
  confidence: np.ndarray
  manifest: dict[str, Any]
  view_soft_labels: np.ndarray | None = None   # float16 [N, epochs, K] if relabelled

  def __len__(self):
    return len(self.labels)

  @property
  def class_names(self) -> list[str]:
    return self.manifest['class_names']


def read_manifest(directory) -> dict[str, Any]:
  """The manifest of a finished synthetic dataset (UserError if unfinished or foreign)."""
  directory = fileio.path(directory)
  manifest_path = directory / 'manifest.json'
  if not manifest_path.exists():
    raise UserError(f'{directory} holds no finished synthetic dataset (manifest.json is '
                    'missing): run or finish the synthesize stage first')
  manifest = fileio.read_json(manifest_path)
  if manifest.get('format') != FORMAT:
    raise UserError(f'{directory} has format {manifest.get("format")!r}, expected {FORMAT}')
  return manifest


def load_synthetic(directory) -> SyntheticDataset:
  """Reads a finished synthetic dataset into host arrays (checks shard hashes)."""
  directory = fileio.path(directory)
  manifest = read_manifest(directory)
  fields: dict[str, list[np.ndarray]] = {k: [] for k in ARRAY_FIELDS}
  views: list[np.ndarray] = []
  for shard in manifest['shards']:
    path = directory / 'shards' / shard['file']
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != shard['sha256']:
      raise UserError(f'{path} does not match the manifest (sha256): the dataset was altered or '
                      'half-copied; copy it again or re-run the synthesize stage')
    arrays = fileio.read_npz_bytes(data)
    for k in ARRAY_FIELDS:
      fields[k].append(arrays[k])
    if 'view_soft_labels' in arrays:
      views.append(arrays['view_soft_labels'])
  cat = {k: np.concatenate(v) for k, v in fields.items()}
  return SyntheticDataset(manifest=manifest, **cat,
                          view_soft_labels=np.concatenate(views) if views else None)


def as_tf_dataset(directory):
  """The dataset as a tf.data.Dataset of dicts (imports TensorFlow only here)."""
  import tensorflow as tf
  ds = load_synthetic(directory)
  return tf.data.Dataset.from_tensor_slices(
      {k: getattr(ds, k) for k in ('images', 'labels', 'soft_labels')})


def view_parameters(ds: SyntheticDataset) -> tuple[np.ndarray, np.ndarray]:
  """(crop_offsets int32 [N, E, 2], flips bool [N, E]) of the views the teacher labelled:
  augment.view_params for every image and student epoch (E = 0 without per-view labels)."""
  views = ds.manifest.get('views')
  n = len(ds)
  if not views or ds.view_soft_labels is None:
    return np.zeros((n, 0, 2), np.int32), np.zeros((n, 0), bool)
  import jax
  from bnsynth_jax import augment
  key, indices = jax.random.key(views['seed']), np.arange(n, dtype=np.int32)
  per_epoch = jax.vmap(lambda e: augment.view_params(key, e, indices, int(views['crop_padding']),
                                                     bool(views['flip'])))
  offsets, flips = per_epoch(np.arange(int(views['epochs']), dtype=np.int32))   # [E, N, ...]
  return (np.asarray(offsets, np.int32).transpose(1, 0, 2),
          np.asarray(flips, bool).transpose(1, 0))


def release_views(ds: SyntheticDataset, files: list[str]) -> dict[str, np.ndarray]:
  """The arrays of OUT/views.npz (documented in bnsynth_jax.views_np)."""
  views = ds.manifest.get('views') or {}
  offsets, flips = view_parameters(ds)
  k = int(ds.manifest['num_classes'])
  view_labels = (ds.view_soft_labels if offsets.shape[1]      # float16, as synthesised
                 else np.zeros((len(ds), 0, k), np.float16))
  return {'files': np.asarray(files, dtype=str), 'labels': ds.labels.astype(np.int32),
          'soft_labels': ds.soft_labels.astype(np.float32), 'crop_offsets': offsets,
          'flips': flips, 'view_soft_labels': view_labels,
          'crop_padding': np.int32(views.get('crop_padding', 0)),
          'temperature': np.float32(ds.manifest['soft_label_temperature']),
          'epochs': np.int32(offsets.shape[1]),
          'class_names': np.asarray(ds.class_names, dtype=str)}


def mixed_views_of(ds: SyntheticDataset, directory) -> dict[str, np.ndarray] | None:
  """The relabel stage's mixed views of the synthetic set in `directory` (WORKDIR/synthetic:
  they are WORKDIR/relabel/mixed_views.npz, with its finished manifest), or None where it was
  not run; refused if they were made for another set or by another teacher."""
  from bnsynth_jax import views_np
  folder = fileio.path(directory).parent / 'relabel'
  if not (folder / views_np.MIXED_FILE).exists() or not (folder / 'manifest.json').exists():
    return None
  record = fileio.read_json(folder / 'manifest.json')
  arrays = fileio.read_npz(folder / views_np.MIXED_FILE)
  if (len(arrays['partners']) != len(ds)
      or record.get('teacher_sha256') != ds.manifest.get('teacher_sha256')):
    raise UserError(f'{folder} holds mixed views of another synthetic set or teacher: rerun the '
                    'relabel stage (--stages=relabel --overwrite) or move that folder away')
  return {k: arrays[k] for k in views_np.MIXED_FIELDS}


def release_info(ds: SyntheticDataset, mixed: dict | None = None) -> dict[str, Any]:
  """OUT/release.json: what a consumer in any framework needs besides the arrays."""
  from bnsynth_jax import views_np
  m = ds.manifest
  views = m.get('views') or {}
  return {
      'format': views_np.RELEASE_FORMAT, 'num_images': len(ds), 'num_classes': m['num_classes'],
      'class_names': ds.class_names, 'image_shape': m['image_shape'],
      'mean': m['mean'], 'std': m['std'],
      'soft_label_temperature': m['soft_label_temperature'],
      'views': ({'epochs': views['epochs'], 'crop_padding': views['crop_padding'],
                 'flip': views['flip']} if views else None),
      'recipe': ('per-view labels: in epoch e (mod views.epochs) show image i as '
                 'views_np.apply_view(image_i, crop_offsets[i, e], flips[i, e], crop_padding), '
                 'normalised by (x / 255 - mean) / std, with target view_soft_labels[i, e] and '
                 'loss T^2 * cross_entropy(target, softmax(logits / T)), T = '
                 'soft_label_temperature; hard labels: labels'),
      'views_file': views_np.VIEWS_FILE,
      'fields': {'files': 'str [N]', 'labels': 'int32 [N]', 'soft_labels': 'float32 [N, K]',
                 'crop_offsets': 'int32 [N, E, 2] (top, left) in the zero-padded image',
                 'flips': 'bool [N, E] mirrored left-right after the crop',
                 'view_soft_labels': 'float16 [N, E, K]'},
      **({'mixed_views': {
          'epochs': int(mixed['epochs']),
          'recipe': ('mixed-view labels: in epoch e (mod mixed_epochs) show image i as '
                     'views_np.mixed_views(images, {f: views.npz["mixed_" + f]}, [i], e) (float '
                     'pixels 0-255), normalised by (x / 255 - mean) / std, with target '
                     'softmax(mixed_logits[i, e] / T) and loss T^2 * cross_entropy(target, '
                     'softmax(logits / T)); T is the consumer\'s choice (the package\'s student: '
                     'student.mixed_temperature, 4 by default)')}}
         if mixed is not None else {}),
      'privacy': m.get('privacy'),
      **({'privacy_protects': 'each record of the training split (replace-one adjacency); the '
                              'test split is not protected'} if m.get('privacy') else {}),
      'source': {k: m.get(k) for k in ('teacher_sha256', 'statistics_sha256') if k in m},
  }


def export_image_folder(directory, out_root, split: str = 'train') -> int:
  """Writes the portable release; returns the image count:
    OUT_ROOT/<split>/<class>/NNNNNN.png (lossless; NNNNNN = the image's index),
    OUT_ROOT/views.npz and OUT_ROOT/release.json (bnsynth_jax.views_np documents both).

  The folder is built under a temporary name and renamed into place last (views.npz and
  release.json are written atomically before), so an interrupted export leaves nothing
  half-written and can be run again. tfds.ImageFolder and torchvision's ImageFolder read it.
  """
  from PIL import Image
  from bnsynth_jax import views_np
  ds = load_synthetic(directory)
  out_root = fileio.path(out_root)
  final = out_root / split
  if final.exists():
    raise UserError(f'{final} exists already: choose another --export_to or remove it')
  tmp = out_root / f'.{split}.partial'
  if tmp.exists():
    shutil.rmtree(str(tmp))
  for name in ds.class_names:
    (tmp / name).mkdir(parents=True, exist_ok=True)
  files = []
  for i, (image, label) in enumerate(zip(ds.images, ds.labels)):
    arr = image[..., 0] if image.shape[-1] == 1 else image
    rel = f'{ds.class_names[label]}/{i:06d}.png'
    Image.fromarray(arr).save(str(tmp / rel))
    files.append(f'{split}/{rel}')
  mixed = mixed_views_of(ds, directory)
  fileio.atomic_write_npz(out_root / views_np.VIEWS_FILE, **release_views(ds, files),
                          **{f'mixed_{k}': v for k, v in (mixed or {}).items()})
  fileio.atomic_write_json(out_root / views_np.RELEASE_FILE, release_info(ds, mixed))
  tmp.rename(final)
  return len(ds)


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(description='Export a bnsynth synthetic dataset.')
  parser.add_argument('--synthetic_dir', required=True, help='WORKDIR/synthetic')
  parser.add_argument('--export_to', required=True,
                      help='output root: OUT/train/<class>/*.png, OUT/views.npz, OUT/release.json')
  args = parser.parse_args(argv)
  try:
    n = export_image_folder(args.synthetic_dir, args.export_to)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'exported {n} images to {args.export_to}/train/<class>/, with views.npz (per-view crop, '
        'flip and soft label per image and epoch) and release.json')
  return 0


if __name__ == '__main__':
  sys.exit(main())
