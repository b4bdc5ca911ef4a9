"""digits in DP mode: (epsilon, delta) = (8, 1e-5) for the whole release by default.

  python -m bnsynth_jax.main --config=configs/digits_dp.py --workdir=/tmp/bnsynth_digits_dp
  python -m bnsynth_jax.main --config=configs/digits_dp.py --config.privacy.epsilon=1 ...

The digits config with a GroupNorm + weight-standardised teacher trained by DP-SGD and
noised class-wise statistics (bnsynth_jax/privacy.py). DP-SGD on 1,438 training images is
hard: large batches and few steps spend the budget best (measured on digits at epsilon 8,
batch 256 x 40 epochs gave 26% test accuracy, 512 x 60 epochs 37%, 1024 x 80 epochs: see
docs/privacy.md, which has the trade-off over epsilon with the canary audit).
"""

from bnsynth_jax.configs import digits


def get_config():
  c = digits.get_config()
  c.model.norm = 'group'
  c.privacy.epsilon = 8.0
  c.privacy.delta = 1e-5
  t = c.teacher
  t.batch_size = 512
  t.epochs = 60
  t.learning_rate = 1.0
  t.weight_decay = 0.0          # the noise regularises; decay only shrinks the signal
  t.warmup_epochs = 2
  t.eval_every_epochs = 20
  return c
