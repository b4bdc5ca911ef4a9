"""Normalisation and augmentation, on device: the one home of the view contract.

Students (train.py) see `random_crop_flip` views, or with per-view labels the exact
views `view_crop_flip(key, epoch, index)`; the synthesis stage labels those same
views with the teacher (synthesis.make_view_labeler), so both import them from here.
Synthesis augments its images with `augment` (jitter + flip, or random resized
crops) inside each step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_unit(images_u8: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]."""
  return images_u8.astype(jnp.float32) / 255.0


def normalise(images_u8: jax.Array, mean, std) -> jax.Array:
  """uint8 pixels -> the network's input (per-channel standardised)."""
  return (to_unit(images_u8) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def standardise(x01: jax.Array, mean, std) -> jax.Array:
  """[0, 1] pixels -> the network's input."""
  return (x01 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def view_params_one(key: jax.Array, crop_padding: int, flip: bool):
  """The random part of one crop + flip: (offset [2] int32, the crop's top-left corner in
  the zero-padded image, each in [0, 2p]; flip bool). Zero offset = p means no shift."""
  crop_key, flip_key = jax.random.split(key)
  if crop_padding:
    offset = jax.random.randint(crop_key, (2,), 0, 2 * crop_padding + 1)
  else:
    offset = jnp.zeros((2,), jnp.int32)
  do_flip = jax.random.bernoulli(flip_key) if flip else jnp.zeros((), bool)
  return offset.astype(jnp.int32), do_flip


def apply_view_one(img: jax.Array, offset: jax.Array, do_flip: jax.Array,
                   crop_padding: int) -> jax.Array:
  """Pads one [H, W, C] image by `crop_padding` zeros, takes the H x W window at `offset`,
  then mirrors it left-right if `do_flip`. bnsynth_jax.views_np.apply_view is the NumPy
  reference of this function (equal bit for bit)."""
  h, w, c = img.shape
  if crop_padding:
    p = crop_padding
    img = jax.lax.dynamic_slice(jnp.pad(img, ((p, p), (p, p), (0, 0))),
                                (offset[0], offset[1], 0), (h, w, c))
  return jnp.where(do_flip, img[:, ::-1, :], img)


def crop_flip_one(key: jax.Array, img: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
  """torchvision RandomCrop(padding=p, zero fill) + RandomHorizontalFlip of one [0,1] image."""
  offset, do_flip = view_params_one(key, crop_padding, flip)
  return apply_view_one(img, offset, do_flip, crop_padding)


def random_crop_flip(rng: jax.Array, x: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
  """Crop + flip of a batch, an independent key per example."""
  keys = jax.random.split(rng, x.shape[0])
  return jax.vmap(lambda k, img: crop_flip_one(k, img, crop_padding, flip))(keys, x)


def view_params(view_key: jax.Array, epoch, indices: jax.Array, crop_padding: int,
                flip: bool):
  """(offsets [B, 2] int32, flips [B] bool) of the views of examples `indices` in `epoch`:
  a pure function of (view_key, epoch, index). The portable export writes them out."""
  epoch_key = jax.random.fold_in(view_key, epoch)
  keys = jax.vmap(lambda i: jax.random.fold_in(epoch_key, i))(indices)
  return jax.vmap(lambda k: view_params_one(k, crop_padding, flip))(keys)


def view_crop_flip(view_key: jax.Array, epoch, indices: jax.Array, x: jax.Array,
                   crop_padding: int, flip: bool) -> jax.Array:
  """The crop + flip of example `indices[n]` in `epoch`: a pure function of those two.

  The synthesis stage labels these exact views with the teacher (per-view soft labels);
  the student replays them, so the teacher itself never has to be released.
  """
  offsets, flips = view_params(view_key, epoch, indices, crop_padding, flip)
  return jax.vmap(lambda img, o, f: apply_view_one(img, o, f, crop_padding))(x, offsets, flips)


def mix(rng: jax.Array, x: jax.Array, targets: jax.Array, mixup_alpha: float,
        cutmix_alpha: float):
  """Mixup or CutMix (one of them per batch, chosen at random when both are on)."""
  if not mixup_alpha and not cutmix_alpha:
    return x, targets
  choose_rng, lam_rng, perm_rng, box_rng = jax.random.split(rng, 4)
  perm = jax.random.permutation(perm_rng, x.shape[0])
  x2, t2 = x[perm], targets[perm]

  def do_mixup(_):
    lam = jax.random.beta(lam_rng, mixup_alpha, mixup_alpha)
    return lam * x + (1 - lam) * x2, lam * targets + (1 - lam) * t2

  def do_cutmix(_):
    _, h, w, _ = x.shape
    lam = jax.random.beta(lam_rng, cutmix_alpha, cutmix_alpha)
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
    cy = jax.random.randint(box_rng, (), 0, h)
    cx = jax.random.randint(jax.random.fold_in(box_rng, 1), (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
    lam_adj = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)
    return jnp.where(box, x2, x), lam_adj * targets + (1 - lam_adj) * t2

  if mixup_alpha and cutmix_alpha:
    use_cutmix = jax.random.bernoulli(choose_rng, 0.5)
    return jax.lax.cond(use_cutmix, do_cutmix, do_mixup, None)
  return do_mixup(None) if mixup_alpha else do_cutmix(None)


def jitter_flip(rng, x, jitter: int, flip: bool):
  """Per-image random roll by up to `jitter` pixels and random horizontal flip."""
  b = x.shape[0]
  k1, k2 = jax.random.split(rng)
  if jitter:
    shifts = jax.random.randint(k1, (b, 2), -jitter, jitter + 1)
    x = jax.vmap(lambda img, s: jnp.roll(img, (s[0], s[1]), axis=(0, 1)))(x, shifts)
  if flip:
    x = jnp.where(jax.random.bernoulli(k2, 0.5, (b, 1, 1, 1)), x[:, :, ::-1, :], x)
  return x


def random_resized_crop(rng, x, min_scale: float, flip: bool):
  """Per-image crop of area in [min_scale, 1] and aspect in [3/4, 4/3], resized back."""
  b, h, w, c = x.shape
  k_area, k_ratio, k_y, k_x, k_flip = jax.random.split(rng, 5)
  area = jax.random.uniform(k_area, (b,), minval=min_scale, maxval=1.0)
  ratio = jnp.exp(jax.random.uniform(k_ratio, (b,), minval=jnp.log(3 / 4), maxval=jnp.log(4 / 3)))
  ch = jnp.clip(jnp.sqrt(area / ratio) * h, 1.0, h)
  cw = jnp.clip(jnp.sqrt(area * ratio) * w, 1.0, w)
  y0 = jax.random.uniform(k_y, (b,)) * (h - ch)
  x0 = jax.random.uniform(k_x, (b,)) * (w - cw)
  scale = jnp.stack([h / ch, w / cw], -1)
  translation = -jnp.stack([y0, x0], -1) * scale
  out = jax.vmap(lambda img, s, t: jax.image.scale_and_translate(
      img, (h, w, c), (0, 1), s, t, method='linear', antialias=True))(x, scale, translation)
  if flip:
    out = jnp.where(jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1)), out[:, :, ::-1, :], out)
  return out


def augment(rng, x, cfg):
  if cfg.augment == 'jitter_flip':
    return jitter_flip(rng, x, cfg.jitter, cfg.flip)
  if cfg.augment == 'random_resized_crop':
    return random_resized_crop(rng, x, cfg.rrc_min_scale, cfg.flip)
  return x


def to_uint8(x, mean, std):
  """The network's input -> uint8 pixels (the inverse of normalise, rounded)."""
  pixels = x * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
  return jnp.round(jnp.clip(pixels, 0.0, 1.0) * 255.0).astype(jnp.uint8)
