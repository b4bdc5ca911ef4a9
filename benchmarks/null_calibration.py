"""Is the canary audit's permutation null valid? Its p-values on simulated audits where the
scores do not depend on membership (a per-canary offset shared by the runs, independent
Gaussian noise per run and query) should be uniform: p <= a in about a share a of the audits.

  python benchmarks/null_calibration.py --audits=40 --shadows=16 --canaries=50 --permutations=19

Prints the mean p-value, the shares at or below 0.05 and 0.25, and the quartiles.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from bnsynth_jax import canary_attacks

FLAGS = flags.FLAGS
flags.DEFINE_integer('audits', 40, 'Simulated audits.')
flags.DEFINE_integer('shadows', 16, 'Runs M per audit.')
flags.DEFINE_integer('canaries', 50, 'Canaries K per audit.')
flags.DEFINE_integer('queries', 3, 'Queries A per canary.')
flags.DEFINE_integer('permutations', 19, 'Shuffles per audit.')


def simulated_p_value(seed: int) -> float:
  rng = np.random.default_rng(100 + seed)
  design = rng.random((FLAGS.shadows, FLAGS.canaries)) < 0.5
  shape = (FLAGS.shadows, FLAGS.canaries, FLAGS.queries)
  scores = {'student': rng.normal(0, 1, shape) + rng.normal(0, 1, (1, FLAGS.canaries, 1))}
  observed = canary_attacks.evaluate_attacks(scores, design, 0, 0)
  null = canary_attacks.permutation_null(scores, design, FLAGS.permutations, 0, 0, observed)
  return null['student']['p_value']


def main(argv):
  del argv
  p = np.array([simulated_p_value(r) for r in range(FLAGS.audits)])
  print(f'{len(p)} audits with no leak: mean p {p.mean():.3f}, p <= 0.05 in '
        f'{(p <= 0.05).mean():.1%}, p <= 0.25 in {(p <= 0.25).mean():.1%}, quartiles '
        f'{np.quantile(p, [0.25, 0.5, 0.75]).round(2).tolist()}')


if __name__ == '__main__':
  app.run(main)
