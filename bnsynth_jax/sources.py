"""The private data: its sources (bundled digits, image folders, TFDS) and `PrivateData`.

Every source yields uint8 images (N, H, W, C) and int32 labels for one split, in
this process's partitions (input_pipeline). Only the private stages (teacher,
stats, evaluate, audit), the pipeline and its preflight import this module; a test
checks that synthesize, student and the synthetic-data module cannot.

TensorFlow is imported only by the TFDS source (and hidden from GPUs there); the
digits and image-folder sources need only NumPy and Pillow.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Sequence

import numpy as np
from absl import logging

from bnsynth_jax import input_pipeline, metrics, parallel, procedural
from bnsynth_jax.errors import UserError
from bnsynth_jax.input_pipeline import Partition, partition_members


# Every extension the image-folder source lists; Pillow decodes them all.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.gif')
# Formats we recognise but do not decode, with how to convert them.
CONVERT_HINTS = {
    '.dcm': 'DICOM: convert each file to a 16-bit PNG first, e.g. with pydicom '
            '(pip install pydicom; Image.fromarray(ds.pixel_array.astype("uint16")).save(...)) '
            'or dcm2pnm / dcmj2pnm from DCMTK',
    '.nii': 'NIfTI volumes: export 2-D slices as 16-bit PNGs first (e.g. with nibabel)',
    '.gz': 'compressed files: unpack them first',
    '.heic': 'HEIC: convert to PNG or JPEG first (e.g. with pillow-heif or ImageMagick)',
    '.svg': 'SVG: render to PNG first (e.g. with cairosvg or rsvg-convert)',
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]          # (H, W, C)
  num_examples: dict[str, int]               # split -> count over all partitions
  # split -> images per class, where the source knows it without decoding (None: unknown)
  class_counts: dict[str, tuple[int, ...]] | None = None
  native_size: tuple[int, int] | None = None  # (W, H) of the first training image

  @property
  def num_classes(self) -> int:
    return len(self.class_names)



def _digits_arrays():
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  labels = digits.target.astype(np.int32)
  # Deterministic stratified 80/20 split (digits ships no split of its own).
  rng = np.random.RandomState(1234)
  test_idx = []
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    test_idx.extend(rng.choice(idx, size=round(0.2 * len(idx)), replace=False))
  is_test = np.zeros(len(labels), bool)
  is_test[test_idx] = True
  split = {'train': ~is_test, 'test': is_test}
  return images[..., None], labels, split


def _list_image_folder(root: str, split: str, class_names=None):
  """Returns (files, labels, class_names) for ROOT/<split>/<class>/*; raises UserError."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise UserError(
        f'image folder {root} has no {split!r} split directory (found: '
        f'{", ".join(present) or "nothing"}): lay it out as ROOT/{split}/<class>/*.png, '
        'or set --config.data.train_split / test_split')
  found = sorted(d for d in os.listdir(split_dir)
                 if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith('.'))
  if not found:
    raise UserError(f'{split_dir} holds no class folders: put the images of each class '
                    f'in {split_dir}/<class>/')
  if class_names is None:
    class_names = tuple(found)
  else:
    unknown = sorted(set(found) - set(class_names))
    if unknown:
      raise UserError(f'{split_dir} has classes not in the train split: {", ".join(unknown)}; '
                      'every split must use the train split\'s class folders')
  files, labels = [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      continue
    entries = sorted(f for f in os.listdir(class_dir) if not f.startswith('.')
                     and os.path.isfile(os.path.join(class_dir, f)))
    names = [f for f in entries if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
      others = sorted({os.path.splitext(f)[1].lower() or '(none)' for f in entries})
      hints = [CONVERT_HINTS[e] for e in others if e in CONVERT_HINTS]
      what = (f'only {", ".join(others)} files, ' if others else '')
      fix = hints[0] if hints else ('add images (' + ', '.join(f'*{e}' for e in IMAGE_EXTENSIONS)
                                    + ') or remove the folder')
      raise UserError(f'class folder {class_dir} has no images ({what}none of '
                      f'{" ".join(IMAGE_EXTENSIONS)}): {fix}')
    files.extend(os.path.join(class_dir, f) for f in names)
    labels.extend([label] * len(names))
  return files, np.asarray(labels, np.int32), tuple(class_names)


# Pillow modes that hold one channel; anything else is decoded as RGB.
GRAY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')
ALPHA_BACKGROUNDS = {'black': 0.0, 'white': 1.0}


def _to_unit_float(im, pixel_max: float) -> np.ndarray:
  """A high-bit-depth or float single-channel image as float32 (H, W) in [0, 1].

  Integer images are divided by `pixel_max` if given, else by their type's range
  (65535 for 16-bit data: scaled, never clipped to 255). 'I' (32-bit) images whose
  values fit 16 bits are 16-bit data. Float images in [0, 1] are kept; other float
  ranges need data.pixel_max (a per-image min-max would change intensities between
  images, which carry meaning in e.g. CT).
  """
  arr = np.asarray(im)
  if arr.dtype.kind == 'f':
    top = pixel_max or 1.0
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not pixel_max and (lo < 0 or hi > 1):
      raise ValueError(f'float pixels span [{lo:g}, {hi:g}], not [0, 1]: set '
                       '--config.data.pixel_max to the value that means white')
    return np.clip(np.nan_to_num(arr.astype(np.float32)) / top, 0, 1)
  arr = arr.astype(np.int64)
  if pixel_max:
    top = float(pixel_max)
  elif arr.min() >= 0 and arr.max() <= 65535:
    top = 65535.0
  else:
    raise ValueError(f'32-bit integer pixels span [{arr.min()}, {arr.max()}]: set '
                     '--config.data.pixel_max to the value that means white')
  return np.clip(arr / top, 0, 1).astype(np.float32)


def _decode_to_array(im, channels: int, alpha_background: float, pixel_max: float):
  """A Pillow image -> uint8 (H, W, C) or float32 (H, W, C) in [0, 1]; see _decode_image."""
  from PIL import ImageOps
  im = ImageOps.exif_transpose(im)            # camera JPEGs store rotation in EXIF
  if im.mode == 'P':
    im = im.convert('RGBA' if 'transparency' in im.info else 'RGB')
  elif im.mode == 'PA':
    im = im.convert('RGBA')
  if im.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
    gray = _to_unit_float(im, pixel_max)[..., None]
    return np.repeat(gray, 3, axis=-1) if channels == 3 else gray
  if im.mode in ('LA', 'La', 'RGBA', 'RGBa'):
    # Alpha is composited over a plain background (data.alpha_background).
    rgba = np.asarray(im.convert('RGBA'), np.float32) / 255.0
    alpha = rgba[..., 3:]
    rgb = rgba[..., :3] * alpha + alpha_background * (1.0 - alpha)
    if channels == 1:
      rgb = rgb @ np.asarray([0.299, 0.587, 0.114], np.float32)[:, None]  # ITU-R 601, as 'L'
    return (np.round(rgb * 255.0)).astype(np.uint8)
  im = im.convert('L' if channels == 1 else 'RGB')   # 1, L, RGB, CMYK, YCbCr, LAB, HSV
  arr = np.asarray(im, np.uint8)
  return arr[..., None] if channels == 1 else arr


def _resize_crop(arr: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic) and centre-crops: no distortion."""
  from PIL import Image
  h, w = arr.shape[:2]
  if (h, w) == (size, size):
    return arr
  scale = size / min(w, h)
  new = (max(size, round(w * scale)), max(size, round(h * scale)))
  left, top = (new[0] - size) // 2, (new[1] - size) // 2
  box = (left, top, left + size, top + size)
  if arr.dtype == np.uint8 and arr.shape[-1] in (1, 3):
    im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    out = np.asarray(im.resize(new, Image.BICUBIC).crop(box), np.uint8)
    return out[..., None] if out.ndim == 2 else out
  chans = [np.asarray(Image.fromarray(arr[..., c], 'F').resize(new, Image.BICUBIC).crop(box))
           for c in range(arr.shape[-1])]
  return np.stack(chans, -1)


def _decode_image(path: str, size: int, channels: int, alpha_background: float = 0.0,
                  pixel_max: float = 0.0) -> np.ndarray:
  """One file -> uint8 (size, size, channels).

  8-bit images keep their values; 16-bit and 32-bit integer images are scaled by their
  true range (see _to_unit_float) and float images read as [0, 1], then all are
  quantised to 8 bits once, after resizing. Palette images are expanded, alpha is
  composited over data.alpha_background, CMYK is converted to RGB, EXIF rotation is
  applied, and a GIF or multi-page TIFF gives its first frame.
  """
  from PIL import Image
  try:
    with Image.open(path) as im:
      im.load()
      arr = _resize_crop(_decode_to_array(im, channels, alpha_background, pixel_max), size)
  except (OSError, ValueError, SyntaxError) as e:
    raise UserError(f'cannot decode image {path} ({type(e).__name__}: {e}): remove or '
                    'replace the file') from None
  if arr.dtype != np.uint8:
    arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
  return arr


def _probe_image(path: str):
  from PIL import Image
  try:
    with Image.open(path) as im:
      return im.size, im.mode
  except (OSError, ValueError, SyntaxError) as e:
    raise UserError(f'cannot decode image {path} ({type(e).__name__}: {e}): remove or '
                    'replace the file') from None


class Source:
  """Interface: info(), and load(split, partition_ids, num_partitions)."""

  def info(self) -> DatasetInfo:
    raise NotImplementedError

  def load(self, split: str, partition_ids: Sequence[int],
           num_partitions: int) -> list[Partition]:
    raise NotImplementedError


class DigitsSource(Source):
  """scikit-learn's bundled 8x8 digits: 1,797 real images, no download."""

  def __init__(self, data_config):
    self._config = data_config
    self._images, self._labels, self._split = _digits_arrays()

  def _split_mask(self, split):
    if split not in self._split:
      raise UserError(f'digits has splits train and test, not {split!r}')
    return self._split[split]

  def info(self):
    return DatasetInfo(tuple(str(i) for i in range(10)), (8, 8, 1),
                       {s: int(m.sum()) for s, m in self._split.items()},
                       {s: tuple(np.bincount(self._labels[m], minlength=10).tolist())
                        for s, m in self._split.items()}, (8, 8))

  def load(self, split, partition_ids, num_partitions):
    mask = self._split_mask(split)
    images, labels = self._images[mask], self._labels[mask]
    return [Partition(p, images[idx], labels[idx]) for p in partition_ids
            for idx in [partition_members(len(labels), num_partitions, p)]]


class ImageFolderSource(Source):
  """ROOT/<split>/<class>/*.{png,jpg,jpeg,bmp,tif,tiff,webp,gif}; any classes and modes."""

  def __init__(self, data_config):
    root = data_config.root
    if not root:
      raise UserError('data.root is empty: set --config.data.root=/path/to/ROOT with images '
                      'in ROOT/<split>/<class>/')
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
      raise UserError(f'image folder {root} does not exist: set --config.data.root to a folder '
                      'laid out as ROOT/<split>/<class>/*.png')
    if not any(os.scandir(root)):
      raise UserError(f'image folder {root} is empty: lay it out as ROOT/<split>/<class>/*.png')
    background = data_config.get('alpha_background', 'black')
    if background not in ALPHA_BACKGROUNDS:
      raise UserError(f'unknown data.alpha_background {background!r}: use black or white')
    self._background = ALPHA_BACKGROUNDS[background]
    self._pixel_max = float(data_config.get('pixel_max', 0.0) or 0.0)
    if self._pixel_max < 0:
      raise UserError(f'data.pixel_max={self._pixel_max} is negative: set it to the value that '
                      'means white (0 = the file type\'s range)')
    self._root = root
    self._config = data_config
    self._listing = {}
    train_files, train_labels, class_names = self._list(data_config.train_split)
    self._class_names = class_names
    # The first image of each class: its size, and whether any class is in colour.
    firsts = [train_files[int(np.argmax(train_labels == c))]
              for c in range(len(class_names)) if np.any(train_labels == c)]
    probes = [_probe_image(f) for f in firsts]
    self._native = probes[0][0]
    self._size = int(data_config.image_size) or min(self._native)
    channels = int(data_config.get('channels', 0) or 0)
    if not channels:
      channels = 1 if all(mode in GRAY_MODES for _, mode in probes) else 3
    self._channels = channels
    self._threads = int(data_config.get('decode_threads', 0) or min(16, os.cpu_count() or 1))

  def _list(self, split):
    if split not in self._listing:
      class_names = None if not self._listing else self._class_names
      self._listing[split] = _list_image_folder(self._root, split, class_names)
    return self._listing[split]

  def info(self):
    splits = (self._config.train_split, self._config.test_split)
    counts = {s: tuple(np.bincount(self._list(s)[1], minlength=len(self._class_names)).tolist())
              for s in splits}
    return DatasetInfo(self._class_names, (self._size, self._size, self._channels),
                       {s: len(self._list(s)[0]) for s in splits}, counts, self._native)

  def load(self, split, partition_ids, num_partitions):
    files, labels, _ = self._list(split)
    parts = []
    decode = lambda i: _decode_image(files[i], self._size, self._channels, self._background,
                                     self._pixel_max)
    with concurrent.futures.ThreadPoolExecutor(self._threads) as pool:
      for p in partition_ids:
        idx = partition_members(len(files), num_partitions, p)
        tick = metrics.progress(f'decoding {split} images (partition {p})', len(idx), 'img')
        images = []
        for image in pool.map(decode, idx, chunksize=64):
          images.append(image)
          tick(len(images))
        shape = (0, self._size, self._size, self._channels)
        parts.append(Partition(p, np.stack(images) if images else np.zeros(shape, np.uint8),
                               labels[idx]))
    return parts


class TfdsSource(Source):
  """A named, prepared TFDS dataset (cifar10, cifar100, svhn_cropped, ...)."""

  def __init__(self, data_config, builder=None):
    try:
      import tensorflow as tf
      import tensorflow_datasets as tfds
    except ImportError:
      raise UserError('data.source=tfds needs tensorflow and tensorflow-datasets: pip install '
                      'tensorflow-cpu tensorflow-datasets, or use data.source=imagefolder') from None
    tf.config.set_visible_devices([], 'GPU')  # tf.data only: keep the GPUs for JAX
    self._tf, self._tfds = tf, tfds
    self._config = data_config
    data_dir = os.path.expanduser(data_config.data_dir) if data_config.data_dir else None
    if builder is not None:     # tests pass a tfds.ImageFolder builder
      self._builder = builder
    else:
      try:
        self._builder = tfds.builder(data_config.name, data_dir=data_dir)
      except Exception as e:  # tfds raises several types for unknown names
        raise UserError(f'unknown TFDS dataset {data_config.name!r} ({e}): set '
                        '--config.data.name') from None
    if builder is None and not self._builder.is_prepared():
      raise UserError(
          f'TFDS dataset {data_config.name} is not prepared in {self._builder.data_dir}: run '
          f'`tfds build {data_config.name} --data_dir=DIR` on a machine with network and set '
          '--config.data.data_dir=DIR, or use data.source=imagefolder')
    features = self._builder.info.features
    self._class_names = tuple(features['label'].names)
    h, w, c = features['image'].shape
    self._size = int(data_config.image_size) or (h if h == w else 0)
    if not self._size:
      raise UserError(f'TFDS dataset {data_config.name} has images of size {h}x{w}: set '
                      '--config.data.image_size to the square size to train at')
    self._channels = int(data_config.get('channels', 0) or 0) or c or 3

  def info(self):
    splits = {s: self._builder.info.splits[s].num_examples
              for s in (self._config.train_split, self._config.test_split)}
    return DatasetInfo(self._class_names, (self._size, self._size, self._channels), splits)

  def load(self, split, partition_ids, num_partitions):
    tf = self._tf
    n = self._builder.info.splits[split].num_examples
    ds = self._builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    size, channels = self._size, self._channels

    def prep(image, label):
      if image.shape[-1] != channels:
        image = (tf.image.rgb_to_grayscale(image) if channels == 1
                 else tf.image.grayscale_to_rgb(image))
      image = tf.image.resize(image, (size, size), antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      return image, tf.cast(label, tf.int32)

    members = {p: partition_members(n, num_partitions, p) for p in partition_ids}
    wanted = np.full(n, -1, np.int64)
    for p, idx in members.items():
      wanted[idx] = p
    images = np.zeros((n, size, size, channels), np.uint8)
    labels = np.zeros((n,), np.int32)
    ds = ds.enumerate().filter(lambda i, ex: tf.gather(wanted, i) >= 0)
    ds = ds.map(lambda i, ex: (i, *prep(*ex)), num_parallel_calls=tf.data.AUTOTUNE)
    for i, image, label in self._tfds.as_numpy(ds.batch(1024)):
      images[i], labels[i] = image, label
    return [Partition(p, images[idx], labels[idx]) for p, idx in members.items()]


class ProceduralSource(Source):
  """data.source=procedural, generated images (bnsynth_jax/procedural.py; public by
  construction): data.procedural_classes classes, data.procedural_per_class training images
  per class (a tenth of that for test), data.image_size x data.channels."""

  def __init__(self, data_config):
    self._classes = int(data_config.get('procedural_classes', 0) or 0)
    self._per_class = int(data_config.get('procedural_per_class', 0) or 0)
    self._size = int(data_config.get('image_size', 0) or 0)
    self._channels = int(data_config.get('channels', 0) or 0)
    self._seed = int(data_config.get('procedural_seed', 0) or 0)
    if min(self._classes, self._per_class, self._size, self._channels) < 1 or self._size % 2:
      raise UserError('data.source=procedural needs data.procedural_classes, '
                      'data.procedural_per_class, data.channels and an even data.image_size '
                      '(e.g. configs/procedural_prior.py)')
    sizes = {'train': self._classes * self._per_class,
             'test': self._classes * max(1, self._per_class // 10)}
    self._info = DatasetInfo(tuple(f'glyph{c}' for c in range(self._classes)),
                             (self._size, self._size, self._channels), sizes,
                             {s: tuple([n // self._classes] * self._classes)
                              for s, n in sizes.items()}, (self._size, self._size))

  def info(self):
    return self._info

  def load(self, split, partition_ids, num_partitions):
    if split not in procedural.SPLITS:
      raise UserError(f'data.source=procedural has splits train and test, not {split!r}')
    n = self._info.num_examples[split]
    out = []
    for p in partition_ids:
      idx = partition_members(n, num_partitions, p)
      images, labels = procedural.generate(split, idx, num_classes=self._classes, size=self._size,
                                           channels=self._channels, seed=self._seed)
      out.append(Partition(p, images, labels))
    return out


def create_source(data_config) -> Source:
  kind = data_config.source
  if kind == 'digits':
    return DigitsSource(data_config)
  if kind == 'imagefolder':
    return ImageFolderSource(data_config)
  if kind == 'tfds':
    return TfdsSource(data_config)
  if kind == 'procedural':
    return ProceduralSource(data_config)
  raise UserError(f'unknown data.source {kind!r}: use digits, imagefolder, tfds or procedural')


# ----------------------------------------------------------------------------
# The handle the private stages get


class PrivateData:
  """The private dataset, loaded lazily and once per run, this process's partitions."""

  def __init__(self, data_config):
    self.config = data_config
    self._source = None
    self._splits: dict[tuple, list[Partition]] = {}
    self._info = None
    self.num_partitions, self.partition_ids = input_pipeline.local_partitions(data_config)

  def reset(self) -> None:
    """Forgets the source (after preflight changed the data config it was made from)."""
    self._source, self._info, self._splits = None, None, {}

  @property
  def source(self) -> Source:
    if self._source is None:
      self._source = create_source(self.config)
    return self._source

  @property
  def info(self) -> DatasetInfo:
    if self._info is None:
      self._info = self.source.info()
    return self._info

  def split(self, which: str) -> list[Partition]:
    """`which` is 'train' or 'test' (mapped to data.train_split / test_split)."""
    return self._load(which, self.partition_ids)

  def whole_split(self, which: str) -> list[Partition]:
    """Every partition of the split, on every process (DP-SGD samples from the whole split:
    privacy.WholeSplitBatches)."""
    return self._load(which, list(range(self.num_partitions)))

  def _load(self, which: str, partition_ids: list[int]) -> list[Partition]:
    """The split's partitions `partition_ids`, loaded once per run."""
    name = self.config.train_split if which == 'train' else self.config.test_split
    key = (name, tuple(partition_ids))
    if key not in self._splits:
      t0 = time.perf_counter()
      self._splits[key] = self.source.load(name, partition_ids, self.num_partitions)
      n = sum(len(p) for p in self._splits[key])
      logging.info('loaded %d %s images (%d of %d partitions) in %.1fs', n, name,
                   len(partition_ids), self.num_partitions, time.perf_counter() - t0)
    return self._splits[key]

  def split_size(self, which: str) -> int:
    name = self.config.train_split if which == 'train' else self.config.test_split
    return self.info.num_examples[name]

  def normalisation(self) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of pixel values in [0, 1]: from the config, else the train split."""
    c = self.info.image_shape[-1]
    if self.config.mean or self.config.std:
      mean, std = list(map(float, self.config.mean)), list(map(float, self.config.std))
      if len(mean) != c or len(std) != c or min(std) <= 0:
        raise UserError(f'data.mean/data.std must each hold {c} values (std > 0), got '
                        f'{tuple(mean)} / {tuple(std)}')
      return mean, std
    sums = parallel.sum_across_processes(input_pipeline.channel_sums(self.split('train')))
    mean, std = input_pipeline.moments_from_sums(sums)
    return mean.tolist(), std.tolist()
