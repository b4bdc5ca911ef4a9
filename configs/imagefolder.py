"""A private image folder, ROOT/train/<class>/*.png and ROOT/test/<class>/*.png.

  python -m bnsynth_jax.main --config=configs/imagefolder.py --workdir=DIR \
      --config.data.root=/path/to/ROOT

Runs on any folder with >= 2 classes, any class count and any image size >= 8,
without other overrides. Values left at 0 here are derived before the first stage
(bnsynth_jax/preflight.py), logged as `preflight: derived ...` and recorded in each
stage's stage_config.json:
  data.image_size             the first image's shorter side, at most 64
  data.channels               1 if every class's first image is grayscale, else 3
  teacher/student.batch_size  up to 128, a multiple of the device count, <= the set
  synthesis.images_per_class  min(100, the smallest training class)
  synthesis.batch_size        the largest multiple of the class count up to 256 that
                              divides the synthetic set and the device count
Any of them can be set with --config.<key>=V. Files: png, jpg/jpeg, bmp, tif/tiff,
webp, gif (first frame); 16-bit and float images are scaled by their range (see
data.pixel_max), transparency is composited on data.alpha_background.
"""

from bnsynth_jax import config_lib


def get_config():
  c = config_lib.default_config()
  c.data.source = 'imagefolder'
  c.data.root = ''              # required: --config.data.root=/path/to/ROOT
  c.data.image_size = 0         # derived
  c.model.name = 'resnet20'
  c.teacher.batch_size = 0      # derived
  c.student.batch_size = 0      # derived
  c.stats.kind = 'classwise'
  s = c.synthesis
  s.images_per_class = 0        # derived
  s.batch_size = 0              # derived
  # Per-view soft labels (the best student in benchmarks/RESULTS.md): the teacher labels
  # each crop+flip the student will see, for every student epoch.
  s.view_epochs = int(c.student.epochs)
  c.student.labels = 'views'
  return c
