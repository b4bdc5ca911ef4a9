"""scikit-learn's bundled digits (1,797 real 8x8 images): the offline CPU demo.

  python -m bnsynth_jax.main --config=configs/digits.py --workdir=/tmp/bnsynth_digits
"""

from bnsynth_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.data.source = 'digits'
  c.model.name = 'resnet8'
  c.teacher.batch_size = 64
  c.teacher.epochs = 30
  c.teacher.learning_rate = 0.1
  c.teacher.crop_padding = 1
  c.teacher.flip = False          # a mirrored digit is another symbol
  c.teacher.eval_every_epochs = 10
  c.teacher.eval_batch_size = 120
  c.teacher.log_every_steps = 100
  return c
