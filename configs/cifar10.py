"""CIFAR-10. Two variants:

GPU / TPU (the design-card run: ResNet-18 teacher, TFDS cifar10):
  python -m bnsynth_jax.main --config=configs/cifar10.py --workdir=DIR \
      --config.data.data_dir=~/tensorflow_datasets

This 2-core CPU (ResNet-20 on the CIFAR-10 image folder, see ../shared/data/cifar10):
  python -m bnsynth_jax.main --config=configs/cifar10.py:cpu --workdir=DIR \
      --config.data.root=~/.cache/bnsynth/cifar10
"""

from bnsynth_jax import config_lib


def get_config(variant: str = 'gpu'):
  c = config_lib.default_config()
  if variant == 'gpu':
    c.data.source = 'tfds'
    c.data.name = 'cifar10'
    c.model.name = 'resnet18'
    c.model.stem = 'cifar'
    c.teacher.batch_size = 256
    c.teacher.epochs = 200
    c.teacher.learning_rate = 0.2
    c.teacher.weight_decay = 5e-4
    c.teacher.eval_every_epochs = 10
    c.teacher.checkpoint_every_steps = 1000
  elif variant == 'cpu':
    c.data.source = 'imagefolder'
    c.data.root = '~/.cache/bnsynth/cifar10'
    c.model.name = 'resnet20'
    c.teacher.batch_size = 128
    c.teacher.epochs = 30
    c.teacher.learning_rate = 0.1
    c.teacher.weight_decay = 5e-4
    c.teacher.eval_every_epochs = 5
    c.teacher.checkpoint_every_steps = 200
  else:
    raise ValueError(f'unknown cifar10 config variant {variant!r}: use gpu or cpu')
  return c
