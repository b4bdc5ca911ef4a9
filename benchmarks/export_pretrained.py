"""Copies a finished teacher artifact into pretrained/NAME with a README stating the command
that trained it, its config and its measured accuracy (read from the artifact's manifest and
the workdir's report.json, never typed in).

  python benchmarks/export_pretrained.py --workdir=runs/cifar10 --name=cifar10_resnet20 \
      --command="python -m bnsynth_jax.main --config=configs/cifar10.py:cpu --workdir=runs/cifar10 --stages=teacher"

A teacher fine-tuned from another (teacher.init_from) takes --command once per command, in order.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _total_epochs(folder: str, own_epochs: float) -> float:
  """Epochs behind a teacher folder, following its own init_from chain where it can be read."""
  path = pathlib.Path(folder)
  path = path if path.is_absolute() else REPO / path
  try:
    manifest = json.loads((path / 'manifest.json').read_text())
  except (OSError, ValueError):
    return own_epochs
  if not manifest.get('init_from'):
    return own_epochs
  return own_epochs + _total_epochs(manifest['init_from'], manifest['init_from_epochs'])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--name', required=True)
  parser.add_argument('--eval_config', default='configs/cifar10.py:cpu',
                      help='the config whose data the README\'s re-evaluation command uses')
  parser.add_argument('--command', required=True, action='append',
                      help='the exact command that trained it (repeat for a chain of runs)')
  args = parser.parse_args(argv)
  src = pathlib.Path(args.workdir) / 'teacher'
  manifest = json.loads((src / 'manifest.json').read_text())
  stage_config = json.loads((src / 'stage_config.json').read_text())
  dst = REPO / 'pretrained' / args.name
  dst.mkdir(parents=True, exist_ok=True)
  for f in ('variables.msgpack', 'manifest.json', 'stage_config.json'):
    shutil.copy(src / f, dst / f)
  metrics = json.loads((src / 'metrics.json').read_text()) if (src / 'metrics.json').exists() else {}
  history = '\n'.join(f"| {h['epoch']:.0f} | {100 * h['test_accuracy']:.2f}% |"
                      for h in metrics.get('history', []))
  size = (dst / 'variables.msgpack').stat().st_size
  m = manifest['model']
  commands = '\n'.join(args.command)
  started = ''
  if manifest.get('init_from'):
    before = _total_epochs(manifest['init_from'], manifest['init_from_epochs'])
    started = (f"- started from `{manifest['init_from']}` "
               f"({100 * manifest['init_from_test_accuracy']:.2f}% after "
               f"{before:.0f} epochs in all), then trained "
               f"{manifest.get('epochs', 0):.0f} more epochs "
               f"({before + manifest.get('epochs', 0):.0f} in all)\n")
  (dst / 'README.md').write_text(f"""# {args.name}

A {m['name']} teacher ({m['stem']} stem, {m['dtype']}) for {manifest['num_classes']} classes at
{'x'.join(map(str, manifest['image_shape']))}, trained by this project's own command{'s, in order' if len(args.command) > 1 else ''}:

```bash
{commands}
```

- test accuracy: **{100 * manifest['test_accuracy']:.2f}%** on the whole test split, measured
  by that command's teacher stage (`manifest.json` holds the exact value)
- training: {manifest.get('epochs', 0):.0f} epochs, {manifest.get('train_seconds', 0) / 3600:.2f} hours
  on the machine in `stage_config.json`'s run (2-core CPU)
{started}- files: `variables.msgpack` ({size / 1e6:.2f} MB, sha256 `{manifest['variables_sha256']}`),
  `manifest.json` (classes, normalisation, accuracy), `stage_config.json` (the full teacher config)

Test accuracy during training:

| epoch | test accuracy |
|---|---|
{history}

Re-evaluate it (imports it as the teacher stage and prints the accuracy):

```bash
python -m bnsynth_jax.main --config={args.eval_config} --workdir=/tmp/pretrained_eval \\
    --stages=teacher --config.teacher.pretrained=pretrained/{args.name}
```
""")
  print(f'exported {src} -> {dst} (test accuracy {manifest["test_accuracy"]:.4f})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
