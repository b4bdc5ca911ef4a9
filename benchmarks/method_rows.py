"""Rows for the synthesis-method and relabelling comparisons, read from finished workdirs.

Each workdir ran `python -m bnsynth_jax.main` (its command is in report.json); a variant that
reuses another's teacher, statistics or synthetic set copied those folders first (say so with
--copied_from, which goes into the row's command cell). One row per workdir: the synthesis
method and its compute (optimiser steps per image, image-iterations, seconds without the
per-view labelling), the relabel stage's forward passes and seconds, the student's labels,
seconds and test accuracy, and the ratio to a real-subset student's accuracy (--real: a
number, or a workdir whose evaluate stage trained one).

  python benchmarks/method_rows.py --section=methods-cifar10_cpu \
      --title='Synthesis methods and relabelling: cifar10_cpu' \
      --real=/work/runs/bench/workdirs/... --copied_from=W0 W1 W2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from results_md import append_row  # noqa: E402

HEADER = ['workdir', 'method', 'steps per image', 'image-iterations', 'synthesis s (no labelling)',
          'BN loss start -> end', 'teacher agreement', 'student labels',
          'relabel forwards (s)', 'student s', 'student accuracy', 'ratio to real subset',
          'command']


def real_accuracy(spec: str) -> float:
  try:
    return float(spec)
  except ValueError:
    report = json.loads((pathlib.Path(spec) / 'report.json').read_text())
    return float(report['evaluate']['real_subset']['test_accuracy'])


def synthesis_seconds(workdir: pathlib.Path) -> float:
  timings = json.loads((workdir / 'synthetic' / 'timings.json').read_text())
  return sum(t['seconds'] - t.get('view_label_seconds', 0.0) for t in timings.values())


def row(workdir: pathlib.Path, real: float, copied_from: str) -> list[str]:
  report = json.loads((workdir / 'report.json').read_text())
  s, relabel = report['synthesis'], report.get('relabel') or {}
  student = report['student']['synthetic']
  acc = float(report['evaluate']['synthetic']['test_accuracy'])
  command = report['environment'].get('command', '')
  if copied_from:
    command = f'{command} (the stages before its first copied from {copied_from})'
  forwards = (f"{relabel['forward_passes']} ({relabel['label_seconds']:.0f})"
              if relabel.get('epochs') else '—')
  return [workdir.name, s.get('method', 'pixels'), f"{s['iterations']:g}",
          f"{s['num_images'] * s['iterations']:.0f}", f'{synthesis_seconds(workdir):.0f}',
          f"{s['bn_loss_initial']:.2f} -> {s['bn_loss_final']:.2f}",
          f"{s['teacher_agreement']:.3f}", student['labels'], forwards,
          f"{student['train_seconds']:.0f}", f'{100 * acc:.2f}%', f'{acc / real:.3f}',
          f'`{command}`']


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--section', required=True)
  parser.add_argument('--title', required=True)
  parser.add_argument('--real', required=True,
                      help='the real-subset student accuracy (fraction) or a workdir with it')
  parser.add_argument('--copied_from', default='',
                      help='the workdir whose folders the variants copied (for the command)')
  parser.add_argument('workdirs', nargs='+')
  args = parser.parse_args(argv)
  real = real_accuracy(args.real)
  for w in args.workdirs:
    cells = row(pathlib.Path(w), real, args.copied_from if pathlib.Path(w).name != pathlib.Path(
        args.copied_from).name else '')
    append_row(args.section, args.title, HEADER, cells)
    print(' | '.join(cells[:-1]))
  return 0


if __name__ == '__main__':
  sys.exit(main())
