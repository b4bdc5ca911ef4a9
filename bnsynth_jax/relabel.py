"""The relabel stage: the teacher labels each student epoch's *mixed* view of every image.

The relabelling of SRe2L / G-VBSM / CV-DD / EDC: in student epoch e, image i is shown as its
own crop + flip view with a box of a partner image's view pasted in (CutMix) or blended with it
(Mixup), and the target is the teacher's logits on exactly that mixed image, not a mix of two
labels. The mix parameters are drawn first, in NumPy, from (seed, N, epochs) alone; the
mixed images are built by bnsynth_jax.views_np.mixed_views, which the student (train.py via
MixedViewBatches), the portable export and any other framework call, so the teacher labels the
pixels the student sees, bit for bit.

WORKDIR/relabel/ (public: a function of the released images and the teacher):
  logits/epoch_NNNN.npz   the teacher's logits of epoch e's mixed views (resume unit)
  mixed_views.npz         views_np.MIXED_FIELDS: the parameters and logits float16 [N, E, K]
  manifest.json           written last: the settings, seconds, forward passes

relabel.bn = 'batch' labels with the teacher's BatchNorm on the statistics of each labelling
batch (a fixed random batch of the epoch's images, recorded by its seed), 'running' with its
running statistics (inference mode).
"""

from __future__ import annotations

import hashlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bnsynth_jax import (artifacts, augment, fileio, metrics, parallel, report, synthesis,
                         synthetic_data, views_np)
from bnsynth_jax.errors import UserError
from bnsynth_jax.workdir import stage_dir, teacher_dir

MIXES = ('cutmix', 'mixup', 'both', 'none')
BN_MODES = ('running', 'batch')


def enabled(config) -> bool:
  return int(config.relabel.epochs) > 0


def validate(config) -> None:
  cfg = config.relabel
  if cfg.mix not in MIXES:
    raise UserError(f"unknown relabel.mix {cfg.mix!r}: use one of {', '.join(MIXES)}")
  if cfg.bn not in BN_MODES:
    raise UserError(f"unknown relabel.bn {cfg.bn!r}: use running or batch")
  if (cfg.epochs < 0 or cfg.batch_size < 1 or not 0.0 <= cfg.mix_prob <= 1.0
      or cfg.mix_alpha <= 0 or cfg.crop_padding < 0):
    raise UserError(f'relabel.epochs={cfg.epochs}, batch_size={cfg.batch_size}, mix_prob='
                    f'{cfg.mix_prob}, mix_alpha={cfg.mix_alpha}, crop_padding={cfg.crop_padding}: '
                    'use epochs >= 0, batch_size >= 1, mix_prob in [0, 1], mix_alpha > 0 and '
                    'crop_padding >= 0')


def input_fingerprints(config, workdir) -> dict:
  """The teacher and the synthetic set the labels are made from (in the stage config): a
  finished relabelling is not reused for another teacher or another set."""
  out = {'teacher_sha256': synthesis.input_fingerprints(config, workdir).get('teacher_sha256')}
  synthetic = stage_dir(workdir, 'synthesize') / 'manifest.json'
  if synthetic.exists():
    out['synthetic_manifest_sha256'] = hashlib.sha256(synthetic.read_bytes()).hexdigest()
  return {k: v for k, v in out.items() if v is not None}


def relabel_seed(config) -> int:
  return int(config.seed) + 2_000_003


def _cutmix_boxes(rng, n: int, epochs: int, h: int, w: int, lam: np.ndarray) -> np.ndarray:
  """CutMix boxes (top, left, height, width) [N, E, 4] of area about (1 - lam) H W, clipped."""
  cut = np.sqrt(1.0 - lam)
  ch, cw = (cut * h).astype(np.int64), (cut * w).astype(np.int64)
  cy, cx = rng.integers(0, h, (n, epochs)), rng.integers(0, w, (n, epochs))
  y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
  x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
  return np.stack([y0, x0, y1 - y0, x1 - x0], -1).astype(np.int32)


def mix_parameters(cfg, n: int, image_hw, seed: int) -> dict[str, np.ndarray]:
  """The views_np.mixed_views parameters of every image and epoch, from (seed, n) alone."""
  e, (h, w), p = int(cfg.epochs), image_hw, int(cfg.crop_padding)
  rng = np.random.default_rng([seed, n, e])
  offsets = rng.integers(0, 2 * p + 1, (n, e, 2)).astype(np.int32)
  flips = (rng.random((n, e)) < 0.5) & bool(cfg.flip)
  partners = np.stack([rng.permutation(n) for _ in range(e)], 1).astype(np.int32)
  lam = rng.beta(cfg.mix_alpha, cfg.mix_alpha, (n, e))
  mixed = rng.random((n, e)) < cfg.mix_prob
  use_cutmix = {'cutmix': np.ones((n, e), bool), 'mixup': np.zeros((n, e), bool),
                'both': rng.random((n, e)) < 0.5, 'none': np.zeros((n, e), bool)}[cfg.mix]
  boxes = _cutmix_boxes(rng, n, e, h, w, lam) * (mixed & use_cutmix)[..., None]
  blend = mixed & ~use_cutmix & (cfg.mix != 'none')
  lams = np.where(blend, lam, 1.0).astype(np.float32)
  return {'crop_offsets': offsets, 'flips': flips, 'partners': partners, 'boxes': boxes,
          'lams': lams, 'crop_padding': np.int32(p), 'epochs': np.int32(e),
          'label_order_seed': np.int64(seed)}


def label_batches(n: int, epoch: int, batch_size: int, seed: int) -> list[np.ndarray]:
  """The labelling batches of epoch `epoch` (a fixed random partition of the images): with
  relabel.bn=batch each view is labelled with its batch's statistics."""
  order = np.random.default_rng([seed, epoch, 1]).permutation(n)
  return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def make_labeler(model, mean, std, bn: str, mesh):
  """labeler(pixels float32 [B, H, W, C] in [0, 255], teacher variables) -> logits [B, K]."""
  def labeler(pixels, variables):
    x = augment.standardise(pixels / 255.0, mean, std)
    if bn == 'batch':
      logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    else:
      logits = model.apply(variables, x, train=False)
    return logits.astype(jnp.float32)
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(labeler, in_shardings=(data, repl), out_shardings=data)


def _label_epoch(images, mix, epoch, batch_size, seed, labeler, variables, mesh, bn):
  """The teacher's logits [N, K] of epoch `epoch`'s mixed views, float16."""
  n, out = len(images), None
  for idx in label_batches(n, epoch, batch_size, seed):
    pixels = views_np.mixed_views(images, mix, idx, epoch)
    b = len(idx)
    padded = -(-b // mesh.size) * mesh.size
    if padded != b and bn == 'batch':   # precheck refuses this first; never pad then
      raise UserError(f'relabel.bn=batch: a labelling batch of {b} views does not split over '
                      f'the {mesh.size} devices; choose relabel.batch_size accordingly')
    if padded != b:   # inference-mode BN: the padding changes no row
      pixels = np.concatenate([pixels, np.repeat(pixels[-1:], padded - b, 0)])
    per = padded // jax.process_count()
    local = pixels[jax.process_index() * per:(jax.process_index() + 1) * per]
    logits = parallel.to_host(labeler(parallel.to_global(mesh, local), variables))[:b]
    if out is None:
      out = np.zeros((n, logits.shape[1]), np.float16)
    out[idx] = logits.astype(np.float16)
  return out


def precheck(config, workdir, stage_config: dict) -> None:
  """With bn=batch every labelling batch is whole and splits evenly over the devices; refused
  before the stage records anything."""
  cfg = config.relabel
  if not enabled(config) or cfg.bn != 'batch':
    return
  n = synthetic_data.read_manifest(stage_dir(workdir, 'synthesize'))['num_images']
  devices = parallel.make_mesh().size
  if n % cfg.batch_size or cfg.batch_size % devices:
    raise UserError(f'relabel.bn=batch labels views with their batch\'s statistics: '
                    f'relabel.batch_size={cfg.batch_size} must divide the {n} images and be a '
                    f'multiple of the {devices} devices')


def generate(config, workdir) -> dict:
  """Labels every epoch (resuming from the finished ones) and writes mixed_views.npz."""
  cfg = config.relabel
  out = stage_dir(workdir, 'relabel')
  ds = synthetic_data.load_synthetic(stage_dir(workdir, 'synthesize'))
  teacher_folder = teacher_dir(config, workdir)
  model, variables, teacher = artifacts.load_model(teacher_folder, dtype='float32')
  if ds.manifest.get('teacher_sha256') not in (None, teacher['variables_sha256']):
    raise UserError(f'{teacher_folder} is not the teacher that synthesised these images (sha256 '
                    f'{teacher["variables_sha256"][:12]} != {ds.manifest["teacher_sha256"][:12]}): '
                    'point synthesis.teacher_dir at that teacher')
  mesh = parallel.make_mesh()
  seed = relabel_seed(config)
  mix = mix_parameters(cfg, len(ds), ds.images.shape[1:3], seed)
  labeler = make_labeler(model, tuple(teacher['mean']), tuple(teacher['std']), cfg.bn, mesh)
  variables = parallel.replicate(mesh, variables)
  progress = metrics.Progress('relabel', int(cfg.epochs), 0, len(ds), 'views')
  paths = [out / 'logits' / f'epoch_{e:04d}.npz' for e in range(int(cfg.epochs))]
  # Process 0 decides what is done (hosts may see the filesystem at different times).
  done = set(parallel.broadcast_from_main([e for e, p in enumerate(paths) if p.exists()]))
  per_epoch, seconds = [], 0.0
  for e, path in enumerate(paths):
    if e in done:
      stored = fileio.read_npz(path)
      per_epoch.append(stored['logits'])
      seconds += float(stored['seconds'])
      continue
    t0 = time.perf_counter()
    logits = _label_epoch(ds.images, mix, e, int(cfg.batch_size), seed, labeler, variables,
                          mesh, cfg.bn)
    seconds += time.perf_counter() - t0
    if parallel.is_main_process():
      fileio.atomic_write_npz(path, logits=logits, seconds=np.float64(time.perf_counter() - t0))
    per_epoch.append(logits)
    progress.first_step_done(e + 1)   # the first labelled epoch compiled: rates from here
    if e == 0 or (e + 1) % 10 == 0 or e + 1 == cfg.epochs:
      logging.info(progress.line(e + 1, f'{len(ds) * (e + 1)} mixed views labelled'))
  mix['logits'] = np.stack(per_epoch, 1)
  if parallel.is_main_process():
    fileio.atomic_write_npz(out / views_np.MIXED_FILE, **mix)
  agreement = float(np.mean(np.argmax(mix['logits'], -1) == ds.labels[:, None]))
  return {'epochs': int(cfg.epochs), 'mix': cfg.mix, 'mix_alpha': float(cfg.mix_alpha),
          'mix_prob': float(cfg.mix_prob), 'bn': cfg.bn, 'num_images': len(ds),
          'forward_passes': len(ds) * int(cfg.epochs), 'label_seconds': seconds,
          'teacher_agreement_mixed': agreement, 'seed': seed,
          'teacher_sha256': teacher.get('variables_sha256')}


def load_mixed(workdir) -> dict[str, np.ndarray]:
  """WORKDIR/relabel/mixed_views.npz (views_np.MIXED_FIELDS)."""
  path = stage_dir(workdir, 'relabel') / views_np.MIXED_FILE
  if not path.exists():
    raise UserError(f'{path} is missing: run the relabel stage (--stages=relabel) with '
                    'relabel.epochs > 0')
  return fileio.read_npz(path)


def run(config, workdir) -> dict:
  if not enabled(config):
    values = {'epochs': 0}
  else:
    values = generate(config, workdir)
    print(f"relabel: {values['forward_passes']} mixed views labelled ({values['mix']}, "
          f"BN {values['bn']}) in {values['label_seconds']:.1f}s, teacher agrees with the "
          f"image's class on {values['teacher_agreement_mixed']:.3f} of them", flush=True)
  if parallel.is_main_process():
    fileio.atomic_write_json(stage_dir(workdir, 'relabel') / 'manifest.json', values)
  report.update(workdir, {'relabel': values})
  return values

