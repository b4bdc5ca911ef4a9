"""Default configuration. configs/*.py start from `default_config()` and change a few fields.

Every field is listed here with its meaning, so `--config.a.b=v` overrides are
type-checked and an unknown key is refused.
"""

from __future__ import annotations

import ml_collections


def student_seed(config) -> int:
  """The seed of the students (synthetic and real-subset): student.seed, else seed."""
  seed = config.student.get('seed')
  return int(config.seed if seed is None else seed)


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The recipe of one supervised run (teacher, student or baseline)."""
  c = ml_collections.ConfigDict()
  c.batch_size = 128            # global batch, split over all devices (0 = derived: up to
                                # 128, fitting the data, devices and partitions; logged)
  c.epochs = 30.0
  c.num_steps = 0               # > 0 overrides epochs (tests use it)
  c.optimizer = 'sgd'           # sgd | adam | adamw
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.warmup_epochs = 1.0
  c.schedule = 'cosine'         # cosine | constant
  c.label_smoothing = 0.0
  c.crop_padding = 4            # random crop with zero padding (0 = off)
  c.flip = True                 # random horizontal flip
  c.mixup_alpha = 0.0           # 0 = off
  c.cutmix_alpha = 0.0          # 0 = off
  c.ema_decay = 0.0             # > 0: evaluate and save an EMA of the weights (e.g. 0.99)
  c.eval_every_epochs = 5.0     # 0 = only at the end
  c.eval_batch_size = 500
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.update(overrides)
  return c


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- data (private; read by the teacher, stats, evaluate and audit stages only)
  c.data = ml_collections.ConfigDict()
  c.data.source = 'digits'      # digits | imagefolder | tfds | procedural (public: generated)
  c.data.name = ''              # tfds: dataset name, e.g. cifar10
  c.data.data_dir = ''          # tfds: data_dir ('' = TFDS default)
  c.data.root = ''              # imagefolder: ROOT with ROOT/<split>/<class>/*.png
  c.data.train_split = 'train'
  c.data.test_split = 'test'
  c.data.image_size = 0         # 0 = the source's native size (shorter side; image folders
                                #     cap it at 64, logged): images are resized + centre-cropped
  c.data.channels = 0           # 0 = the source's (1 if every class looks grayscale, else 3)
  c.data.alpha_background = 'black'   # imagefolder: transparent pixels become black | white
  c.data.pixel_max = 0.0        # imagefolder: the value that means white (0 = the file type's
                                # range: 255, 65535 for 16-bit; float images must be in [0, 1])
  c.data.num_partitions = 0     # 0 = one per process; see input_pipeline
  c.data.mean = ()              # () = computed on the train split
  c.data.std = ()
  c.data.decode_threads = 0     # imagefolder decoding threads (0 = cpu count, max 16)
  c.data.procedural_classes = 0     # procedural: glyph classes
  c.data.procedural_per_class = 0   # procedural: training images per class (test: a tenth)
  c.data.procedural_seed = 0        # procedural: the glyphs and every image

  # --- teacher
  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet20'
  c.model.stem = 'cifar'        # cifar | imagenet (resnet18/34/50 only)
  c.model.dtype = 'float32'     # float32 | bfloat16 (BN statistics stay float32)
  c.model.norm = 'batch'        # batch | group (GroupNorm + weight standardisation: needed by
                                # privacy.epsilon > 0, whose per-example gradients BN would mix)
  c.teacher = train_config()
  c.teacher.pretrained = ''     # a folder written by the teacher stage: import, do not train
  c.teacher.init_from = ''      # a teacher folder whose weights start training (a fine-tune or
                                # warm restart with this config's schedule); '' = random init

  # --- differential privacy (off unless epsilon > 0; see bnsynth_jax/privacy/)
  p = c.privacy = ml_collections.ConfigDict()
  p.epsilon = 0.0               # > 0: DP-SGD teacher + noised class-wise statistics, composed
  p.delta = 1e-5                # should be well below 1 / (training images)
  p.teacher_fraction = 0.5      # share of epsilon for the teacher (the rest: the statistics);
                                # 0 = by epsilon, from privacy.teacher_fraction_by_epsilon
  p.teacher_fraction_by_epsilon = ''   # 'E:F,E:F,...' read when teacher_fraction is 0: the F
                                # of the largest E <= privacy.epsilon (below them all, the
                                # smallest E's F); a stage records the F it used
  p.clip_norm = 1.0             # DP-SGD per-example gradient L2 bound
  p.augmult = 1                 # augmentations per example averaged before clipping
  p.cache_front_end = True      # a public front end (scatternet*) under an unaugmented teacher:
                                # computed once per image, not at every DP-SGD step (the same
                                # gradients; host memory N x its output; privacy.FrontEndBatches)
  p.stats_clip_norm = 0.0       # L2 bound of one example's moment vector, all layers, each
                                # layer scaled by its RMS on noise images (0 = sqrt(length))
  p.teacher_noise_multiplier = 0.0   # 0 = calibrated to the budget (logged and recorded)
  p.stats_noise_multiplier = 0.0     # 0 = calibrated to the budget
  p.noise_seed = 0              # 0 = secret, from the OS (kept owner-only in WORKDIR/.owner while
                                # a stage runs); tests fix it, and the run is then NOT private
  p.prior = ''                  # a teacher folder made without the private data that DP-SGD
                                # fine-tunes (privacy/prior.py); '' = from scratch
  p.prior_is_public = False     # the data owner's declaration that privacy.prior is public
  p.prior_trainable = 'all'     # all | last_stage | head: what DP-SGD trains of the prior
  p.head = 'dpsgd'              # dpsgd | class_means: the teacher's head from noised class
                                # means of the frozen prior's features (privacy/class_means.py)
  p.head_dims = 16              # class_means: public projections of the prior's features
  p.head_scale = 10.0           # class_means: the logits' range (cosine x scale)
  p.accept_cumulative_epsilon = 0.0   # a stage released before is run again (--overwrite)
                                # only if the ledger's cumulative epsilon stays within this

  # --- statistics (the last stage that reads private images for synthesis)
  c.stats = ml_collections.ConfigDict()
  c.stats.kind = 'classwise'    # classwise | global (a BN teacher's running statistics; for
                                # GroupNorm or in DP mode, moments pooled over the split)
  c.stats.batch_size = 500

  # --- synthesis (reads only the teacher and statistics artifacts)
  s = c.synthesis = ml_collections.ConfigDict()
  s.images_per_class = 10       # 0 = derived: min(100, the smallest training class)
  s.batch_size = 100            # global; a multiple of the class count keeps batches balanced
                                # (0 = derived: the largest multiple of the class count up to
                                # 256 that divides the images and the devices; logged)
  s.iterations = 500            # per batch, at full resolution
  s.multires_iterations = 0     # extra iterations first, the teacher seeing 2x-downsampled images
                                # (no speed-up on 32x32 CIFAR-10: benchmarks/README.md)
  s.optimizer = 'adam'          # adam | sgd | lion
  s.learning_rate = 0.1
  s.b1 = 0.5
  s.b2 = 0.99
  s.schedule = 'cosine'         # cosine | constant
  s.bn_weight = 10.0            # a_bn
  s.first_bn_multiplier = 10.0  # w_1 (the first BN layer); other layers 1
  s.bn_norm = 'l2'              # l2 (DeepInversion, SRe2L) | squared_l2 (ZeroQ)
  s.ce_weight = 1.0             # a_ce
  s.tv_l2_weight = 2.5e-5       # a_tv (L2 form)
  s.tv_l1_weight = 0.0
  s.l2_weight = 0.0             # a_l2
  s.adi_weight = 0.0            # adaptive competition (needs adi_student)
  s.adi_student = ''            # a model folder (teacher/student artifact format)
  s.adi_temperature = 3.0
  s.diversity_weight = 0.0      # a_div: mean cosine similarity of the teacher's penultimate
                                # features between images of one class in the batch (0 = off)
  s.augment = 'jitter_flip'     # jitter_flip | random_resized_crop | none
  s.jitter = 2                  # pixels
  s.flip = True
  s.rrc_min_scale = 0.5         # random_resized_crop: smallest crop area fraction
  s.keep_best = True            # keep the lowest-loss iterate of each batch
  s.stats_scope = 'global'      # global (exact over the global batch) | per_device
  s.dtype = 'float32'           # teacher forward/backward dtype (images, moments float32)
  s.soft_label_temperature = 1.0   # teacher soft labels stored with the dataset
  # Per-view soft labels (SRe2L-style relabelling, done here so the teacher is never
  # released): the teacher's labels of each image's crop+flip in each of view_epochs
  # student epochs. Use with student.labels=views and the same crop_padding / flip.
  # (Student mixup/cutmix on views mixes the two views' labels: an approximation that
  # cost 8.7 points on CIFAR-10 at CPU scale, see benchmarks/RESULTS.md.)
  s.view_epochs = 0             # 0 = off
  s.view_crop_padding = 4
  s.view_flip = True
  s.log_every_iterations = 50
  s.checkpoint_every_iterations = 100   # mid-batch checkpoints (0 = only whole batches)
  s.teacher_dir = ''            # '' = WORKDIR/teacher; a third party points at the files it got
  s.stats_dir = ''              # '' = WORKDIR/stats
  # Grow (or shrink) a synthetic set: copy the finished batches of another synthesis (a
  # workdir or its synthetic/ folder) made with the same teacher, statistics and settings
  # but another images_per_class. Batch i is fold_in(seed, i) with labels (arange % C) in
  # both, so the copied batches are the ones this run would compute (tests/test_main.py).
  s.reuse_from = ''
  # The method: pixels (each image optimised, DeepInversion; synthesis/pixels.py) or generator
  # (a small generator with a meta-learned initialisation and per-batch latents, Fast-DFKD;
  # synthesis/generator.py): the first batch takes `iterations` steps, each later one
  # generator.steps. Same objective, same shards.
  s.method = 'pixels'
  g = s.generator = ml_collections.ConfigDict()
  g.steps = 10                  # steps per batch after the first
  g.width = 16                  # feature width (Fast-DFKD's ngf is 64: on one 200-image
                                # CIFAR-10 batch, 100 steps, width 16 ends at BN loss 16.98
                                # against 21.94 at 64 and runs 3.5x faster on this CPU)
  g.latent_dim = 256
  g.learning_rate = 5e-3        # Adam on the generator (b1 0.5)
  g.latent_learning_rate = 0.015  # Adam on the latents
  g.meta_lr = 0.5               # Reptile step of the initialisation towards each adapted one

  # --- relabel (reads the synthetic dataset and the teacher: public, like synthesis)
  # The teacher labels each student epoch's mixed view (crop + flip, then CutMix / Mixup with a
  # partner image's view); student.labels=mixed trains on them (bnsynth_jax/relabel.py).
  r = c.relabel = ml_collections.ConfigDict()
  r.epochs = 0                  # label views for this many student epochs (0 = stage off)
  r.mix = 'cutmix'              # cutmix | mixup | both (one per view, at random) | none
  r.mix_alpha = 1.0             # Beta(alpha, alpha) of the kept area / blend weight
  r.mix_prob = 1.0              # fraction of views that get a partner
  r.crop_padding = 4            # each view's crop (zero padding) and flip, before the mix
  r.flip = True
  r.bn = 'running'              # the teacher's BatchNorm: running statistics | batch (each
                                # labelling batch's own statistics, as SRe2L / CV-DD)
  r.batch_size = 500            # labelling batch (with bn=batch: it sets the statistics)

  # --- student (reads only the synthetic dataset)
  c.student = train_config(epochs=100.0, eval_every_epochs=0.0, warmup_epochs=2.0)
  c.student.model = ml_collections.ConfigDict()
  c.student.model.name = 'resnet20'
  c.student.model.stem = 'cifar'
  c.student.model.dtype = 'float32'
  c.student.model.norm = 'batch'  # batch | group (a ScatterNet student matching a DP teacher)
  c.student.labels = 'hard'     # hard | soft (teacher soft labels) | views (per-view soft labels)
                                # | mixed (the relabel stage's mixed-view logits)
  c.student.mixed_temperature = 4.0   # labels=mixed: targets softmax(logits / T), loss T^2 x CE
  # Start the students (synthetic and real-subset, the same recipe) from privacy.prior's
  # variables instead of a random initialisation (a fresh head where the class count
  # differs). The prior must be declared public: it costs nothing, as for the teacher.
  c.student.init_from_prior = False
  # The students' seed (batch order and initialisation; also the real-subset baseline's, whose
  # members stay those of `seed`). None = `seed`; set it to retrain on the same synthetic set
  # for seed-to-seed spread: --config.student.seed=1.
  c.student.seed = ml_collections.config_dict.placeholder(int)

  # --- evaluate (the data owner's side: real test split, and the fair baseline)
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.real_subset = True  # baseline: same recipe on as many real images per class
  c.evaluate.full_real = False   # also a student on the whole real train split

  # --- audit (the data owner's side: what the synthetic set reveals)
  a = c.audit = ml_collections.ConfigDict()
  a.k = 5                        # neighbours per synthetic image, per metric
  a.block_size = 256             # synthetic images per top-k block
  a.num_pictures = 16            # pairs in most_similar.png and random_pairs.png
  a.holdout_examples = 0         # real test images for the DCR reference (0 = all)
  a.mia_examples = 1000          # members and as many non-members
  a.bootstrap = 200              # resamples for the 95% intervals
  a.reference_models = 0         # offline-LiRA reference models (0 = loss threshold only)
  a.reference_epochs = 10.0      # their recipe is the teacher's, with this many epochs
  a.reference_train_fraction = 0.5   # of the training images outside the audited sample
  a.synthetic_dir = ''           # '' = WORKDIR/synthetic; audit another synthetic dataset
  a.student_dir = ''             # '' = WORKDIR/student/synthetic

  return c


# Keys that do not change what a stage produces; a workdir may be resumed with
# other values of these.
VOLATILE_KEYS = frozenset({
    'data.root', 'data.data_dir', 'data.decode_threads', 'stats.batch_size',
    'synthesis.teacher_dir', 'synthesis.stats_dir', 'synthesis.reuse_from', 'audit.block_size',
    'privacy.accept_cumulative_epsilon', 'privacy.cache_front_end',
    'log_every_steps', 'checkpoint_every_steps', 'eval_batch_size', 'eval_every_epochs',
    'log_every_iterations', 'checkpoint_every_iterations',
})
