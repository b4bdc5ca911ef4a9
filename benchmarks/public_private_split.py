"""A public set that cannot contain the private images: some classes public, the rest private.

  python benchmarks/public_private_split.py --audit=/work/runs/canary/cifar_dp8 \
      --public=airplane,automobile,ship,truck --public_per_class=1000 --out=/work/runs/pubsplit

Reads a canary audit's plan (`python -m bnsynth_jax.canary` wrote AUDIT/canaries.npz: the
base set's indices in the train split and the canaries' sources) and writes two image folders:

  OUT/private/{train,test}: the audit's base set (the private data of the DP rows), only the
      classes not named public; its test split, the same classes.
  OUT/public/{train,test}: the named classes, drawn from the train images the audit left out
      of its base set and of its canaries (so no private image and no canary can be in it),
      --public_per_class of each; the test split, the same classes.

A teacher trained on OUT/public (no DP: it is public) then serves as `privacy.prior` for a DP
run on OUT/private: a prior trained on other classes of images from the same source, a
stated public set disjoint from the private one by construction (checked: --config must name
the data the audit drew from, and the script fails if any public image equals, byte for byte,
one of the images the audit wrote to AUDIT/base/train or one of its canaries).
"""

from __future__ import annotations

import pathlib
import shutil
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bnsynth_jax import canary_audit, fileio  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run, so importing the module defines none)."""
  flags.DEFINE_string('audit', None, 'A canary audit folder (its canaries.npz and plan).')
  config_flags.DEFINE_config_file('config', 'configs/cifar10.py:cpu_dp', 'The config whose train '
                                  'split the audit drew from (its data section is read).')
  flags.DEFINE_list('public', ['airplane', 'automobile', 'ship', 'truck'], 'Public classes.')
  flags.DEFINE_integer('public_per_class', 1000, 'Public train images per class.')
  flags.DEFINE_integer('seed', 0, 'Seed of the public draw.')
  flags.DEFINE_string('out', None, 'Output folder (must not exist).')
  flags.mark_flags_as_required(['audit', 'out'])


def public_indices(labels, excluded, public_labels, per_class: int, seed: int) -> np.ndarray:
  """per_class train indices of each public class, none of them in `excluded`."""
  allowed = np.ones(len(labels), bool)
  allowed[excluded] = False
  rng = np.random.default_rng(seed)
  chosen = []
  for y in public_labels:
    pool = np.flatnonzero(allowed & (labels == y))
    if len(pool) < per_class:
      raise SystemExit(f'error: class {y} has {len(pool)} images outside the private set; '
                       f'lower --public_per_class')
    chosen.append(np.sort(rng.choice(pool, per_class, replace=False)))
  return np.concatenate(chosen)


def check_same_data(config_data, plan: dict) -> None:
  """The config must name the data the audit drew from: its indices mean nothing elsewhere."""
  used = plan['settings']['data']
  norm = lambda k, v: fileio.path(v).as_posix() if k == 'root' and v else str(v)
  given = {k: norm(k, config_data.get(k, '')) for k in used}
  if given != {k: norm(k, v) for k, v in used.items()}:
    raise SystemExit(f'error: --config reads {given} but the audit drew from {used}: give the '
                     "audit's config (and --config.data.root)")


def audit_images(audit: pathlib.Path, canaries, base_size: int) -> set[bytes]:
  """The bytes of every image the audit wrote (its base set's PNGs) and of its canaries."""
  from PIL import Image
  files = sorted((audit / 'base' / 'train').rglob('*.png'))
  if len(files) != base_size:
    raise SystemExit(f'error: {audit}/base/train holds {len(files)} images, not the plan\'s '
                     f'{base_size}: run the audit again to finish its first stage')
  return {_pixels(np.asarray(Image.open(f))) for f in files} | {_pixels(c) for c in canaries}


def _pixels(image: np.ndarray) -> bytes:
  """uint8 pixels without a channel axis of one (as a PNG of one channel decodes)."""
  image = np.asarray(image, np.uint8)
  return (image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).tobytes()


def _write(root, images, labels, keep_labels, names) -> int:
  mask = np.isin(labels, keep_labels)
  canary_audit.write_split(root, images[mask], labels[mask], names)
  return int(mask.sum())


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.out)
  if out.exists():
    raise SystemExit(f'error: {out} exists: give a new --out')
  config = FLAGS.config
  audit = pathlib.Path(FLAGS.audit)
  audit_plan = fileio.read_json(audit / 'plan.json')
  check_same_data(config.data, audit_plan)  # before any decoding
  plan = fileio.read_npz(audit / 'canaries.npz')
  base, sources = plan['base_index'], plan['source_index']
  images, labels, names = canary_audit._load_split(config, 'train')
  test_images, test_labels, _ = canary_audit._load_split(config, 'test')
  unknown = sorted(set(FLAGS.public) - set(names))
  if unknown:
    raise SystemExit(f'error: --public names {unknown}, not classes of {names}')
  public = [names.index(n) for n in FLAGS.public]
  private = [i for i in range(len(names)) if i not in public]
  excluded = np.concatenate([base, sources[sources >= 0]]).astype(int)
  pub = public_indices(labels, excluded, public, FLAGS.public_per_class, FLAGS.seed)
  private_bytes = audit_images(audit, plan['images'], audit_plan['base_size'])
  if any(_pixels(images[i]) in private_bytes for i in pub):
    raise SystemExit('error: a public image equals a private one or a canary; nothing written')
  staging = out.with_name(out.name + '.partial')
  if staging.exists():   # a crashed earlier run, perhaps with other flags
    shutil.rmtree(staging)
  counts = {
      'private/train': _write(staging / 'private' / 'train', images[base], labels[base],
                              private, names),
      'private/test': _write(staging / 'private' / 'test', test_images, test_labels, private,
                             names),
      'public/train': _write(staging / 'public' / 'train', images[pub], labels[pub], public,
                             names),
      'public/test': _write(staging / 'public' / 'test', test_images, test_labels, public,
                            names),
  }
  staging.rename(out)
  for k, v in counts.items():
    print(f'{out / k}: {v} images')


if __name__ == '__main__':
  define_flags()
  app.run(main)
