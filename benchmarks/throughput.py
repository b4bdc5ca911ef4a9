"""Throughput: the synthesis step (image-iterations/s) and the training steps (images/s).

Measures the project's own jitted steps (synthesis.make_step, train.train_step) for
each model x dtype x batch size, the FLOPs per step from XLA's compiled cost
analysis, the achieved FLOP/s and its fraction of the device's peak, and, with
--torch, the same synthesis step written in PyTorch eager (a BN-input forward
hook per layer, Adam on the input), in the same process on the same machine, timed in
alternating rounds (JAX, PyTorch, JAX, ...); the ratio is the median of the per-round
ratios, with their range.
Appends a table to benchmarks/RESULTS.md with the command.

  python benchmarks/throughput.py --models=resnet20 --batch_sizes=128 --torch
  python benchmarks/throughput.py --models=resnet18,resnet50 --dtypes=float32,bfloat16
  python benchmarks/throughput.py --models=scatternet_linear_pool4 --batch_sizes=1024 \
      --kinds=dp_train,dp_train_cached

Kinds: synthesis, train (SGD), dp_train (the DP-SGD step, train.dp_train_step: per-example
clipped gradients and the noise; a GroupNorm model), dp_train_cached (the same step on a
batch that already holds a public front end's outputs, privacy.FrontEndBatches: what a
scatternet_* teacher without augmentation runs; its img/s leave out the one pass that
computes them).

The synthesis step matches global BN statistics with per-image random roll and
flip in both frameworks, as DeepInversion does (class-wise: --stats_kind=classwise,
JAX only). Peak FLOP/s: a table for known accelerators; on CPU, a measured
float32 matrix-multiply rate (stated as such), or --peak_tflops.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

# Dense peak TFLOP/s by device kind (substring match) for (float32, bfloat16).
PEAKS = {
    'H100': (67.0, 989.0), 'H200': (67.0, 989.0), 'A100': (19.5, 312.0),
    'TPU v4': (275.0, 275.0), 'TPU v5 lite': (197.0, 197.0), 'TPU v5': (459.0, 459.0),
}
IMAGE_SIZE = {'resnet20': 32, 'resnet32': 32, 'resnet56': 32, 'resnet18': 32, 'resnet50': 224}
# One stem table for the JAX model and its PyTorch twin (torch_models.STEM): ResNet-50 runs
# at 224x224 with the ImageNet stem (7x7/2 conv + max-pool), the CIFAR models with 3x3.
from torch_models import STEM, torch_resnet  # noqa: E402  (torch is imported only when called)


def time_interleaved(run_ones, warmup: int, steps: int, repeats: int) -> list[list[float]]:
  """Seconds per step of each closure: one timed run of `steps` steps each in turn, for
  `repeats` rounds, so every framework sees the same machine conditions (a shared 2-core VM
  drifts by ~10% within a minute, which a JAX-then-PyTorch order reads as a speed gap)."""
  for run_one in run_ones:
    for _ in range(warmup):
      run_one()
  per_step = [[] for _ in run_ones]
  for _ in range(repeats):
    for i, run_one in enumerate(run_ones):
      t0 = time.perf_counter()
      for _ in range(steps):
        run_one()
      per_step[i].append((time.perf_counter() - t0) / steps)
  return per_step


def time_steps(run_one, warmup: int, steps: int, repeats: int) -> float:
  """Median seconds per step over `repeats` timed runs of `steps` steps."""
  return statistics.median(time_interleaved([run_one], warmup, steps, repeats)[0])


def compiled_flops(jitted, *args) -> float | None:
  """FLOPs of one whole (global) step. XLA's cost analysis of an SPMD-partitioned program
  counts one device's partition, so it is multiplied by the device count."""
  import jax
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # noqa: BLE001 - cost analysis is best effort on some backends
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  per_device = float(cost.get('flops', 0.0)) if cost else 0.0
  return per_device * jax.device_count() or None


def peak_flops(dtype: str, override_tflops: float | None):
  import jax
  import jax.numpy as jnp
  if override_tflops:
    return override_tflops * 1e12, 'given'
  kind = jax.devices()[0].device_kind
  for key, (f32, bf16) in PEAKS.items():
    if key.lower() in kind.lower():
      return (bf16 if dtype == 'bfloat16' else f32) * 1e12, f'{key} datasheet'
  # CPU: a measured float32 GEMM rate is the practical peak.
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  t = time_steps(lambda: mm(a).block_until_ready(), 2, 10, 3)
  return 2 * n ** 3 / t, 'measured f32 GEMM'


# ----------------------------------------------------------------------------
# JAX


def jax_synthesis(model_name, batch, dtype, image_size, stats_kind):
  """Builds the project's synthesis step; returns (run one step, XLA FLOPs per step)."""
  import jax
  import numpy as np
  from bnsynth_jax import artifacts, config_lib, models, parallel, stats as stats_lib, synthesis
  cfg = config_lib.default_config().synthesis
  cfg.dtype = dtype
  num_classes = 10
  stem = STEM.get(model_name, 'cifar')
  model = models.create_model(model_name, num_classes, stem=stem, dtype=dtype)
  eval_model = models.create_model(model_name, num_classes, stem=stem)
  shape = (image_size, image_size, 3)
  variables = models.init_variables(model, jax.random.key(0), shape)
  glob = artifacts.global_statistics(variables)
  if stats_kind == 'classwise':
    glob = {k: {n: np.repeat(v[None], num_classes, 0) for n, v in d.items()}
            for k, d in glob.items()}
  layers = stats_lib.layer_order(model, variables, shape)
  weights = {'/'.join(p): (cfg.first_bn_multiplier if i == 0 else 1.0)
             for i, p in enumerate(layers)}
  problem = synthesis.Problem(model=model, eval_model=eval_model, num_classes=num_classes,
                              image_shape=shape, classwise=stats_kind == 'classwise',
                              layer_weights=weights, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3)
  mesh = parallel.make_mesh()
  tx = synthesis.create_optimizer(cfg, 1000)
  init_fn, sharding = synthesis.make_init(problem, tx, mesh, batch, seed=0)
  step_fn = synthesis.make_step(problem, cfg, tx, mesh, sharding, seed=0)
  labels = parallel.to_global(mesh, synthesis.target_labels(batch, num_classes))
  targets = parallel.replicate(mesh, jax.tree.map(lambda a: np.asarray(a, np.float32), glob))
  teacher = parallel.replicate(mesh, variables)
  state = [init_fn(np.int32(0))]
  flops = compiled_flops(step_fn, state[0], labels, np.int32(0), teacher, targets, None)

  def one():
    state[0], terms = step_fn(state[0], labels, np.int32(0), teacher, targets, None)
    jax.block_until_ready(terms['loss'])
  return one, flops


def jax_train(model_name, batch, dtype, image_size):
  """Builds the project's training step; returns (run one step, XLA FLOPs per step)."""
  import functools
  import jax
  import numpy as np
  from bnsynth_jax import config_lib, models, parallel, train
  cfg = config_lib.train_config()
  model = models.create_model(model_name, 10, stem=STEM.get(model_name, 'cifar'), dtype=dtype)
  mesh = parallel.make_mesh()
  shape = (image_size, image_size, 3)
  tx = train.create_optimizer(cfg, train.create_learning_rate(cfg, 100, 1000))
  state = train.create_train_state(jax.random.key(0), model, shape, tx, mesh)
  step = functools.partial(train.train_step, base_key=jax.random.key(1), cfg=cfg,
                           mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=10)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
  return _step_runner(step, state, mesh, images, rng.integers(0, 10, batch).astype(np.int32))


def _step_runner(step, state, mesh, images, labels):
  """(run one training step on a fixed batch, XLA FLOPs per step) for step(state, batch,
  step number) -> (state, metrics), jitted with the data sharding of train.fit."""
  import jax
  import numpy as np
  from bnsynth_jax import parallel
  step_fn = jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh),
                                        parallel.replicated(mesh)),
                    out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                    donate_argnums=0)
  batch_data = parallel.to_global(mesh, {'images': images, 'labels': labels})
  held = [state]
  flops = compiled_flops(step_fn, held[0], batch_data, np.int32(0))

  def one():
    held[0], m = step_fn(held[0], batch_data, np.int32(0))
    jax.block_until_ready(m['loss'])
  return one, flops


def jax_dp_train(model_name, batch, dtype, image_size, cached: bool):
  """The project's DP-SGD step (a GroupNorm model; `cached`: the batch holds the public
  front end's outputs); returns (run one step, XLA FLOPs per step)."""
  import functools
  import jax
  import numpy as np
  from bnsynth_jax import config_lib, models, parallel, privacy, train
  cfg = config_lib.train_config(crop_padding=0, flip=False)
  model = models.create_model(model_name, 10, norm='group', dtype=dtype)
  if cached and getattr(model, 'public_front_end', None) is None:
    raise SystemExit(f'--kinds=dp_train_cached needs a model with a public front end '
                     f'(scatternet_*), not {model_name}')
  mesh = parallel.make_mesh()
  shape = (image_size, image_size, 3)
  mean, std = (0.5,) * 3, (0.25,) * 3
  dp = {'clip_norm': 1.0, 'noise_multiplier': 1.0, 'augmult': 1,
        'noise_key': jax.random.PRNGKey(0)}
  tx = train.dp_optimizer(cfg, train.create_learning_rate(cfg, 100, 1000), dp)
  state = train.create_train_state(jax.random.key(0), model, shape, tx, mesh)
  step = functools.partial(train.dp_train_step, base_key=jax.random.key(1), cfg=cfg, mean=mean,
                           std=std, num_classes=10, clip_norm=1.0, augmult=1, model=model,
                           front_end_cached=cached)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
  if cached:
    images = privacy.front_end_features(model.public_front_end, images, mean, std, chunk=256)
  return _step_runner(step, state, mesh, images, rng.integers(0, 10, batch).astype(np.int32))


# ----------------------------------------------------------------------------
# PyTorch eager (optional dependency)


def torch_synthesis(model_name, batch, dtype, image_size):
  """The same synthesis step in PyTorch eager; returns a closure that runs one step."""
  import torch
  import torch.nn as tnn
  torch.manual_seed(0)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = torch_resnet(model_name).to(device).eval()
  for p in model.parameters():
    p.requires_grad_(False)
  terms = []

  def hook(module, inputs, _):
    a = inputs[0].float()
    mu = a.mean(dim=(0, 2, 3))
    var = a.permute(1, 0, 2, 3).reshape(a.shape[1], -1).var(1, unbiased=False)
    terms.append(torch.norm(mu - module.running_mean, 2) +
                 torch.norm(var - module.running_var, 2))

  bns = [m for m in model.modules() if isinstance(m, tnn.BatchNorm2d)]
  for m in bns:
    m.register_forward_hook(hook)
  weights = [10.0] + [1.0] * (len(bns) - 1)
  x = torch.randn(batch, 3, image_size, image_size, device=device, requires_grad=True)
  labels = torch.arange(batch, device=device) % 10
  opt = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.99))
  ar = torch.arange(image_size, device=device)
  autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
              if dtype == 'bfloat16' else torch.autocast(device_type=device, enabled=False))

  def one():
    terms.clear()
    opt.zero_grad(set_to_none=True)
    # Per-image random roll (+-2 px) and flip, as the JAX step does.
    shift = torch.randint(-2, 3, (batch, 2), device=device)
    ih = (ar[None, :] - shift[:, :1]) % image_size
    iw = (ar[None, :] - shift[:, 1:]) % image_size
    flip = torch.rand(batch, device=device) < 0.5
    iw = torch.where(flip[:, None], iw.flip(1), iw)
    xa = x[torch.arange(batch, device=device)[:, None, None], :, ih[:, :, None], iw[:, None, :]]
    xa = xa.permute(0, 3, 1, 2)
    with autocast:
      logits = model(xa)
    bn = sum(w * t for w, t in zip(weights, terms))
    diff1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    diff2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    diff3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    diff4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    tv = torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)
    loss = 10.0 * bn + tnn.functional.cross_entropy(logits.float(), labels) + 2.5e-5 * tv
    loss.backward()
    opt.step()
    with torch.no_grad():
      x.clamp_(-2.0, 2.0)
    if device == 'cuda':
      torch.cuda.synchronize()
  return one


# ----------------------------------------------------------------------------


def ratio_text(r: dict) -> str:
  if 'jax_over_torch' not in r:
    return '—'
  low, high = r['jax_over_torch_range']
  spread = f" ({low:.2f}-{high:.2f} over {r['rounds']} rounds)" if r['rounds'] > 1 else ''
  return f"{r['jax_over_torch']:.2f}x{spread}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='resnet20')
  parser.add_argument('--batch_sizes', default='128')
  parser.add_argument('--dtypes', default='float32')
  parser.add_argument('--kinds', default='synthesis,train')
  parser.add_argument('--stats_kind', default='global', choices=['global', 'classwise'])
  parser.add_argument('--torch', action='store_true', help='also time the PyTorch eager step')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--peak_tflops', type=float, default=None)
  parser.add_argument('--note', default='', help='a note for the RESULTS.md rows')
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results' / 'throughput.json'))
  parser.add_argument('--no_results_md', action='store_true')
  args = parser.parse_args(argv)
  command = 'python benchmarks/throughput.py ' + ' '.join(
      shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax
  from results_md import append_row
  device = jax.devices()[0]
  device_desc = f'{jax.device_count()} x {device.device_kind}'
  rows = []
  for model_name in args.models.split(','):
    size = IMAGE_SIZE.get(model_name, 32)
    for dtype in args.dtypes.split(','):
      peak, peak_source = peak_flops(dtype, args.peak_tflops)
      if device.platform != 'cpu':   # a datasheet peak is per chip; the step uses them all
        peak *= jax.device_count()
      for batch in map(int, args.batch_sizes.split(',')):
        for kind in args.kinds.split(','):
          if kind == 'synthesis':
            one, flops = jax_synthesis(model_name, batch, dtype, size, args.stats_kind)
          elif kind in ('dp_train', 'dp_train_cached'):
            one, flops = jax_dp_train(model_name, batch, dtype, size, kind == 'dp_train_cached')
          elif kind == 'train':
            one, flops = jax_train(model_name, batch, dtype, size)
          else:
            raise SystemExit(f'--kinds: unknown {kind!r}: use synthesis, train, dp_train, '
                             'dp_train_cached')
          runs = [one]
          with_torch = kind == 'synthesis' and args.torch
          if with_torch:
            runs.append(torch_synthesis(model_name, batch, dtype, size))
          times = time_interleaved(runs, args.warmup, args.steps, args.repeats)
          seconds = statistics.median(times[0])
          row = {'model': model_name, 'image_size': size, 'dtype': dtype, 'batch': batch,
                 'kind': kind, 'framework': 'jax', 'seconds_per_step': seconds,
                 'per_second': batch / seconds, 'flops_per_step': flops,
                 'achieved_tflops': flops / seconds / 1e12 if flops else None,
                 'utilisation': flops / seconds / peak if flops else None,
                 'peak_tflops': peak / 1e12, 'peak_source': peak_source,
                 'device': device_desc, 'jax': jax.__version__}
          if with_torch:
            import torch
            # The ratio of each round (JAX and PyTorch timed back to back): median and range.
            ratios = sorted(t / j for j, t in zip(times[0], times[1]))
            row['torch_per_second'] = batch / statistics.median(times[1])
            row['jax_over_torch'] = statistics.median(ratios)
            row['jax_over_torch_range'] = [ratios[0], ratios[-1]]
            row['rounds'] = len(ratios)
            row['torch'] = torch.__version__
          rows.append(row)
          print(json.dumps(row), flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'command': command, 'rows': rows}, indent=2))
  if not args.no_results_md:
    for r in rows:
      unit = 'image-it/s' if r['kind'] == 'synthesis' else 'img/s'
      append_row('throughput', 'Throughput', [
          'device', 'step', 'model', 'dtype', 'batch', 'JAX', 'PyTorch eager', 'JAX / PyTorch',
          'TFLOP/s (XLA cost)', 'utilisation', 'note', 'command'], [
          r['device'], r['kind'], f"{r['model']} {r['image_size']}px", r['dtype'], r['batch'],
          f"{r['per_second']:.1f} {unit}",
          f"{r['torch_per_second']:.1f} {unit}" if 'torch_per_second' in r else '—',
          ratio_text(r),
          f"{r['achieved_tflops']:.3f}" if r['achieved_tflops'] else '—',
          (f"{100 * r['utilisation']:.1f}% of {r['peak_tflops']:.3g} ({r['peak_source']})"
           if r['utilisation'] else '—'), args.note, f'`{command}`'])
  return 0


if __name__ == '__main__':
  sys.exit(main())
