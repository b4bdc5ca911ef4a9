"""Quality benchmark: the whole pipeline, synthetic-trained student vs the real-subset student.

Each (suite, variant) runs teacher -> stats -> synthesize -> student -> evaluate
(-> audit with --audit) in its own workdir, writes a results JSON and appends a row,
with the exact command, to benchmarks/RESULTS.md. Finished stages of sibling
workdirs whose recorded configuration is identical are reused (copied), so that a
variant that changes only the student does not synthesise again; one that changes only
the image count (the scaling curve) copies the batches a sibling made already
(synthesis.reuse_from: batch i does not depend on the image count).

  python benchmarks/quality.py --suite=digits --variant=views,hard,soft,global_hard
  python benchmarks/quality.py --suite=cifar10_cpu --variant=classwise_views --audit
  python benchmarks/quality.py --suite=digits --list
  python benchmarks/quality.py --suite=digits --variant=hard --set=synthesis.iterations=800

CIFAR-10 suites read the image folder given by --cifar_root (default
~/.cache/bnsynth/cifar10; unpack ../shared/data/cifar10/cifar10-jpeg.tar.gz there)
and import the committed teacher pretrained/cifar10_resnet20.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

SUITES = {
    'digits': {'config': 'configs/digits.py', 'overrides': {}},
    'cifar10_cpu': {
        'config': 'configs/cifar10.py:cpu',
        # The recipe these suites' rows measured (the variant's default before the generator
        # and mixed-view labels became it on 2026-12-02): the per-image optimiser, 500 steps.
        'overrides': {'teacher.pretrained': str(REPO / 'pretrained' / 'cifar10_resnet20'),
                      'synthesis.method': 'pixels', 'synthesis.iterations': 500,
                      'relabel.epochs': 0},
    },
}

# Variants: named override sets. Keep old names stable: RESULTS.md rows cite them.
VARIANTS = {
    'digits': {
        'views': {'student.labels': 'views'},
        'hard': {'student.labels': 'hard'},
        'soft': {'student.labels': 'soft'},
        'global_hard': {'stats.kind': 'global', 'student.labels': 'hard'},
        'global_views': {'stats.kind': 'global', 'student.labels': 'views'},
        # Ablation of synthesis and student levers, with hard labels (the hardest case).
        'hard_iters1500': {'student.labels': 'hard', 'synthesis.iterations': 1500},
        'hard_lr0.05': {'student.labels': 'hard', 'synthesis.learning_rate': 0.05},
        'hard_tv0.01': {'student.labels': 'hard', 'synthesis.tv_l2_weight': 0.01},
        'hard_bn10': {'student.labels': 'hard', 'synthesis.bn_weight': 10.0},
        'hard_first1': {'student.labels': 'hard', 'synthesis.first_bn_multiplier': 1.0},
        'hard_ce0': {'student.labels': 'hard', 'synthesis.ce_weight': 0.0},
        'hard_rrc': {'student.labels': 'hard', 'synthesis.augment': 'random_resized_crop',
                     'synthesis.rrc_min_scale': 0.6},
        'hard_ipc100': {'student.labels': 'hard', 'synthesis.images_per_class': 100,
                        'synthesis.batch_size': 100},
        'hard_mixup': {'student.labels': 'hard', 'student.mixup_alpha': 0.4},
        'hard_cutmix': {'student.labels': 'hard', 'student.cutmix_alpha': 1.0},
        'hard_ce0_mixup': {'student.labels': 'hard', 'synthesis.ce_weight': 0.0,
                           'student.mixup_alpha': 0.4},
        'hard_div1': {'student.labels': 'hard', 'synthesis.diversity_weight': 1.0},
        'hard_div5': {'student.labels': 'hard', 'synthesis.diversity_weight': 5.0},
    },
    'cifar10_cpu': {
        'classwise_views': {'student.labels': 'views'},
        'classwise_hard': {'student.labels': 'hard'},
        'classwise_soft': {'student.labels': 'soft'},
        'global_hard': {'stats.kind': 'global', 'student.labels': 'hard'},
        'global_views': {'stats.kind': 'global', 'student.labels': 'views'},
        # Student mixing on per-view labels (mixed targets = lambda-mix of the views' labels);
        # the real-subset baseline gets the same mixing (identical recipe).
        'classwise_views_cutmix': {'student.labels': 'views', 'student.cutmix_alpha': 1.0},
        'classwise_views_mixup': {'student.labels': 'views', 'student.mixup_alpha': 0.4},
        # No CE term during synthesis (class-wise BN matching alone; the best digits lever).
        'classwise_views_ce0': {'student.labels': 'views', 'synthesis.ce_weight': 0.0},
        # The hard-label synthesis levers below, with per-view labels (the default student):
        # a lever is adopted only if it does not cost the per-view student.
        'classwise_views_rrc': {'student.labels': 'views',
                                'synthesis.augment': 'random_resized_crop',
                                'synthesis.rrc_min_scale': 0.6},
        'classwise_views_div': {'student.labels': 'views', 'synthesis.diversity_weight': 1.0},
        # Hard-label levers (issue 12): each against classwise_hard. ADI needs a student to
        # compete with: --set synthesis.adi_weight=1 --set synthesis.adi_student=<a
        # finished classwise_hard workdir>/student/synthetic.
        'classwise_hard_rrc': {'student.labels': 'hard',
                               'synthesis.augment': 'random_resized_crop',
                               'synthesis.rrc_min_scale': 0.6},
        'classwise_hard_ce0': {'student.labels': 'hard', 'synthesis.ce_weight': 0.0},
        'classwise_hard_mixup': {'student.labels': 'hard', 'student.mixup_alpha': 0.4},
        'classwise_hard_cutmix': {'student.labels': 'hard', 'student.cutmix_alpha': 1.0},
        'classwise_hard_div': {'student.labels': 'hard', 'synthesis.diversity_weight': 1.0},
        # Two levers at once: no CE term in synthesis, mixup in the student (digits: 0.980).
        'classwise_hard_ce0_mixup': {'student.labels': 'hard', 'synthesis.ce_weight': 0.0,
                                     'student.mixup_alpha': 0.4},
        # More images at fewer iterations: 2.5x the images at 1/5 of the iterations (half
        # the synthesis compute; the real-subset baseline is then 5,000 images too).
        'classwise_hard_ipc500_it100': {'student.labels': 'hard',
                                        'synthesis.images_per_class': 500,
                                        'synthesis.iterations': 100},
    },
}


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', REPO / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config, overrides: dict[str, object]) -> None:
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('.')
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise SystemExit(f'error: unknown config key {dotted}')
    current = node[leaf]
    if current is None and isinstance(value, str):   # a placeholder: its declared type
      kind = node.get_ref(leaf).get_type()
      value = kind(value)
    elif isinstance(value, str) and not isinstance(current, str):
      if isinstance(current, bool):
        value = value.lower() in ('1', 'true', 'yes')
      elif isinstance(current, tuple):
        value = tuple(float(v) for v in value.strip('()').split(',') if v)
      else:
        value = type(current)(value)
    node[leaf] = value


def variant_name(variant: str, extra: dict[str, str]) -> str:
  """A variant with its --set overrides, as RESULTS.md names it."""
  return variant + ''.join(f'+{k}={v}' for k, v in sorted(extra.items()))


def variant_tag(variant: str, extra: dict[str, str]) -> str:
  """variant_name as its workdir and result file name (a path in an override must not nest
  folders)."""
  return variant_name(variant, extra).replace('/', '_')


def _same(a: dict, b: dict) -> bool:
  """Equal configurations; a key only one side has counts as equal when its value there is
  None (an option added since, at its default: e.g. student.seed), as the pipeline's resume
  check treats it."""
  a = {k: v for k, v in a.items() if k in b or v is not None}
  b = {k: v for k, v in b.items() if k in a or v is not None}
  return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def real_subset_fingerprint(config) -> dict:
  """What the real-subset baseline depends on (not the synthetic labels or synthesis)."""
  from bnsynth_jax import pipeline
  keep = ('seed', 'data.', 'model.', 'teacher.', 'student.', 'synthesis.images_per_class')
  flat = pipeline.stage_config(config, 'evaluate')
  return {k: v for k, v in flat.items()
          if k.startswith(keep) and k != 'student.labels'}


def reuse_finished_stages(root: pathlib.Path, workdir: pathlib.Path, config) -> None:
  """Copies, from sibling workdirs of the suite, every finished stage whose recorded
  configuration equals this variant's (and its report keys), so that e.g. a variant
  that only changes the student's labels reuses the synthetic dataset."""
  from bnsynth_jax import pipeline
  from bnsynth_jax.workdir import stage_dir
  siblings = [d for d in root.iterdir() if d.is_dir() and d != workdir] if root.exists() else []
  report_path = workdir / 'report.json'
  for stage in pipeline.NAMES:
    target = stage_dir(workdir, stage)
    if (target / 'manifest.json').exists():
      continue
    want = pipeline.stage_config(config, stage, workdir)
    for sib in siblings:
      src = stage_dir(sib, stage)
      record = src / 'stage_config.json'
      if (src / 'manifest.json').exists() and record.exists() and _same(
          json.loads(record.read_text()), want):
        if target.exists():
          shutil.rmtree(target)
        shutil.copytree(src, target, ignore=shutil.ignore_patterns('checkpoints', 'inflight'))
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        sib_report = json.loads((sib / 'report.json').read_text())
        for dotted in pipeline.BY_NAME[stage].report_keys:
          value = _get(sib_report, dotted)
          if value is not None:
            *parents, leaf = dotted.split('.')
            node = report
            for part in parents:
              node = node.setdefault(part, {})
            node[leaf] = value
        workdir.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2))
        print(f'reusing {stage} from {sib.name}', flush=True)
        break
    else:
      break   # a later stage cannot be reused if this one is not
  # A synthesis with another image count but otherwise the same: its batches are this run's
  # first ones (or all of them); synthesis.reuse_from copies them (the sibling with the most).
  if not (stage_dir(workdir, 'synthesize') / 'manifest.json').exists():
    from bnsynth_jax import synthesis
    want = pipeline.stage_config(config, 'synthesize', workdir)
    best, most = None, 0
    for sib in siblings:
      src = stage_dir(sib, 'synthesize')
      record = src / 'stage_config.json'
      count = len(list((src / 'shards').glob('shard-*.npz'))) if (src / 'shards').exists() else 0
      if count > most and record.exists() and not synthesis.reuse_differences(
          want, json.loads(record.read_text())):
        best, most = src, count
    if best is not None:
      config.synthesis.reuse_from = str(best)
      print(f'reusing {most} synthesis batches of {best.parent.name}', flush=True)
  # The real-subset baseline: the same recipe gives the same model; resume it at its end.
  fp = real_subset_fingerprint(config)
  target = stage_dir(workdir, 'evaluate') / 'real_subset'
  if not (target / 'checkpoints').exists():
    for sib in siblings:
      src = stage_dir(sib, 'evaluate') / 'real_subset'
      fp_file = sib / 'real_subset_fingerprint.json'
      if (src / 'manifest.json').exists() and fp_file.exists() and _same(
          json.loads(fp_file.read_text()), fp):
        shutil.copytree(src / 'checkpoints', target / 'checkpoints')
        shutil.copy(src / 'progress.json', target / 'progress.json')
        print(f'reusing the real-subset baseline from {sib.name}', flush=True)
        break
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'real_subset_fingerprint.json').write_text(json.dumps(fp, indent=2, default=str))


def summarise(report: dict) -> dict:
  g = lambda path, default=None: _get(report, path, default)
  return {
      'teacher_accuracy': g('teacher.test_accuracy'),
      'stats_kind': g('stats.kind'),
      'num_images': g('synthesis.num_images'),
      'iterations': g('synthesis.iterations'),
      'bn_loss_initial': g('synthesis.bn_loss_initial'),
      'bn_loss_final': g('synthesis.bn_loss_final'),
      'teacher_agreement': g('synthesis.teacher_agreement'),
      'image_iterations_per_second': g('synthesis.image_iterations_per_second'),
      'labels': g('student.synthetic.labels'),
      'synthetic_accuracy': g('evaluate.synthetic.test_accuracy'),
      'real_subset_accuracy': g('evaluate.real_subset.test_accuracy'),
      'ratio': g('evaluate.ratio'),
      'synthesis_seconds': g('synthesis.seconds'),
      'view_label_seconds': g('synthesis.view_label_seconds'),
      'view_label_forward_passes': g('synthesis.view_label_forward_passes'),
      'student_seconds': g('student.synthetic.train_seconds'),
      'audit': report.get('audit'),
  }


def _get(d, path, default=None):
  for part in path.split('.'):
    if not isinstance(d, dict) or part not in d:
      return default
    d = d[part]
  return d


def fmt(x, spec='{:.4f}'):
  return '—' if x is None else spec.format(x)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--suite', required=True, choices=sorted(SUITES))
  parser.add_argument('--variant', required=True, help='comma-separated variant names (--list)')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='extra config overrides (recorded in the command)')
  parser.add_argument('--root', default=str(REPO / 'benchmarks' / 'results' / 'workdirs'))
  parser.add_argument('--cifar_root', default='~/.cache/bnsynth/cifar10')
  parser.add_argument('--audit', action='store_true', help='also run the audit stage')
  parser.add_argument('--stages', default='',
                      help='run only these stages, e.g. teacher,stats,synthesize to prepare '
                      'the synthetic set while another process trains students; no result is '
                      'written unless evaluate runs')
  parser.add_argument('--list', action='store_true')
  parser.add_argument('--no_results_md', action='store_true', help='do not touch RESULTS.md')
  args = parser.parse_args(argv)
  if args.list:
    for name, overrides in VARIANTS[args.suite].items():
      print(f'{name}: {overrides}')
    return 0
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import logging
  logging.set_verbosity(logging.INFO)
  from bnsynth_jax import metrics, pipeline
  metrics.quiet_library_logs()
  from results_md import append_row

  command = 'python benchmarks/quality.py ' + ' '.join(
      shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
  suite = SUITES[args.suite]
  root = pathlib.Path(args.root) / args.suite
  extra = dict(kv.split('=', 1) for kv in args.set)
  for variant in args.variant.split(','):
    if variant not in VARIANTS[args.suite]:
      raise SystemExit(f'error: unknown variant {variant!r} for {args.suite}: '
                       f'{", ".join(VARIANTS[args.suite])}')
    config = load_config(suite['config'])
    if args.suite.startswith('cifar10'):
      config.data.root = os.path.expanduser(args.cifar_root)
    apply_overrides(config, {**suite['overrides'], **VARIANTS[args.suite][variant], **extra})
    tag, safe_tag = variant_name(variant, extra), variant_tag(variant, extra)
    workdir = root / safe_tag
    stages = args.stages or (
        'teacher,stats,synthesize,student,evaluate' + (',audit' if args.audit else ''))
    # The preflight first: the values it derives (image size, ...) are part of every stage's
    # recorded configuration, so siblings' stages only compare equal after it.
    prepared = pipeline.prepare(config, str(workdir), stages)
    reuse_finished_stages(root, workdir, config)
    t0 = time.time()
    report = pipeline.run(config, str(workdir), stages, prepared=prepared)
    if 'evaluate' not in stages.split(','):
      print(f'{tag}: ran {stages} in {workdir}; no result without the evaluate stage', flush=True)
      continue
    result = {'suite': args.suite, 'variant': tag, 'command': command,
              'overrides': {**VARIANTS[args.suite][variant], **extra},
              'wall_seconds': time.time() - t0, **summarise(report)}
    out = pathlib.Path(args.root).parent / f'quality-{args.suite}-{safe_tag}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != 'audit'}, indent=2, default=str))
    if not args.no_results_md:
      append_row(f'quality-{args.suite}', f'Quality: {args.suite}', [
          'variant', 'stats', 'images', 'iterations', 'labels', 'BN loss start -> end',
          'teacher agreement', 'teacher acc', 'real-subset student', 'synthetic student',
          'ratio', 'command'], [
          tag, result['stats_kind'], result['num_images'], result['iterations'],
          result['labels'],
          f"{fmt(result['bn_loss_initial'], '{:.2f}')} -> {fmt(result['bn_loss_final'], '{:.2f}')}",
          fmt(result['teacher_agreement'], '{:.3f}'), fmt(result['teacher_accuracy']),
          fmt(result['real_subset_accuracy']), fmt(result['synthetic_accuracy']),
          fmt(result['ratio'], '{:.3f}'), f'`{command}`'])
      audit = result.get('audit')
      if audit:
        g = lambda p: _get(audit, p)
        append_row(f'audit-{args.suite}', f'Privacy audit: {args.suite}', [
            'variant', 'NN SSIM max / p99 / p50', 'DCR p01 synthetic / holdout',
            'closer than holdout p01', 'MIA student AUC', 'student TPR@1%', 'MIA teacher AUC',
            'teacher TPR@1%', 'command'], [
            tag, f"{fmt(g('nn_ssim.max'), '{:.3f}')} / {fmt(g('nn_ssim.p99'), '{:.3f}')} / "
                 f"{fmt(g('nn_ssim.p50'), '{:.3f}')}",
            f"{fmt(g('dcr.synthetic_p01'), '{:.3f}')} / {fmt(g('dcr.holdout_p01'), '{:.3f}')}",
            g('synthetic_closer_than_holdout_p01'),
            fmt(g('mia.student.auc'), '{:.3f}'), fmt(g('mia.student.tpr_at_1pct_fpr'), '{:.3f}'),
            fmt(g('mia.teacher.auc'), '{:.3f}'), fmt(g('mia.teacher.tpr_at_1pct_fpr'), '{:.3f}'),
            f'`{command}`'])
  return 0


if __name__ == '__main__':
  sys.exit(main())
