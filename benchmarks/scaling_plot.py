"""Draws the scaling curve (docs/scaling.png) from measured points: student accuracy against the
number of images, synthetic-trained and real-subset, one curve per recipe, and their ratio.

The points are the rows of benchmarks/RESULTS.md (each with the command that measured it); pass
them as `LABEL=IMAGES:SYNTHETIC:REAL,...` (accuracies as fractions):

  python benchmarks/scaling_plot.py --out=docs/scaling.png \
      --curve='optimiser, per-view labels=1000:0.3410:0.4632,2000:0.4118:0.6036' \
      --curve='generator, mixed-view labels=2000:0.7060:0.6036,5000:0.7057:0.6799'
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_curve(spec: str) -> tuple[str, list[tuple[int, float, float]]]:
  """'LABEL=N:S:R,N:S:R' -> (label, [(n, synthetic, real), ...]) sorted by n."""
  label, sep, body = spec.rpartition('=')
  if not sep or not label:
    raise ValueError(f'--curve {spec!r}: expected LABEL=IMAGES:SYNTHETIC:REAL,...')
  points = []
  for item in body.split(','):
    fields = item.split(':')
    if len(fields) != 3:
      raise ValueError(f'--curve {spec!r}: point {item!r} is not IMAGES:SYNTHETIC:REAL')
    try:
      n, synthetic, real = int(fields[0]), float(fields[1]), float(fields[2])
    except ValueError:
      raise ValueError(f'--curve {spec!r}: point {item!r} is not numbers') from None
    if not (0 < synthetic <= 1 and 0 < real <= 1):
      raise ValueError(f'--curve {spec!r}: accuracies are fractions in (0, 1], got {item!r}')
    points.append((n, synthetic, real))
  return label, sorted(points)


def plot(curves: list[tuple[str, list[tuple[int, float, float]]]], out: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for index, (label, points) in enumerate(curves):
    color = f'C{index}'
    ns = [p[0] for p in points]
    left.plot(ns, [100 * p[1] for p in points], 'o-', color=color, label=f'synthetic: {label}')
    left.plot(ns, [100 * p[2] for p in points], 's--', color=color, alpha=0.6,
              label=f'real subset ({label})')
    right.plot(ns, [p[1] / p[2] for p in points], 'o-', color=color, label=label)
  left.set(xscale='log', xlabel='images', ylabel='student test accuracy (%)',
           title='CIFAR-10: students by set size')
  right.axhline(1.0, color='grey', lw=0.8)
  right.set(xscale='log', xlabel='images', ylabel='synthetic / real subset',
            title='ratio to a real subset of the same size')
  left.legend(fontsize=7)
  right.legend(fontsize=7)
  fig.tight_layout()
  tmp = out + '.tmp.png'        # atomic: a reader never sees half a figure
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--curve', action='append', required=True,
                      help='LABEL=IMAGES:SYNTHETIC:REAL,... (repeat for several recipes)')
  parser.add_argument('--out', required=True, help='the PNG to write (e.g. docs/scaling.png)')
  args = parser.parse_args(argv)
  try:
    curves = [parse_curve(spec) for spec in args.curve]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  plot(curves, args.out)
  for label, points in curves:
    print(label + ': ' + ', '.join(f'{n}: {s / r:.3f}' for n, s, r in points))
  return 0


if __name__ == '__main__':
  sys.exit(main())
