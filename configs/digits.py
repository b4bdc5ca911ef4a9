"""scikit-learn's bundled digits (1,797 real 8x8 images): the offline CPU demo.

  python -m bnsynth_jax.main --config=configs/digits.py --workdir=/tmp/bnsynth_digits

Runs every stage (teacher -> stats -> synthesize -> student -> evaluate -> audit)
in a few minutes on a laptop CPU.
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
  c.teacher.eval_batch_size = 128
  c.teacher.log_every_steps = 100

  c.stats.kind = 'classwise'

  s = c.synthesis
  s.images_per_class = 40
  s.batch_size = 80               # 8 per class; divisible by 1, 2, 4, 8 devices
  s.iterations = 500
  s.jitter = 1                    # 8x8 images: one pixel is 12%
  s.flip = False
  s.bn_weight = 1.0
  s.soft_label_temperature = 3.0
  s.view_epochs = 100             # per-view labels for every student epoch
  s.view_crop_padding = 1
  s.view_flip = False
  c.relabel.crop_padding = 1      # the relabel stage's views (when on): the student's crop
  c.relabel.flip = False

  c.audit.reference_models = 4   # offline-LiRA references: cheap at this size
  c.audit.reference_epochs = 30

  st = c.student
  st.model.name = 'resnet8'
  st.batch_size = 64
  st.epochs = 100
  st.learning_rate = 0.05
  st.crop_padding = 1
  st.flip = False
  st.eval_batch_size = 128
  st.log_every_steps = 100
  # The teacher's labels of each crop the student sees (benchmarks/RESULTS.md compares
  # hard and soft labels): 'hard' is the seed paper's protocol.
  st.labels = 'views'
  return c
