"""Canary audit: how much the whole pipeline leaks about its most exposed training records.

  python -m bnsynth_jax.canary --config=configs/digits.py --workdir=DIR \
      --canaries=50 --shadows=16 [--kind=mislabeled] [--adjacency=replace] [--config.x.y=v ...]

Published audits of synthetic-data pipelines (Aerni, Zhang and Tramer, CCS 2024;
ethz-spylab/misleading-privacy-evals) plant canaries -- mislabeled or out-of-distribution
training records, the ones a pipeline is most likely to leak -- and run many shadow
pipelines, each with a random half of the canaries, then attack each canary in each run.
Here:

1. K canaries are taken from the private train split (and removed from it): `mislabeled`
   keeps the image and plants a random wrong label; `noise` replaces the image by uniform
   noise with a random label (out of distribution). `--train_subset` shrinks the base set.
2. M shadow runs: canary k is IN exactly M/2 of them (a balanced random design). Run m is
   the whole pipeline (teacher -> stats -> synthesize -> student) on the base set plus its
   IN canaries, written as an image folder, with seed config.seed + m. Each run is an
   ordinary workdir, so it resumes like any pipeline run; `--shadow_ids` splits the runs
   between processes or machines.
3. Scores per canary and run, from what each pipeline produced: the logit margin
   (z_y - logsumexp of the others, y the planted label: the log-odds log p / (1 - p), the
   LiRA paper's statistic) of the synthetic-trained student (the release's consumer) and
   of the teacher (trained on the real data: the contrast that must show leakage; with
   --real_student also a student of the student's recipe trained on the run's real data),
   each on several queries of the canary (as it is and shifted by H/16 pixels four ways,
   and these mirrored where the model trained on mirrored views); and for the synthetic images themselves the negative pixel L2 distance from
   the canary to its nearest synthetic image, over all of them and over those of the
   planted class (no model involved).
4. Attacks: online LiRA (Carlini et al. 2022) -- per canary, Gaussians fitted to its IN
   and OUT scores in the other runs (leave the target run out), the log-likelihood ratio
   of the target run's score -- with one variance pooled over the canaries and with each
   canary's own, on the plain query and averaged over the queries; and the
   global-threshold attack on the raw score. AUC and TPR at 1% and 0.1% FPR, with
   bootstrap 95% intervals, by jax_privacy.auditing; per target the strongest attack (by
   TPR at 0.1% FPR) is reported as such.

   With --release_students=N (3 by default), N more students per run trained on the run's
   synthetic release with other seeds: the attacker holds the release and can train its own
   students; the mean margin of the audit's student and these N (target 'release') carries
   less of one student's training noise.
5. Lower bound (--adjacency=replace): an OUT run holds the canary's alternative record in
   its place (a mislabeled canary's source image with its true label), and every (run,
   canary) is IN with probability 1/2 independently, so IN and OUT differ by replacing one
   record -- the adjacency the DP guarantee is stated for. The one-run audit of Steinke,
   Nasr and Jagielski (2023; jax_privacy.auditing) then gives a lower bound on that
   epsilon at 95% confidence; each half of the runs is attacked with LiRA fitted on the
   other half only, so no guess sees its own bit. The default 'add_remove' (balanced
   design, canaries absent from OUT runs) reports only an indication.
6. The permutation null (--null_permutations=100): the same report with each canary's
   IN/OUT bits shuffled across the runs, every attack refitted and the strongest chosen
   again -- what this audit's size and its best-of-many-attacks choice give when nothing
   leaks (TPR at 0.1% FPR rests on the few highest OUT scores, so its interval is wide at
   chance), and the permutation p-value of what it observed.

A finished --adjacency=replace audit grows: the same command with a larger --shadows keeps
its runs and their scores and draws fresh fair coins for the new runs only (tighter
intervals for the cost of the new runs).

Output: DIR/canary_audit.json, DIR/canary_audit.md and DIR/canary_roc.png; each run's
scores in DIR/shadow_<m>/scores.npz (kept, so an interrupted audit rescored later only
trains what is missing).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bnsynth_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Pipeline config (configs/NAME.py).',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'Folder of the audit (shadow runs, scores, report).')
flags.DEFINE_integer('canaries', 50, 'Number of canaries K.')
flags.DEFINE_integer('shadows', 16, 'Number of shadow pipelines M (even).')
flags.DEFINE_enum('kind', 'mislabeled', ['mislabeled', 'noise'], 'Canary kind.')
flags.DEFINE_integer('train_subset', 0, 'Base train images kept (0 = all; a CPU-scale audit).')
flags.DEFINE_string('shadow_ids', '', 'Runs to train here, e.g. 0-7 (empty = all); the '
                    'report is written when every run has its scores.')
flags.DEFINE_integer('bootstrap', 200, 'Bootstrap resamples for the intervals.')
flags.DEFINE_integer('audit_seed', 0, 'Seed of the canary choice and the IN/OUT design.')
flags.DEFINE_enum('adjacency', 'add_remove', ['add_remove', 'replace'],
                  "How an OUT run differs from an IN run: 'add_remove' (the canary absent; a "
                  "balanced design) or 'replace' (the canary's alternative record in its place, "
                  'each (run, canary) IN independently: the adjacency of the DP guarantee, and '
                  'the one-run lower bound on its epsilon).')
flags.DEFINE_integer('release_students', 3, 'Students more per shadow run, trained on its '
                     'synthetic release with other seeds: the attacker holds the release, and '
                     "the mean of their margins (target 'release') has less of one student's "
                     'training noise. Added to finished runs without retraining them; 0 = none.')
flags.DEFINE_integer('null_permutations', 100, 'Shuffles of the IN/OUT design for the '
                     "report's permutation null: what the audit reports at chance, with its "
                     'choice of the strongest attack, and the p-value of what it observed '
                     '(0 = none).')
flags.DEFINE_bool('real_student', False, 'Also attack a student of the student recipe trained '
                  'on each run\'s real training data (its IN canaries included): the contrast '
                  'to the synthetic-trained student; one more real-data training per run, '
                  'added to finished runs without retraining them.')


def main(argv):
  from bnsynth_jax import canary_audit, metrics
  metrics.quiet_library_logs()
  if len(argv) > 1:
    print(f'error: unexpected arguments {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(2)
  try:
    if FLAGS.config is None or not FLAGS.workdir:
      raise UserError('--config and --workdir are required: e.g. --config=configs/digits.py '
                      '--workdir=/tmp/canary_audit')
    result = canary_audit.run(
        FLAGS.config, FLAGS.workdir, num_canaries=FLAGS.canaries, num_shadows=FLAGS.shadows,
        kind=FLAGS.kind, train_subset=FLAGS.train_subset, shadow_ids=FLAGS.shadow_ids,
        bootstrap=FLAGS.bootstrap, audit_seed=FLAGS.audit_seed,
        real_student=FLAGS.real_student, adjacency=FLAGS.adjacency,
        release_students=FLAGS.release_students, null_permutations=FLAGS.null_permutations)
  except UserError as e:
    for line in str(e).splitlines():
      print(f'error: {line}', file=sys.stderr, flush=True)
    sys.exit(2)
  if result is not None:
    print(result, flush=True)
  else:
    logging.info('canary audit: shadow runs %s done; run without --shadow_ids to report',
                 FLAGS.shadow_ids)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main)
