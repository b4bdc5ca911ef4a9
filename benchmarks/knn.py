"""Exact nearest-neighbour search at audit scale: Q queries against N database rows.

Times the audit's own sharded search (bnsynth_jax.audit.Database.search: pixel L2,
exact top-k) on real CIFAR-10 images, and appends a row to benchmarks/RESULTS.md.

  python benchmarks/knn.py --queries=50000 --database=50000 --k=5
  python benchmarks/knn.py --queries=2000 --check=200     # also verify 200 rows by NumPy

Reads the CIFAR-10 image folder (--cifar_root, default ~/.cache/bnsynth/cifar10): the
queries are the first Q training images in source order, the database the first N.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--queries', type=int, default=50000)
  parser.add_argument('--database', type=int, default=50000)
  parser.add_argument('--k', type=int, default=5)
  parser.add_argument('--block', type=int, default=512)
  parser.add_argument('--check', type=int, default=0, help='rows to verify with NumPy')
  parser.add_argument('--cifar_root', default='~/.cache/bnsynth/cifar10')
  parser.add_argument('--no_results_md', action='store_true')
  args = parser.parse_args(argv)
  command = 'python benchmarks/knn.py ' + ' '.join(
      shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax
  import numpy as np
  from bnsynth_jax import audit, config_lib, input_pipeline, parallel, sources
  from results_md import append_row
  cfg = config_lib.default_config().data
  cfg.update(source='imagefolder', root=os.path.expanduser(args.cifar_root))
  [train] = sources.create_source(cfg).load('train', [0], 1)
  n = max(args.queries, args.database)
  flat = train.images[:n].reshape(len(train.images[:n]), -1).astype(np.float32) / 255.0
  queries, database = flat[:args.queries], flat[:args.database]
  t0 = time.perf_counter()
  db = audit.Database(database, parallel.make_mesh())
  dist, idx = db.search(queries, args.k, 'l2', args.block)
  seconds = time.perf_counter() - t0
  flops = 2.0 * args.queries * args.database * queries.shape[1]
  checked = 'no'
  if args.check:
    rows = np.random.default_rng(0).choice(args.queries, args.check, replace=False)
    database64 = database.astype(np.float64)
    for r in rows:
      d = ((database64 - queries[r]) ** 2).sum(1)
      assert np.array_equal(np.sort(idx[r]), np.sort(np.argsort(d, kind='stable')[:args.k])), r
    checked = f'{args.check} rows equal NumPy'
  device = f'{jax.device_count()} x {jax.devices()[0].device_kind}'
  print(f'{args.queries} x {args.database} exact top-{args.k} (pixel L2, D={queries.shape[1]}): '
        f'{seconds:.1f} s, {flops / seconds / 1e9:.1f} GFLOP/s, {checked}')
  if not args.no_results_md:
    append_row('knn', 'Exact nearest neighbours (audit)', [
        'device', 'queries x database', 'k', 'seconds', 'GFLOP/s', 'verified', 'command'], [
        device, f'{args.queries} x {args.database} (D={queries.shape[1]})', args.k,
        f'{seconds:.1f}', f'{flops / seconds / 1e9:.1f}', checked, f'`{command}`'])
  return 0


if __name__ == '__main__':
  sys.exit(main())
