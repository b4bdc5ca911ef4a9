"""report.json (machine-readable, the design.md contract) and report.md (for people).

Every stage merges its keys into WORKDIR/report.json through `update`; the file
is rewritten atomically and only by process 0.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import numpy as np

import jax

from bnsynth_jax import fileio


def _merge(base: dict, new: Mapping[str, Any]) -> dict:
  for key, value in new.items():
    if isinstance(value, Mapping) and isinstance(base.get(key), dict):
      _merge(base[key], value)
    else:
      base[key] = dict(value) if isinstance(value, Mapping) else value
  return base


def load(workdir) -> dict:
  path = fileio.path(workdir) / 'report.json'
  return fileio.read_json(path) if path.exists() else {}


def update(workdir, values: Mapping[str, Any]) -> dict:
  """Deep-merges `values` into report.json and returns the whole report."""
  report = _merge(load(workdir), values)
  if jax.process_index() == 0:
    fileio.atomic_write_json(fileio.path(workdir) / 'report.json', report)
  return report


def remove_keys(workdir, dotted_keys: list[str]) -> None:
  """Removes keys given as dot-paths (e.g. 'evaluate.ratio') from report.json."""
  report = load(workdir)
  changed = False
  for dotted in dotted_keys:
    *parents, leaf = dotted.split('.')
    node = get(report, '.'.join(parents)) if parents else report
    if isinstance(node, dict) and leaf in node:
      del node[leaf]
      changed = True
  if changed and jax.process_index() == 0:
    fileio.atomic_write_json(fileio.path(workdir) / 'report.json', report)


def get(report: Mapping[str, Any], dotted: str, default=None):
  node: Any = report
  for part in dotted.split('.'):
    if not isinstance(node, Mapping) or part not in node:
      return default
    node = node[part]
  return node


def image_grid(images: np.ndarray, rows: int, cols: int, pad: int = 1,
               scale: int = 1) -> np.ndarray:
  """[rows*cols, H, W, C] uint8 -> one uint8 picture (missing cells stay white)."""
  n, h, w, c = images.shape
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for k in range(min(n, rows * cols)):
    r, q = divmod(k, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + q * (w + pad):pad + q * (w + pad) + w] = images[k]
  if scale > 1:
    grid = grid.repeat(scale, 0).repeat(scale, 1)
  return grid


def write_png(target, picture: np.ndarray) -> None:
  import io
  from PIL import Image
  arr = picture[..., 0] if picture.shape[-1] == 1 else picture
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  fileio.atomic_write_bytes(target, buf.getvalue())


def write_class_grid(target, images: np.ndarray, labels: np.ndarray, num_classes: int,
                     per_class: int = 10) -> None:
  """One row per class, `per_class` samples each (the first ones of that class)."""
  h = images.shape[1]
  cells = np.full((num_classes * per_class, *images.shape[1:]), 255, np.uint8)
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)[:per_class]
    cells[c * per_class:c * per_class + len(idx)] = images[idx]
  scale = max(1, 64 // h)   # small images (8x8 digits) are enlarged to be visible
  write_png(target, image_grid(cells, num_classes, per_class, scale=scale))


def _pct(x) -> str:
  return '—' if x is None else f'{100 * x:.2f}%'


def _num(x, fmt='{:.4g}') -> str:
  return '—' if x is None else fmt.format(x)


def utility_table(r: Mapping[str, Any]) -> str:
  """The paper's table: teacher / real-subset student / synthetic student."""
  rows = ['| model | trained on | images | test accuracy | ratio to real subset |',
          '|---|---|---|---|---|']
  if 'teacher' in r:
    rows.append(f"| teacher | private train split | {get(r, 'teacher.train_examples', '—')} | "
                f"{_pct(get(r, 'teacher.test_accuracy'))} | |")
  real = get(r, 'evaluate.real_subset')
  if real:
    rows.append(f"| student ({real.get('model')}) | real subset, "
                f"{real.get('images_per_class')} per class | {real.get('num_images')} | "
                f"{_pct(real.get('test_accuracy'))} | 1.000 |")
  synth = get(r, 'student.synthetic')
  accuracy = get(r, 'evaluate.synthetic.test_accuracy')
  if synth and accuracy is not None:
    kind = get(r, 'synthesis.stats_kind', '')
    rows.append(f"| student ({synth.get('model')}) | synthetic ({kind} statistics, "
                f"{synth.get('labels')} labels) | {synth.get('num_images')} | "
                f"{_pct(accuracy)} | {_num(get(r, 'evaluate.ratio'), '{:.3f}')} |")
  full = get(r, 'evaluate.full_real')
  if full:
    rows.append(f"| student ({full.get('model')}) | whole real train split | "
                f"{full.get('num_images')} | {_pct(full.get('test_accuracy'))} | |")
  return '\n'.join(rows)


def audit_table(r: Mapping[str, Any]) -> str:
  a = r.get('audit')
  if not a:
    return ''
  rows = ['| attack target | strongest attack | AUC [95% CI] | TPR @ 1% FPR | TPR @ 0.1% FPR |',
          '|---|---|---|---|---|']
  for who in ('teacher', 'student', 'real_subset'):
    m = get(a, f'mia.{who}')
    if m:
      ci = m.get('auc_ci95')
      auc = _num(m.get('auc'), '{:.3f}') + (f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '')
      rows.append(f"| {who} | {m.get('attack', '—')} | {auc} | {_pct(m.get('tpr_at_1pct_fpr'))} | "
                  f"{_pct(m.get('tpr_at_0p1pct_fpr'))} |")
  return '\n'.join(rows)


NOT_DP_WARNING = (
    'This run is **not differentially private** (privacy.epsilon=0). The membership audit '
    'below attacks random training images, the easiest records to hide: a canary audit of '
    'this pipeline (`python -m bnsynth_jax.canary`, results in docs/privacy.md) finds that '
    'mislabeled training images *do* leak through the synthetic set and the student trained '
    'on it. Before releasing data about people, run with --config.privacy.epsilon.')


PROTECTED = ('It protects each record of the **training split** (replace-one adjacency). The '
             'test split, the real-data baselines and the audit are not covered: they are the '
             'data owner\'s (report.md, evaluate/, audit/, .owner/).')
OWNER_ONLY_NOTE = ('**Owner only — do not release.** This report holds results computed on the '
                   'private data outside the DP mechanisms (test accuracies, the real-data '
                   'baselines, the audit with pictures of private images). The releasable '
                   'report is [release_report.md](release_report.md).')
RELEASE_NOTE = ('**Releasable.** Everything here is computed from the two DP releases (the '
                'DP-SGD teacher and the noised statistics) or is public configuration.')


def privacy_section(r: Mapping[str, Any]) -> list[str]:
  """The (epsilon, delta) of a DP run and what it covers, or the warning that there is none."""
  p = r.get('privacy')
  if not p:
    return ['## Differential privacy', '', NOT_DP_WARNING, ''] if (
        'synthesis' in r or 'audit' in r) else []
  t, s = p['teacher'], p['stats']
  clip = s.get('clip_norm')
  clip = f'{clip:.4g}' if isinstance(clip, (int, float)) else clip
  out = ['## Differential privacy', '']
  if not p.get('private', True):
    out += [f"- **NOT PRIVATE**: {p.get('not_private_because', 'privacy.noise_seed was set')}"]
  out += [
      f"- **(epsilon {p['epsilon']:.3g}, delta {p['delta']:g})** for the release: the teacher's "
      'weights, the class-wise statistics, and everything computed from them alone (synthetic '
      f"images, labels, students) (requested epsilon {p['target_epsilon']:g}); {p['accountant']}",
      f'- {PROTECTED}',
      f"- teacher: {t['mechanism']}; noise multiplier {t['noise_multiplier']:.4g}, "
      + (f"clip norm {t['clip_norm']:g}, {t['steps']} steps of {t['batch_size']} (sampling "
         f"rate {t['sampling_rate']:.4g})" if 'steps' in t else
         f"sensitivity {t['sensitivity']:g}, one release")
      + f", epsilon alone {t['epsilon_alone']:.3g}",
      f"- class-wise statistics: {s['mechanism']}; noise multiplier "
      f"{s['noise_multiplier']:.4g}, clip norm {clip}, epsilon alone {s['epsilon_alone']:.3g}",
      f"- {p['post_processing']}: post-processing, no further privacy cost"]
  if p.get('inherited_from'):
    out += [f"- this workdir post-processes the DP release of {p['inherited_from']} "
            '(synthesis.stats_dir; its privacy ledger is with it): no further privacy cost']
  c = p.get('cumulative')
  if c:
    out += [f"- privacy ledger (privacy_ledger.json): {c['releases']} DP release(s) from this "
            f"workdir, cumulative **epsilon {c['epsilon']:.3g}** at delta {c['delta']:g}"]
  return out + ['']


def _synthesis_section(r: Mapping[str, Any]) -> list[str]:
  s = r.get('synthesis')
  if not s:
    return []
  return ['## Synthesis', '',
          f"- {s['num_images']} images, {s['iterations']} iterations per batch, "
          f"{s.get('stats_kind')} statistics, scope {s.get('stats_scope')}, {s.get('dtype')}",
          f"- BN loss {s['bn_loss_initial']:.4f} (noise) -> {s['bn_loss_final']:.4f} (released "
          'uint8 images)',
          f"- teacher agreement {_pct(s['teacher_agreement'])}, mean teacher confidence "
          f"{_pct(s.get('mean_confidence'))}",
          f"- {_num(s.get('image_iterations_per_second'), '{:.1f}')} image-iterations/s",
          '', '![synthetic samples, one row per class](synthetic/samples.png)', '']


RELEASE_KEYS = ('synthesis', 'privacy', 'stats')


def release_record(r: Mapping[str, Any]) -> dict[str, Any]:
  """DP mode: the part of report.json that may be released (release_report.json)."""
  return {'releasable': True, **{k: r[k] for k in RELEASE_KEYS if k in r}}


def release_markdown(r: Mapping[str, Any]) -> str:
  """DP mode: release_report.md, the report that goes with the synthetic set."""
  return '\n'.join(['# bnsynth release report', '', RELEASE_NOTE, '']
                    + _synthesis_section(r) + privacy_section(r))


def markdown(r: Mapping[str, Any]) -> str:
  out = ['# bnsynth report', '']
  if r.get('privacy'):
    out += [OWNER_ONLY_NOTE, '']
  if any(k in r for k in ('teacher', 'student')):
    out += ['## Utility (real test split)', '', utility_table(r), '']
  out += _synthesis_section(r)
  out += privacy_section(r)
  a = r.get('audit')
  if a:
    out += ['## Privacy audit', '']
    ssim = a.get('nn_ssim', {})
    dcr = a.get('dcr', {})
    out += [f"- SSIM to the nearest private image: max {_num(ssim.get('max'), '{:.3f}')}, "
            f"p99 {_num(ssim.get('p99'), '{:.3f}')}, median {_num(ssim.get('p50'), '{:.3f}')}",
            f"- distance to closest record, 1st percentile: synthetic "
            f"{_num(dcr.get('synthetic_p01'))}, real holdout {_num(dcr.get('holdout_p01'))}; "
            f"synthetic images closer than that holdout percentile: "
            f"{a.get('synthetic_closer_than_holdout_p01', '—')}", '',
            audit_table(r), '']
    for picture, caption in (('audit/most_similar.png', 'most similar synthetic/private pairs'),
                             ('audit/random_pairs.png', 'random synthetic images and their '
                              'nearest private image'),
                             ('audit/dcr.png', 'distance to closest record: synthetic vs holdout'),
                             ('audit/roc.png', 'ROC curves')):
      out += [f'![{caption}]({picture})', '']
  t = r.get('timings')
  if t:
    out += ['## Timings (seconds, last run of each stage)', '', '| stage | seconds |', '|---|---|']
    out += [f'| {k.replace("_seconds", "")} | {v:.1f} |' for k, v in t.items()]
    out += ['']
  env = r.get('environment')
  if env:
    out += ['## Environment', '', '```', fileio.to_json(env).strip(), '```', '']
  return '\n'.join(out)


def write_markdown(workdir) -> str:
  """report.md; in DP mode also the releasable release_report.md and release_report.json."""
  r = load(workdir)
  text = markdown(r)
  if jax.process_index() == 0:
    fileio.atomic_write_text(fileio.path(workdir) / 'report.md', text)
    if r.get('privacy'):
      fileio.atomic_write_text(fileio.path(workdir) / 'release_report.md', release_markdown(r))
      fileio.atomic_write_json(fileio.path(workdir) / 'release_report.json', release_record(r))
  return text


def format_command(head: str, args: list[str], drop: tuple[str, ...] = ()) -> str:
  """`head` and shell-quoted `args`, without the flags named in `drop` (--flag=v or --flag v)."""
  import shlex
  kept, skip = [], False
  for a in args:
    if skip:
      skip = False
    elif a in drop:
      skip = True
    elif a.split('=', 1)[0] not in drop:
      kept.append(shlex.quote(a))
  return ' '.join([head] + kept)


def command_line() -> str:
  """This process's command line as a user would type it (`python -m bnsynth_jax.main ...`)."""
  import shlex
  import sys
  script = pathlib.Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
  if script is not None and script.parent.name == 'bnsynth_jax':
    head = f'python -m bnsynth_jax.{script.stem}'
  else:
    head = 'python ' + (shlex.quote(sys.argv[0]) if script is not None else '-c ...')
  return format_command(head, sys.argv[1:])


def environment() -> dict[str, Any]:
  import platform
  from importlib import metadata
  versions = {}
  for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'ml-collections',
              'tensorflow', 'tensorflow-cpu', 'tensorflow-datasets'):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  d = jax.devices()[0]
  return {'command': command_line(), 'python': platform.python_version(), 'packages': versions,
          'device_kind': d.device_kind, 'platform': d.platform,
          'device_count': jax.device_count(), 'process_count': jax.process_count()}
