"""The privacy-utility trade-off table and plot, from finished canary audits.

Each --audit=EPS:DIR is a folder written by `python -m bnsynth_jax.canary` (EPS 'inf' for the
non-DP pipeline); the accuracies are the means over its shadow pipelines. --reference=DIR is
a finished non-DP run of the same config with the evaluate stage: its real-subset student
(same size and recipe as the synthetic-trained one) is the denominator of the ratio.

  python benchmarks/privacy_tradeoff.py --dataset=digits \
      --audit=inf:/work/runs/canary/digits_nondp --audit=8:/work/runs/canary/digits_eps8 \
      --audit=1:/work/runs/canary/digits_eps1 --reference=/work/runs/digits_reference \
      --plot=docs/privacy_utility.png

--run=EPS:DIR adds a row from one finished pipeline run (`python -m bnsynth_jax.main`, with
the evaluate stage) where an audit of 16+ shadow pipelines is more CPU than the scale allows
(CIFAR-10 in DP mode here): its teacher and student accuracies, no canary figures.

Writes one RESULTS.md row per audit or run (section privacy_tradeoff_<dataset>) and the plot.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_md  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('dataset', 'digits', 'Name used in the RESULTS.md section and the plot.')
flags.DEFINE_multi_string('audit', [], 'EPS:DIR of a finished canary audit (EPS inf = no DP).')
flags.DEFINE_multi_string('run', [], 'EPS:DIR of a finished pipeline run with evaluate (no '
                          'canary audit: accuracies only).')
flags.DEFINE_string('reference', '', 'A finished non-DP run of the config with evaluate.')
flags.DEFINE_string('plot', '', 'Where to write the plot (e.g. docs/privacy_utility.png).')
flags.DEFINE_bool('write_results', True, 'Append the rows to benchmarks/RESULTS.md.')

HEADER = ['requested epsilon', 'achieved (epsilon, delta)', 'teacher accuracy',
          'synthetic-trained student accuracy', 'ratio to real subset',
          'canary TPR @ 0.1% FPR: student', 'synthetic images', 'teacher',
          'shadows x canaries', 'command']


def _privacy_cell(p: dict | None) -> str:
  return f"({p['epsilon']:.3g}, {p['delta']:g})" if p else 'not DP'


def _row(eps_text: str, folder: pathlib.Path, real_subset: float | None) -> tuple[list, dict]:
  audit = json.loads((folder / 'canary_audit.json').read_text())
  acc = audit['test_accuracy']
  p = audit.get('privacy')
  attacks = audit['attacks']
  # The strongest attack per target (audits before it was reported: the pooled LiRA).
  tpr = {t: attacks[t].get('strongest', attacks[t]['lira'])['tpr_at_0.001_fpr']
         for t in ('student', 'synthetic_nn', 'teacher')}

  null = audit.get('null', {})

  def fmt(m, target=None):
    ci = m.get('ci95')
    text = f"{100 * m['value']:.1f}%" + (f' [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]' if ci else '')
    return text + _null_note(null.get(target))

  ratio = acc['student']['mean'] / real_subset if real_subset else None
  s = audit['settings']
  student_cell = fmt(tpr['student'], 'student')
  if 'release' in attacks:        # audits since 2026-12-05: the release's students, averaged
    release = attacks['release']['strongest']['tpr_at_0.001_fpr']
    student_cell = (f"{fmt(release, 'release')} (release, {audit['release_students'] + 1} "
                    f'students); one student {student_cell}')
    tpr['student'] = max(tpr['student'], release, key=lambda m: m['value'])
  bound = audit.get('lower_bound', {}).get('release') or audit.get('lower_bound', {}).get(
      'student')
  if bound:
    student_cell += f"; replace-one epsilon >= {bound['value']:.2f} (95%)"
  row = [eps_text, _privacy_cell(p),
         f"{100 * acc['teacher']['mean']:.2f}%", f"{100 * acc['student']['mean']:.2f}%",
         f'{ratio:.3f}' if ratio else '—', student_cell, fmt(tpr['synthetic_nn'], 'synthetic_nn'),
         fmt(tpr['teacher'], 'teacher'), f"{s['shadows']} x {s['canaries']} {s['kind']}"
         + (f" (grown from {audit['extended_from'][0]})" if audit.get('extended_from') else ''),
         f"`{audit['command']}`"]
  point = {'epsilon': p['epsilon'] if p else math.inf, 'teacher': acc['teacher']['mean'],
           'student': acc['student']['mean'], 'ratio': ratio,
           'tpr_student': tpr['student']['value'], 'tpr_teacher': tpr['teacher']['value'],
           'tpr_synthetic': tpr['synthetic_nn']['value']}
  return row, point


def _null_note(z: dict | None) -> str:
  """What the audit's permutation null says of a cell (audits since 2026-12-06)."""
  if not z:
    return ''
  upper = (f"upper end {100 * z['upper_median']:.1f}% median, {100 * z['upper_95th']:.1f}% "
           '95th; ' if 'upper_median' in z else '')
  return f" (at chance: {upper}p {z['p_value']:.2f})"


def _run_row(eps_text: str, folder: pathlib.Path, real_subset: float | None) -> tuple[list, dict]:
  """A row from one pipeline run: accuracies and the privacy record, no canary audit."""
  report = json.loads((folder / 'report.json').read_text())
  if 'evaluate' not in report:
    raise SystemExit(f'{folder}/report.json has no evaluate stage: run the pipeline with '
                     'evaluate (the default stages) before adding it with --run')
  p = report.get('privacy')
  teacher = report['teacher']['test_accuracy']
  student = report['evaluate']['synthetic']['test_accuracy']
  real_subset = real_subset or report['evaluate'].get('real_subset', {}).get('test_accuracy')
  ratio = student / real_subset if real_subset else None
  command = report.get('environment', {}).get('command') or \
      f'python -m bnsynth_jax.main --workdir={folder} (see its report.json config)'
  missing = 'not audited (one run)'
  row = [eps_text, _privacy_cell(p),
         f'{100 * teacher:.2f}%', f'{100 * student:.2f}%', f'{ratio:.3f}' if ratio else '—',
         missing, missing, missing, '1 run, no canaries', f'`{command}`']
  nan = float('nan')
  point = {'epsilon': p['epsilon'] if p else math.inf, 'teacher': teacher, 'student': student,
           'ratio': ratio, 'tpr_student': nan, 'tpr_teacher': nan, 'tpr_synthetic': nan}
  return row, point


def _plot(points: list[dict], path: str, dataset: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  points = sorted(points, key=lambda q: q['epsilon'])
  finite = [q['epsilon'] for q in points if math.isfinite(q['epsilon'])]
  inf_x = (max(finite) * 3) if finite else 1.0
  xs = [q['epsilon'] if math.isfinite(q['epsilon']) else inf_x for q in points]
  labels = [f"{q['epsilon']:.2g}" if math.isfinite(q['epsilon']) else 'no DP' for q in points]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  left.plot(xs, [100 * q['teacher'] for q in points], 'o-', label='teacher')
  left.plot(xs, [100 * q['student'] for q in points], 's-', label='synthetic-trained student')
  left.set(xscale='log', xlabel='epsilon (delta 1e-5)', ylabel='test accuracy (%)',
           title=f'{dataset}: utility')
  floor = 0.05      # percent: a log axis, zero drawn at its bottom
  for key, marker, label in (('tpr_student', 's-', 'student (or release)'),
                             ('tpr_synthetic', 'd-', 'synthetic images'),
                             ('tpr_teacher', 'o-', 'teacher')):
    audited = [(x, q[key]) for x, q in zip(xs, points) if math.isfinite(q[key])]
    if audited:   # single runs (--run) have no canary figures
      right.plot([x for x, _ in audited], [max(100 * v, floor) for _, v in audited], marker,
                 label=label)
  right.axhline(0.1, color='k', ls=':', label='chance (0.1%)')
  right.set(xscale='log', yscale='log', ylim=(floor, 100), xlabel='epsilon (delta 1e-5)',
            ylabel='canary TPR at 0.1% FPR (%)', title=f'{dataset}: canary audit (LiRA)')
  for ax in (left, right):
    ax.set_xticks(xs, labels)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  real_subset = None
  if FLAGS.reference:
    report = json.loads((pathlib.Path(FLAGS.reference) / 'report.json').read_text())
    real_subset = report['evaluate']['real_subset']['test_accuracy']
  points = []
  specs = [(_row, spec) for spec in FLAGS.audit] + [(_run_row, spec) for spec in FLAGS.run]
  for make_row, spec in specs:
    eps_text, folder = spec.split(':', 1)
    row, point = make_row(eps_text, pathlib.Path(folder), real_subset)
    points.append(point)
    print(' | '.join(row[:-1]))
    if FLAGS.write_results:
      results_md.append_row(f'privacy_tradeoff_{FLAGS.dataset}',
                            f'Privacy-utility trade-off: {FLAGS.dataset}', HEADER, row)
  if FLAGS.plot and points:
    _plot(points, FLAGS.plot, FLAGS.dataset)
    print(f'plot: {FLAGS.plot}')


if __name__ == '__main__':
  app.run(main)
