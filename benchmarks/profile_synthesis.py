"""Profiles the JAX synthesis step (jax.profiler trace -> xprof op statistics).

  python benchmarks/profile_synthesis.py --model=resnet20 --batch=128 [--top=25]

Prints the operations that take the most device time per step, grouped by HLO op
category and by op, so that an optimisation targets what the profile shows.
Needs the optional `xprof` package (pip install xprof) to read the trace.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='resnet20')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--top', type=int, default=25)
  args = parser.parse_args(argv)
  import jax
  import numpy as np
  import throughput
  ns = argparse.Namespace(warmup=2, steps=1, repeats=1)
  logdir = tempfile.mkdtemp(prefix='bnsynth_profile_')
  # Build and warm up the step exactly as the benchmark does, then trace a few steps.
  holder = {}

  def capture(run_one, warmup, steps, repeats):
    holder['run'] = run_one
    for _ in range(warmup):
      run_one()
    return 0.0
  throughput.time_steps, original = capture, throughput.time_steps
  throughput.jax_synthesis(args.model, args.batch, args.dtype,
                           throughput.IMAGE_SIZE.get(args.model, 32), 'global', ns)
  throughput.time_steps = original
  with jax.profiler.trace(logdir):
    for _ in range(args.steps):
      holder['run']()
  from xprof.convert import raw_to_tool_data
  paths = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)
  data, _ = raw_to_tool_data.xspace_to_tool_data(paths, 'framework_op_stats', {})
  table = json.loads(data)
  table = table[0] if isinstance(table, list) else table
  cols = [c['id'] if 'id' in c else c['label'] for c in table['cols']]
  rows = [[c['v'] if isinstance(c, dict) else c for c in r['c']] for r in table['rows']]
  idx = {c: i for i, c in enumerate(cols)}
  time_col = next(c for c in ('total_self_time', 'total_self_time_in_us') if c in idx)
  rows = [r for r in rows if r[idx.get('host_or_device', 0)] != 'Host'] or rows
  total = sum(float(r[idx[time_col]]) for r in rows)
  by_type = {}
  for r in rows:
    by_type[r[idx['type']]] = by_type.get(r[idx['type']], 0.0) + float(r[idx[time_col]])
  print(f'profile of {args.steps} steps, {args.model} batch {args.batch} {args.dtype}: '
        f'{total / 1e3 / args.steps:.1f} ms/step of op self-time')
  for t, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:12]:
    print(f'  {100 * v / total:5.1f}%  {t}')
  print('top ops:')
  for r in sorted(rows, key=lambda r: -float(r[idx[time_col]]))[:args.top]:
    print(f"  {100 * float(r[idx[time_col]]) / total:5.1f}%  {r[idx['type']]:<22} "
          f"{str(r[idx['operation']])[:90]}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
