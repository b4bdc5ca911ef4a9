"""A private image folder, ROOT/train/<class>/*.png and ROOT/test/<class>/*.png.

  python -m bnsynth_jax.main --config=configs/imagefolder.py --workdir=DIR \
      --config.data.root=/path/to/ROOT --config.data.image_size=32
"""

from bnsynth_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.data.source = 'imagefolder'
  c.data.root = ''              # required: --config.data.root=/path/to/ROOT
  c.data.image_size = 32
  c.model.name = 'resnet20'
  return c
