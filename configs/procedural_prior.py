"""The data-free prior: a teacher trained on generated glyph images only (no data at all).

  python -m bnsynth_jax.main --config=configs/procedural_prior.py:digits \
      --workdir=/tmp/prior_digits --stages=teacher
  python -m bnsynth_jax.main --config=configs/digits_dp.py --workdir=/tmp/digits_dp_prior \
      --config.privacy.prior=/tmp/prior_digits/teacher --config.privacy.prior_is_public=True

The images come from bnsynth_jax/procedural.py (random Bezier-stroke glyphs, one class per
glyph, jittered; colour over dead-leaves backgrounds for 3 channels): public by
construction, so the teacher folder is a prior that DP mode fine-tunes at no privacy cost.
Variants: `digits` (8x8x1, the digits DP teacher's resnet8 with GroupNorm) and `cifar10`
(32x32x3, resnet20 with GroupNorm). The architecture and shape must be the DP config's.
"""

from bnsynth_jax import config_lib

SHAPES = {'digits': (8, 1, 'resnet8'), 'cifar10': (32, 3, 'resnet20')}


def get_config(variant: str = 'digits'):
  if variant not in SHAPES:
    raise ValueError(f'unknown variant {variant!r}: use one of {", ".join(SHAPES)}')
  size, channels, model = SHAPES[variant]
  c = config_lib.default_config()
  d = c.data
  d.source = 'procedural'
  d.image_size, d.channels = size, channels
  d.procedural_classes = 64
  d.procedural_per_class = 100
  d.procedural_seed = 1
  d.mean, d.std = (0.5,) * channels, (0.5,) * channels     # the DP configs' public constants
  c.model.name = model
  c.model.norm = 'group'
  t = c.teacher
  t.batch_size = 128
  t.epochs = 15
  t.learning_rate = 0.1
  t.crop_padding = 1 if size == 8 else 4
  t.flip = False
  t.eval_every_epochs = 5
  t.eval_batch_size = 500
  t.log_every_steps = 50
  return c
