"""Profiles the JAX synthesis step (jax.profiler trace -> xprof op statistics).

  python benchmarks/profile_synthesis.py --model=resnet20 --batch=128 [--top=25]

Prints the XLA operations (fusions, convolutions, thunks) that take the most time per
step, grouped by op family, so that an optimisation targets what the profile shows.
Needs the optional `xprof` package (pip install xprof) to read the trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import re
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
  parser.add_argument('--per_op', action='store_true',
                      help='list single XLA ops (convolution.12) instead of op families')
  args = parser.parse_args(argv)
  import jax
  import throughput
  logdir = tempfile.mkdtemp(prefix='bnsynth_profile_')
  # Build and warm up the step exactly as the benchmark does, then trace a few steps.
  run_one, _ = throughput.jax_synthesis(args.model, args.batch, args.dtype,
                                        throughput.IMAGE_SIZE.get(args.model, 32), 'global')
  for _ in range(2):
    run_one()
  with jax.profiler.trace(logdir):
    for _ in range(args.steps):
      run_one()
  from xprof.convert import raw_to_tool_data
  paths = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)
  # The trace viewer's events carry every XLA thunk / fused kernel with its duration on
  # CPU as well as on GPU/TPU (the op_stats tools come back empty for the CPU backend).
  data, _ = raw_to_tool_data.xspace_to_tool_data(paths, 'trace_viewer', {})
  trace = json.loads(data)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  skip = ('ThreadpoolListener', 'ThunkExecutor', '$', 'PjitFunction', 'CommonPjRt',
          'Handle inputs', 'TfrtCpu', 'PjRt')
  time_by_op, count_by_op = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e and not str(e.get('name', '')).startswith(skip):
      family = e['name'] if args.per_op else re.sub(r'[._]\d+$', '', e['name'])  # loop_fusion
      time_by_op[family] += float(e['dur'])
      count_by_op[family] += 1
  total = sum(time_by_op.values())
  if not total:
    print('error: the trace holds no op events; install xprof matching this jax version')
    return 1
  print(f'profile of {args.steps} steps, {args.model} batch {args.batch} {args.dtype}: '
        f'{total / 1e3 / args.steps:.1f} ms/step of op time (summed over threads)')
  for name, us in time_by_op.most_common(args.top):
    print(f'  {100 * us / total:5.1f}%  {us / 1e3 / args.steps:8.1f} ms/step  '
          f'{count_by_op[name] // args.steps:4d}x  {name[:80]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
