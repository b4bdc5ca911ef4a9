"""Pick a smaller synthetic set out of a larger one (a lever for hard-label students).

A synthetic pool (a finished workdir, e.g. 10,000 generator images) and a template (the
synthetic/ folder of a finished run of the size wanted, made with the same teacher,
statistics and synthesis settings) give OUT: the template's folder with its shards
replaced by per_class images of each class chosen from the pool, in the template's label
order, with a fresh manifest (shard sha256) that names the pool and the method. A copy of
the template's workdir with OUT as its synthetic/ then runs the student and evaluate stages
like any run (benchmarks/RESULTS.md, section methods-cifar10_cpu).

  python benchmarks/select_subset.py --pool=/work/runs/c27/gen10k \
      --template=/work/runs/h27/gen2k_hard_mixup/synthetic \
      --out=/work/runs/h27/kc2k_hard_mixup/synthetic --method=kcenter

Methods: first (the pool's first images of each class: the template's own set when the pool
was grown from the same seed), consistent (highest mean teacher probability of the label over
the stored per-view labels), kcenter (greedy k-centre on the teacher's unit-normalised
penultimate features, per class) and kcenter_agree (k-centre among the images the teacher
labels as intended).
"""

from __future__ import annotations

import argparse
import shutil
import sys

import numpy as np

from bnsynth_jax import fileio, synthetic_data

METHODS = ('first', 'consistent', 'kcenter', 'kcenter_agree')


def kcenter(features: np.ndarray, k: int) -> np.ndarray:
  """Greedy k-centre: start nearest the mean, then always the point farthest from the chosen."""
  first = int(np.argmin(((features - features.mean(0)) ** 2).sum(1)))
  chosen = [first]
  distance = ((features - features[first]) ** 2).sum(1)
  for _ in range(k - 1):
    chosen.append(int(np.argmax(distance)))
    distance = np.minimum(distance, ((features - features[chosen[-1]]) ** 2).sum(1))
  return np.array(chosen)


def view_consistency(ds: synthetic_data.SyntheticDataset) -> np.ndarray:
  """Each image's mean teacher probability of its label over the stored per-view labels."""
  if ds.view_soft_labels is None:
    raise SystemExit('method consistent needs per-view labels in the pool (synthesis.view_epochs)')
  views = ds.view_soft_labels.astype(np.float32)
  return views[np.arange(len(ds.labels)), :, ds.labels].mean(1)


def teacher_features(pool, ds: synthetic_data.SyntheticDataset) -> np.ndarray:
  from bnsynth_jax import artifacts, audit   # JAX only for the k-centre methods
  model, variables, manifest = artifacts.load_model(f'{pool}/teacher')
  return audit._features(model, variables, ds.images, manifest['mean'], manifest['std'])


def pick(ds, pool, method: str, per_class: int, num_classes: int) -> dict[int, np.ndarray]:
  """Per class, the pool indices chosen (in order)."""
  score = view_consistency(ds) if method == 'consistent' else None
  features = teacher_features(pool, ds) if method.startswith('kcenter') else None
  picks = {}
  for c in range(num_classes):
    idx = np.flatnonzero(ds.labels == c)
    if len(idx) < per_class:
      raise SystemExit(f'the pool has {len(idx)} images of class {c}, fewer than {per_class}')
    if method == 'first':
      sel = np.arange(per_class)
    elif method == 'consistent':
      sel = np.argsort(-score[idx], kind='stable')[:per_class]
    elif method == 'kcenter':
      sel = kcenter(features[idx], per_class)
    else:
      agree = np.flatnonzero(ds.soft_labels[idx].argmax(1) == c)
      if len(agree) < per_class:
        raise SystemExit(f'class {c}: the teacher agrees with {len(agree)} pool images, fewer '
                         f'than {per_class}')
      sel = agree[kcenter(features[idx][agree], per_class)]
    picks[c] = idx[sel]
  return picks


def write_selection(ds, pool, template, out, picks: dict[int, np.ndarray], method: str) -> None:
  """OUT = the template with each shard's images replaced by the picks, label order kept."""
  template_manifest = synthetic_data.read_manifest(template)
  pooled = {k: getattr(ds, k) for k in synthetic_data.ARRAY_FIELDS}
  if ds.view_soft_labels is not None:
    pooled['view_soft_labels'] = ds.view_soft_labels
  shutil.rmtree(out, ignore_errors=True)
  shutil.copytree(template, out)
  num_classes, done = template_manifest['num_classes'], 0
  for j, shard in enumerate(template_manifest['shards']):
    arrays = fileio.read_npz(synthetic_data.shard_path(template, j))
    order = np.array([picks[int(label)][(done + p) // num_classes]
                      for p, label in enumerate(arrays['labels'])])
    arrays.update({k: v[order] for k, v in pooled.items()})
    synthetic_data.write_shard(out, j, arrays)
    done += shard['num_images']
  entries, _ = synthetic_data.scan_shards(out, len(template_manifest['shards']))
  fields = {k: v for k, v in template_manifest.items()
            if k not in ('format', 'num_images', 'shards')}
  fields['selected_from'] = {'pool': str(pool), 'method': method}
  synthetic_data.write_manifest(out, entries, **fields)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pool', required=True, help='a finished workdir: synthetic/ and teacher/')
  parser.add_argument('--template', required=True, help='a finished synthetic/ folder')
  parser.add_argument('--out', required=True, help='the synthetic/ folder to write')
  parser.add_argument('--method', choices=METHODS, default='first')
  args = parser.parse_args(argv)
  ds = synthetic_data.load_synthetic(f'{args.pool}/synthetic')
  manifest = synthetic_data.read_manifest(args.template)
  picks = pick(ds, args.pool, args.method, manifest['images_per_class'], manifest['num_classes'])
  write_selection(ds, args.pool, args.template, args.out, picks, args.method)
  chosen = np.concatenate(list(picks.values()))
  agree = float(np.mean(ds.soft_labels[chosen].argmax(1) == ds.labels[chosen]))
  print(f'{args.method}: {len(chosen)} of {len(ds)} images, teacher agreement {agree:.4f} '
        f'(pool {np.mean(ds.soft_labels.argmax(1) == ds.labels):.4f}), mean confidence '
        f'{ds.confidence[chosen].mean():.4f} (pool {ds.confidence.mean():.4f}) -> {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
