"""A PyTorch student trained from the portable release alone (the consumer in another framework).

  python -m bnsynth_jax.synthetic_data --synthetic_dir=W/synthetic --export_to=OUT
  python benchmarks/torch_student.py --release=OUT --recipe_from=W --labels=views,hard

reads OUT/train/<class>/*.png, OUT/views.npz and OUT/release.json (bnsynth_jax.views_np,
NumPy only) and trains the PyTorch twin of the student network (benchmarks/torch_models.py,
initialised as Flax does) with
  views: in epoch e, image i shown as views_np.apply_view(image_i, crop_offsets[i, e],
         flips[i, e]) with target view_soft_labels[i, e], loss T^2 * CE(target, logits / T);
  hard:  the synthesised class, random crop (zero padding) + flip drawn by PyTorch.
The recipe (model, batch size, epochs, SGD momentum / Nesterov, learning rate with linear
warm-up and cosine decay per step, weight decay on kernels only, crop padding, flip) is
that of the JAX student in W/report.json (--recipe_from) unless given by flags; the test
set is W's real test split (read by bnsynth_jax.sources) or --test (an image folder with
<class>/ subfolders, or an .npz with images, labels). With --recipe_from, the JAX student
of W (the same images and labels) is printed beside, and --jax_hard_workdir names a run
whose student used hard labels on the same images. Appends a row per label kind to
benchmarks/RESULTS.md (section torch_student) with the command.

PyTorch is an optional benchmark dependency: pip install -e .[torch] (a CPU wheel is enough).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

from bnsynth_jax import views_np  # noqa: E402  (NumPy only)

DEFAULT_RECIPE = {'model': 'resnet20', 'batch_size': 128, 'epochs': 100, 'learning_rate': 0.1,
                  'momentum': 0.9, 'nesterov': True, 'weight_decay': 5e-4,
                  'warmup_epochs': 2.0, 'crop_padding': 4, 'flip': True, 'stem': 'cifar',
                  'num_steps': 0}


def recipe_from_report(report: dict) -> dict:
  st = report['config']['student']
  if st.get('optimizer', 'sgd') != 'sgd' or st.get('schedule', 'cosine') != 'cosine':
    raise SystemExit('torch_student.py replays the SGD + cosine student recipe only')
  if st.get('mixup_alpha') or st.get('cutmix_alpha') or st.get('label_smoothing'):
    raise SystemExit('torch_student.py does not replay mixup / cutmix / label smoothing')
  return {'model': st['model']['name'], 'batch_size': int(st['batch_size']),
          'epochs': int(st['epochs']), 'learning_rate': float(st['learning_rate']),
          'momentum': float(st['momentum']), 'nesterov': bool(st['nesterov']),
          'weight_decay': float(st['weight_decay']), 'warmup_epochs': float(st['warmup_epochs']),
          'crop_padding': int(st['crop_padding']), 'flip': bool(st['flip']),
          'stem': st['model'].get('stem', 'cifar'),
          'mixed_temperature': float(st.get('mixed_temperature', 4.0)),
          'num_steps': int(st.get('num_steps', 0) or 0)}


def step_schedule(recipe: dict, num_images: int) -> tuple[int, int, int]:
  """(steps per epoch, total steps, warm-up steps) as the JAX student counts them: whole
  batches per epoch, `num_steps` > 0 overriding epochs (bnsynth_jax.train.num_train_steps)."""
  steps_per_epoch = num_images // recipe['batch_size']
  if steps_per_epoch == 0:
    raise SystemExit(f'batch size {recipe["batch_size"]} exceeds the {num_images} released images')
  total = (int(recipe.get('num_steps', 0)) or
           int(round(recipe['epochs'] * steps_per_epoch)))
  return steps_per_epoch, total, int(round(recipe['warmup_epochs'] * steps_per_epoch))


def load_test(args, report: dict | None) -> tuple[np.ndarray, np.ndarray]:
  if args.test:
    path = pathlib.Path(os.path.expanduser(args.test))
    if path.suffix == '.npz':
      with np.load(path) as z:
        return z['images'], z['labels']
    from PIL import Image
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    images, labels = [], []
    for k, name in enumerate(classes):
      for f in sorted((path / name).iterdir()):
        arr = np.asarray(Image.open(f))
        images.append(arr[..., None] if arr.ndim == 2 else arr)
        labels.append(k)
    return np.stack(images), np.asarray(labels, np.int64)
  if report is None:
    raise SystemExit('give --test (image folder or .npz) or --recipe_from=WORKDIR')
  import ml_collections
  from bnsynth_jax import sources
  data = ml_collections.ConfigDict(report['config']['data'])
  source = sources.create_source(data)
  parts = source.load(data.test_split, [0], 1)
  return (np.concatenate([p.images for p in parts]),
          np.concatenate([p.labels for p in parts]).astype(np.int64))


def learning_rate(step: int, total: int, warmup: int, peak: float) -> float:
  """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, 0) at `step`."""
  if warmup and step < warmup:
    return peak * step / warmup
  frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
  return peak * 0.5 * (1 + math.cos(math.pi * frac))


def epochs_text(recipe: dict, num_images: int) -> str:
  """The epochs the student runs, e.g. '100' or '214.3 (1500 steps)'."""
  steps_per_epoch, total, _ = step_schedule(recipe, num_images)
  if not recipe.get('num_steps'):
    return f'{recipe["epochs"]:g}'
  return f'{total / steps_per_epoch:.1f} ({total} steps)'


def train(images, views, release, recipe, labels: str, seed: int, log=print) -> tuple:
  """Trains one PyTorch student; returns (model, seconds)."""
  import torch
  import torch.nn.functional as F
  from torch_models import torch_resnet

  torch.manual_seed(seed)
  gen = np.random.default_rng(seed)
  n, h, w, c = images.shape
  k = len(release['class_names'])
  model = torch_resnet(recipe['model'], k, in_channels=c, stem=recipe['stem'], flax_init=True)
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  opt = torch.optim.SGD([{'params': decay, 'weight_decay': recipe['weight_decay']},
                         {'params': no_decay, 'weight_decay': 0.0}],
                        lr=recipe['learning_rate'], momentum=recipe['momentum'],
                        nesterov=recipe['nesterov'])
  batch = recipe['batch_size']
  steps_per_epoch, total, warmup = step_schedule(recipe, n)
  epochs = math.ceil(total / steps_per_epoch)
  mean = torch.tensor(release['mean'], dtype=torch.float32).view(1, -1, 1, 1)
  std = torch.tensor(release['std'], dtype=torch.float32).view(1, -1, 1, 1)
  temperature = float(views['temperature'])
  pad = recipe['crop_padding']
  mixed = {k[len('mixed_'):]: v for k, v in views.items() if k.startswith('mixed_')}
  if labels == 'mixed':
    if not mixed:
      raise SystemExit('this release has no mixed-view labels (no relabel stage before export)')
    temperature = float(recipe.get('mixed_temperature', 4.0))
  if labels == 'views':
    if int(views['epochs']) == 0:
      raise SystemExit('this release has no per-view labels (synthesised with view_epochs=0)')
    if (pad, recipe['flip']) != (int(views['crop_padding']), bool(release['views']['flip'])):
      raise SystemExit('the recipe\'s crop_padding / flip differ from the release\'s views')
  t0, step = time.perf_counter(), 0
  model.train()
  for epoch in range(epochs):
    order = gen.permutation(n)
    for s in range(min(steps_per_epoch, total - step)):
      idx = order[s * batch:(s + 1) * batch]
      if labels == 'views':
        x, target = views_np.epoch_views(images, views, epoch, idx)
        target = torch.from_numpy(target.astype(np.float32))
      elif labels == 'mixed':
        x = views_np.mixed_views(images, mixed, idx, epoch)
        logits_t = mixed['logits'][idx, epoch % int(mixed['epochs'])].astype(np.float32)
        target = torch.softmax(torch.from_numpy(logits_t) / temperature, dim=-1)
      else:
        offsets = gen.integers(0, 2 * pad + 1, (len(idx), 2))
        flips = (gen.random(len(idx)) < 0.5) if recipe['flip'] else np.zeros(len(idx), bool)
        x = views_np.apply_view(images[idx], offsets, flips, pad)
        target = torch.from_numpy(views['labels'][idx].astype(np.int64))
      xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float() / 255.0
      xt = (xt - mean) / std
      for group in opt.param_groups:
        group['lr'] = learning_rate(step, total, warmup, recipe['learning_rate'])
      logits = model(xt)
      if labels in ('views', 'mixed'):
        loss = temperature ** 2 * torch.mean(
            torch.sum(-target * F.log_softmax(logits / temperature, dim=-1), dim=-1))
      else:
        loss = F.cross_entropy(logits, target)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      step += 1
    if (epoch + 1) % max(epochs // 10, 1) == 0:
      log(f'  {labels}: epoch {epoch + 1}/{epochs} loss {loss.item():.4f} '
          f'({time.perf_counter() - t0:.0f}s)')
  return model, time.perf_counter() - t0


def evaluate(model, images, labels, release, batch: int = 500) -> float:
  import torch
  mean = torch.tensor(release['mean'], dtype=torch.float32).view(1, -1, 1, 1)
  std = torch.tensor(release['std'], dtype=torch.float32).view(1, -1, 1, 1)
  model.eval()
  correct = 0
  with torch.no_grad():
    for i in range(0, len(images), batch):
      xt = torch.from_numpy(np.ascontiguousarray(images[i:i + batch].transpose(0, 3, 1, 2)))
      xt = (xt.float() / 255.0 - mean) / std
      correct += int((model(xt).argmax(-1).numpy() == labels[i:i + batch]).sum())
  return correct / len(images)


def jax_accuracy(workdir: str | None, release: dict | None = None
                 ) -> tuple[float | None, str | None]:
  """(test accuracy, labels) of the JAX student of a workdir, from its report.json; with
  `release`, refuses a workdir whose synthetic set has another teacher, statistics or size."""
  if not workdir:
    return None, None
  if release is not None:
    check_same_release(workdir, release)
  report_file = pathlib.Path(workdir) / 'report.json'
  if not report_file.exists():
    print(f'{workdir}: no report.json (its JAX student has not finished): left out')
    return None, None
  report = json.loads(report_file.read_text())
  acc = report.get('evaluate', {}).get('synthetic', {}).get('test_accuracy')
  return acc, report.get('student', {}).get('synthetic', {}).get('labels')


def check_same_release(workdir: str, release: dict) -> None:
  """Refuses a workdir whose synthetic set has another teacher, statistics or size."""
  manifest = json.loads((pathlib.Path(workdir) / 'synthetic' / 'manifest.json').read_text())
  source = release.get('source', {})
  for key, want in (('teacher_sha256', source.get('teacher_sha256')),
                    ('statistics_sha256', source.get('statistics_sha256')),
                    ('num_images', release.get('num_images'))):
    if want is not None and manifest.get(key) != want:
      raise SystemExit(f'{workdir}: its synthetic set differs from the release ({key}); '
                       'compare JAX students trained on the exported images only')


def train_seeds(images, views, release, recipe, labels, seeds, test_images, test_labels):
  """(test accuracies, seconds) of one torch student per seed."""
  accs, seconds = [], []
  for seed in seeds:
    model, secs = train(images, views, release, recipe, labels, seed)
    accs.append(evaluate(model, test_images, test_labels, release))
    seconds.append(secs)
    print(f'torch student ({labels}, seed {seed}): test accuracy {100 * accs[-1]:.2f}% '
          f'in {secs:.0f}s', flush=True)
  return accs, seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--release', required=True, help='the export folder OUT')
  parser.add_argument('--recipe_from', default='',
                      help='a workdir: its JAX student recipe, test split and accuracy')
  parser.add_argument('--jax_hard_workdir', default='',
                      help='a workdir whose JAX student used hard labels on the same images')
  parser.add_argument('--jax_workdirs', default='',
                      help='comma list of more workdirs with JAX students on the same images '
                      '(e.g. --config.student.seed=1, 2): the JAX side is their mean')
  parser.add_argument('--test', default='', help='test set: image folder root or .npz')
  parser.add_argument('--labels', default='views,hard', help='comma list of views, mixed, hard')
  parser.add_argument('--epochs', type=int, default=0, help='override the recipe (0 = keep)')
  parser.add_argument('--model', default='', help='override the recipe\'s model')
  parser.add_argument('--batch_size', type=int, default=0, help='override the recipe (0 = keep)')
  parser.add_argument('--crop_padding', type=int, default=-1, help='override (-1 = keep)')
  parser.add_argument('--seeds', default='0', help='comma list: one student per seed, mean '
                      'and spread reported')
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0 = default)')
  parser.add_argument('--name', default='', help='row label (default: the release folder)')
  parser.add_argument('--no_results', action='store_true', help='do not append RESULTS.md rows')
  args = parser.parse_args(argv)
  try:
    import torch
  except ImportError:
    print('error: PyTorch is not installed: pip install -e .[torch] (a CPU wheel is enough)',
          file=sys.stderr)
    return 2
  if args.threads:
    torch.set_num_threads(args.threads)
  report = (json.loads((pathlib.Path(args.recipe_from) / 'report.json').read_text())
            if args.recipe_from else None)
  images, views, release = views_np.load_release(args.release)
  recipe = recipe_from_report(report) if report else dict(DEFAULT_RECIPE)
  if not report and release.get('views'):   # the views the teacher labelled
    recipe.update(crop_padding=release['views']['crop_padding'], flip=release['views']['flip'],
                  epochs=release['views']['epochs'])
  if args.epochs:
    recipe.update(epochs=args.epochs, num_steps=0)
  if args.model:
    recipe['model'] = args.model
  if args.batch_size:
    recipe['batch_size'] = args.batch_size
  if args.crop_padding >= 0:
    recipe['crop_padding'] = args.crop_padding
  seeds = [int(x) for x in args.seeds.split(',')]
  test_images, test_labels = load_test(args, report)
  if test_images.shape[1:] != images.shape[1:]:
    raise SystemExit(f'test images {test_images.shape[1:]} differ from the release\'s '
                     f'{images.shape[1:]}')
  print(f'release {args.release}: {len(images)} images, {int(views["epochs"])} view epochs; '
        f'test {len(test_images)} images; recipe {recipe}')
  jax_dirs = [wd for wd in (args.recipe_from, args.jax_hard_workdir,
                             *args.jax_workdirs.split(',')) if wd]
  for wd in jax_dirs:     # refused now; their accuracies are read after the torch students,
    check_same_release(wd, release)    # so JAX students may still be training beside them
  command = 'python benchmarks/torch_student.py ' + ' '.join(shlex.quote(a) for a in
                                                             (argv or sys.argv[1:]))
  trained = {labels: train_seeds(images, views, release, recipe, labels, seeds, test_images,
                                 test_labels) for labels in args.labels.split(',')}
  jax_by_labels = {}
  for wd in jax_dirs:
    acc, kind = jax_accuracy(wd, release)
    if acc is not None:
      jax_by_labels.setdefault(kind, []).append(acc)
  for labels, (accs, seconds) in trained.items():
    acc, spread = float(np.mean(accs)), float(np.std(accs))
    refs = jax_by_labels.get(labels)
    ref = None if refs is None else float(np.mean(refs))
    jax_text = '' if refs is None else (f'{100 * ref:.2f}%' if len(refs) == 1 else
                                        f'{100 * ref:.2f}% ({100 * np.std(refs):.2f}, {len(refs)})')
    gap = '' if ref is None else f', JAX student {jax_text} (gap {100 * (acc - ref):+.2f})'
    print(f'torch student ({labels}): test accuracy {100 * acc:.2f}% (sd {100 * spread:.2f}, '
          f'{len(seeds)} seeds){gap}')
    if not args.no_results:
      import results_md
      results_md.append_row(
          'torch_student', 'PyTorch student from the portable release (benchmarks/torch_student.py)',
          ['release', 'images', 'labels', 'model', 'epochs', 'torch acc (mean, sd, seeds)',
           'JAX acc', 'gap', 'seconds / student', 'command'],
          [args.name or args.release, len(images), labels, recipe['model'],
           epochs_text(recipe, len(images)),
           f'{100 * acc:.2f}% ({100 * spread:.2f}, {len(seeds)})',
           jax_text,
           '' if ref is None else f'{100 * (acc - ref):+.2f}', f'{np.mean(seconds):.0f}',
           f'`{command}`'])
  return 0


if __name__ == '__main__':
  sys.exit(main())
