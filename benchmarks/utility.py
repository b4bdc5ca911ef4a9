"""Utility sweeps: student accuracy against synthesis compute, and against the number of images.

  # Utility per compute: 2,000 CIFAR-10 images at 50 / 100 / 200 / 500 iterations
  python benchmarks/utility.py --suite=cifar10_cpu --sweep=synthesis.iterations \
      --values=50,100,200,500
  # The scaling curve: 1k / 2k / 5k / 10k images (per-view and hard labels, real subset)
  python benchmarks/utility.py --suite=cifar10_cpu --sweep=synthesis.images_per_class \
      --values=100,200,500,1000 --plot=docs/scaling.png

For each value, benchmarks/quality.py runs the per-view-label variant and the hard-label
variant (the second reuses the first's teacher, statistics and synthetic set: only the
student differs) with `--set SWEEP=VALUE` (plus any --set given here), and the real-subset
student of the same size and recipe. Each finished run is a workdir under
benchmarks/results/workdirs/<suite>/, so an interrupted sweep resumes where it stopped
(stages resume inside a run; finished runs are read back). A row per value goes to
benchmarks/RESULTS.md (section utility-<suite>-<sweep>, plus -<views>-<hard> for a --variants
pair other than the suite's default), with where the hours go: the
synthesis optimisation (image-iterations per image, seconds), the per-view labelling (teacher
forward passes = images x view epochs, seconds), and the student's training seconds.
--plot draws test accuracy (real subset, synthetic per-view, synthetic hard) and the ratios
against the swept value.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import quality  # noqa: E402
from results_md import append_row  # noqa: E402

DEFAULT_VARIANTS = {'cifar10_cpu': ('classwise_views', 'classwise_hard'),
                    'digits': ('views', 'hard')}


def run_value(args, value: str, extra: list[str]) -> dict[str, dict]:
  """Runs (or reads back) the views and hard variants at SWEEP=value; {kind: result}."""
  sets = [f'{args.sweep}={value}', *extra]
  out = {}
  for kind, variant in zip(('views', 'hard'), args.variants.split(',')):
    tag = quality.variant_tag(variant, dict(s.split('=', 1) for s in sets))
    result_file = pathlib.Path(args.root).parent / f'quality-{args.suite}-{tag}.json'
    if not result_file.exists() or args.rerun:
      argv = [f'--suite={args.suite}', f'--variant={variant}', f'--root={args.root}',
              f'--cifar_root={args.cifar_root}'] + [f'--set={s}' for s in sets]
      if quality.main(argv) != 0:
        raise SystemExit(f'quality.py failed for {variant} at {args.sweep}={value}')
    out[kind] = json.loads(result_file.read_text())
  return out


def row(value: str, r: dict[str, dict]) -> tuple[list[str], dict]:
  v, h = r['views'], r['hard']
  n, iters = v['num_images'], v['iterations']
  label_s = v.get('view_label_seconds') or 0.0
  optimise_s = (v['synthesis_seconds'] or 0.0) - label_s
  f = quality.fmt
  point = {'value': value, 'images': n, 'iterations': iters,
           'real': v['real_subset_accuracy'], 'views': v['synthetic_accuracy'],
           'hard': h['synthetic_accuracy'], 'ratio_views': v['ratio'], 'ratio_hard': h['ratio'],
           'optimise_seconds': optimise_s, 'label_seconds': label_s,
           'student_seconds': v.get('student_seconds')}
  cells = [value, n, iters, f'{iters} ({f(optimise_s, "{:.0f}")} s)',
           f"{v.get('view_label_forward_passes') or 0} ({f(label_s, '{:.0f}')} s)",
           f(v.get('student_seconds'), '{:.0f}'), f(v['bn_loss_final'], '{:.2f}'),
           f(v['teacher_agreement'], '{:.3f}'), f(v['real_subset_accuracy']),
           f(v['synthetic_accuracy']), f(v['ratio'], '{:.3f}'), f(h['synthetic_accuracy']),
           f(h['ratio'], '{:.3f}')]
  return cells, point


def plot(points: list[dict], sweep: str, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  by_images = sweep.endswith('images_per_class')
  xs = [p['images'] if by_images else p['iterations'] for p in points]
  xlabel = 'synthetic images (= real-subset images)' if by_images else 'synthesis iterations'
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for key, marker, label in (('real', 'o-', 'real subset (same size, same recipe)'),
                             ('views', 's-', 'synthetic, per-view labels'),
                             ('hard', 'd-', 'synthetic, hard labels')):
    left.plot(xs, [100 * p[key] for p in points], marker, label=label)
  left.set(xscale='log', xlabel=xlabel, ylabel='test accuracy (%)', title=f'{title}: students')
  for key, marker, label in (('ratio_views', 's-', 'per-view labels'),
                             ('ratio_hard', 'd-', 'hard labels')):
    right.plot(xs, [p[key] for p in points], marker, label=label)
  right.set(xscale='log', ylim=(0, 1.05), xlabel=xlabel,
            ylabel='synthetic / real-subset accuracy', title=f'{title}: ratio')
  for ax in (left, right):
    ax.minorticks_off()
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--suite', required=True, choices=sorted(quality.SUITES))
  parser.add_argument('--sweep', required=True, help='the config key swept, e.g. '
                      'synthesis.iterations or synthesis.images_per_class')
  parser.add_argument('--values', required=True, help='comma list of values')
  parser.add_argument('--variants', default='',
                      help='VIEWS_VARIANT,HARD_VARIANT of quality.py (default per suite)')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='further overrides for every run')
  parser.add_argument('--root', default=str(REPO / 'benchmarks' / 'results' / 'workdirs'))
  parser.add_argument('--cifar_root', default='~/.cache/bnsynth/cifar10')
  parser.add_argument('--plot', default='', help='write the figure here (e.g. docs/scaling.png)')
  parser.add_argument('--rerun', action='store_true', help='run even where a result exists')
  parser.add_argument('--no_results_md', action='store_true')
  args = parser.parse_args(argv)
  args.variants = args.variants or ','.join(DEFAULT_VARIANTS[args.suite])
  if len(args.variants.split(',')) != 2:
    raise SystemExit('error: --variants takes two quality.py variants: per-view, hard')
  command = 'python benchmarks/utility.py ' + ' '.join(
      shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
  points = []
  for value in args.values.split(','):
    cells, point = row(value, run_value(args, value, args.set))
    points.append(point)
    print(json.dumps(point), flush=True)
    if not args.no_results_md:
      # Other variants than the suite's default pair get a section of their own.
      pair = ('' if args.variants == ','.join(DEFAULT_VARIANTS[args.suite]) else
              '-' + args.variants.replace(',', '-'))
      append_row(
          f'utility-{args.suite}-{args.sweep}{pair}',
          f'Utility sweep: {args.suite}, {args.sweep}' + (f', {args.variants}' if pair else '')
          + ''.join(f', {s}' for s in args.set),
          [args.sweep, 'images', 'iterations', 'image-its per image (optimise s)',
           'view-label forwards (s)', 'student s', 'BN loss end', 'teacher agreement',
           'real-subset acc', 'per-view acc', 'per-view ratio', 'hard acc', 'hard ratio',
           'command'], cells + [f'`{command}`'])
  if args.plot:
    plot(points, args.sweep, args.plot,
         args.suite + (f' ({args.variants})'
                       if args.variants != ','.join(DEFAULT_VARIANTS[args.suite]) else ''))
    print(f'wrote {args.plot}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
