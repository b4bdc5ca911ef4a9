"""CIFAR-10. The variants:

GPU / TPU (the design-card run: ResNet-18 teacher, TFDS cifar10, 10,000 synthetic images):
  python -m bnsynth_jax.main --config=configs/cifar10.py --workdir=DIR \
      --config.data.data_dir=~/tensorflow_datasets

One 10-minute call on a lent H100 (the same at full scale with 10-epoch schedules, the generator
and mixed-view labels; image folder input; launch/device_rows.sh prepares and runs it):
  python -m bnsynth_jax.main --config=configs/cifar10.py:gpu_quick --workdir=DIR \
      --config.data.root=CIFAR10_FOLDER

This 2-core CPU (ResNet-20 on the CIFAR-10 image folder, 2,000 synthetic images; unpack
../shared/data/cifar10/cifar10-jpeg.tar.gz into ~/.cache/bnsynth/cifar10 first):
  python -m bnsynth_jax.main --config=configs/cifar10.py:cpu --workdir=DIR

DP mode on a 5,000-image private set (epsilon 8 by default):
  python -m bnsynth_jax.main --config=configs/cifar10.py:cpu_dp --config.data.root=DIR/base \
      --workdir=DIR2
its teacher is a GroupNorm + linear head on ScatterNet coefficients (a data-free prior, public
by construction; 46.18% at epsilon 8 with 0.9 of the budget, against 23.77% for a ResNet-20
from scratch), and 2,000 synthetic images train a student of its architecture to 46.07%
(44.76%, 45.43%, 45.87% in three more runs: mean 45.53%).
At epsilon 1, the variant cpu_dp_eps1 (`epsilon_one` below: the coarser pool8 head, 20
DP-SGD epochs, 4,000 generator images) is the best release measured.

The CPU variant's teacher is committed: add
  --config.teacher.pretrained=pretrained/cifar10_resnet20
to import it instead of training it (about 2 hours here); pretrained/cifar10_resnet20_80ep is
the same network after two warm restarts (80 epochs in all, 88.18% against 86.77%).

For the best per-view-label student, add --config.stats.kind=global (0.806 x the real-subset
student on this CPU, variant global_views in benchmarks/RESULTS.md) or, class-wise,
--config.synthesis.ce_weight=0 (0.738; the default class-wise + CE gives 0.671, with images
the teacher labels as intended 99.6% of the time against 87.3% / 90.9%).

synthesis.iterations = 500 (the CPU variant), measured against 50, 100, 200 at 2,000 images
(python benchmarks/utility.py --suite=cifar10_cpu --sweep=synthesis.iterations
--values=50,100,200,500; benchmarks/RESULTS.md section utility-cifar10_cpu-synthesis.iterations):
per-view student 31.47% / 33.43% / 33.07% / 41.18%, hard-label 23.28% / 21.88% / 23.61% /
26.81% (real subset 60.36%); the optimisation takes 369 / 721 / 1,433 / 3,681 s of one
core, each student ~1,600 s.
Fewer iterations cost 8+ points here. With global statistics (--variants=global_views,
global_hard, section utility-cifar10_cpu-synthesis.iterations-global_views-global_hard) 200
iterations (1,482 s) give a per-view student of 44.53%, on par with the class-wise default at
500 (42.23% mean of student seeds 0 / 1 / 2: 41.18 / 44.58 / 40.93%) for 2.5x less
optimisation, but a hard-label student of 14.61% (the teacher agrees with 69% of the intended
classes): the fast choice for per-view releases,
  --config.stats.kind=global --config.synthesis.iterations=200
not the default while hard labels need class-wise images. Global at 500 (3,927 s, the
default's compute; --values=200,500 with the same --variants, docs/utility_compute_cifar10_global.png):
48.80% per view (+6.6 points over the class-wise default; 48.93% in an earlier run) but 20.68%
with hard labels (-6.1). No statistics kind wins on both label kinds at equal compute, so the
default stays class-wise at 500 iterations: a release's consumer who ignores the per-view labels
keeps the better images, and --config.stats.kind=global is the choice for per-view releases.
Mixed-view labels (issue 27; the relabel stage) are the strongest lever measured: the same
2,000 class-wise images (500 iterations), the teacher labelling each epoch's CutMix of two
crop + flip views, student at T 4, the same SGD recipe and 1,500 steps,
  --config.relabel.epochs=100 --config.student.labels=mixed
give a **62.47%** student against 41.18% with per-view labels (42.23% over three seeds) and
60.36% for 2,000 real images (ratio 1.035; one student seed; benchmarks/RESULTS.md section
methods-cifar10_cpu), for 200,000 more teacher forward passes (208 s here). With the generator
method on top,
  --config.synthesis.method=generator --config.synthesis.iterations=200
  --config.synthesis.generator.steps=30 --config.relabel.epochs=100 --config.student.labels=mixed
the set costs 372 s of optimisation instead of 2,728 s (94,000 image-iterations instead of
1,000,000; BN loss 21.93 against 14.63, teacher agreement 0.936 against 0.993) and its student
reaches **70.60%** (ratio 1.170); a second seed (`--config.seed=1`: another generator, latents,
views and student) **71.96%** (ratio 1.192; 275 s of optimisation, beside digits runs). Both
seeds beat the real subset, so this is the CPU variant's default (`generator_with_mixed_labels`
below; the audit variants keep the recipe their audits measured). At a fixed student budget
of 1,500 steps for the synthetic and the real-subset student alike, the same recipe with
1,000 / 5,000 / 10,000 images gives 68.23% / 70.57% / 72.84% against 50.39% / 67.99% /
71.25% real (ratios 1.354 / 1.038 / 1.022), and 50,000 images 73.00% against the whole
train split's 70.81% (1.031; seed 1: 68.11% / 50.12% at 1,000, 71.71% / 67.78% at 5,000,
72.15% / 71.09% at 10,000, ratios 1.359 / 1.058 / 1.015; the fall to 5,000 is the real
subset's data starvation: holding the 1,000-image ratio would need 96.5% at 10,000, above the
teacher;
--config.synthesis.images_per_class=1000 --config.relabel.epochs=20
--config.student.num_steps=1500 for 10,000; benchmarks/RESULTS.md rows gen1k, gen5k,
gen10k, gen50k, gen1k_seed1, gen5k_seed1, gen10k_seed1). Read with hard labels only
(`--config.relabel.epochs=0 --config.student.labels=hard --config.student.mixup_alpha=0.4
--config.student.num_steps=1500`), the generator's 2,000 images give 50.86% / 52.01% (seeds 0 / 1)
against 62.31% / 62.55% real (ratios 0.816 / 0.831; the per-image optimiser's: 30.39%, 0.488;
rows gen2k_hard_mixup, gen2k_hard). The per-image optimiser and
per-view labels of the rows above: --config.synthesis.method=pixels
--config.synthesis.iterations=500 --config.relabel.epochs=0 --config.student.labels=views.
A multi-resolution warm-up is no cheaper route: on one 200-image batch, 400 iterations at 16x16
then 100 at 32x32 end at BN loss 27.26 / teacher agreement 0.840, worse than 100 plain
iterations (23.13 / 0.975) at ~2.5x their cost (benchmarks/README.md, utility per compute).
"""

from bnsynth_jax import config_lib


DP_VARIANTS = ('cpu_dp', 'cpu_dp_eps1')


def get_config(variant: str = 'gpu'):
  c = config_lib.default_config()
  s, st = c.synthesis, c.student
  if variant in ('gpu', 'gpu_quick'):
    c.data.source = 'tfds'
    c.data.name = 'cifar10'
    c.model.name = 'resnet18'
    c.model.stem = 'cifar'
    c.teacher.batch_size = 256
    c.teacher.epochs = 200
    c.teacher.learning_rate = 0.2
    c.teacher.eval_every_epochs = 10
    c.teacher.checkpoint_every_steps = 1000
    c.stats.batch_size = 1000
    s.images_per_class = 1000     # 10,000 images
    s.batch_size = 500
    s.iterations = 1000
    st.model.name = 'resnet18'
    st.batch_size = 256
    st.epochs = 200
    st.learning_rate = 0.2
    if variant == 'gpu_quick':
      full_scale_in_ten_minutes(c)
  elif variant in ('cpu', 'cpu_audit') + DP_VARIANTS:
    c.data.source = 'imagefolder'
    c.data.root = '~/.cache/bnsynth/cifar10'
    c.model.name = 'resnet20'
    c.teacher.batch_size = 128
    c.teacher.epochs = 30
    c.teacher.learning_rate = 0.1
    c.teacher.eval_every_epochs = 5
    c.teacher.checkpoint_every_steps = 200
    s.images_per_class = 200      # 2,000 images
    s.batch_size = 200
    s.iterations = 500
    st.model.name = 'resnet20'
    st.batch_size = 128
    st.epochs = 100
    st.checkpoint_every_steps = 300
    if variant in ('cpu_audit',) + DP_VARIANTS:
      # The canary audit's shadow pipeline at a scale this CPU can repeat 16+ times: with
      # --train_subset=5000, a 15-epoch teacher, 200 synthetic images at 200 iterations.
      #   python -m bnsynth_jax.canary --config=configs/cifar10.py:cpu_audit \
      #       --train_subset=5000 --canaries=50 --shadows=16 --workdir=DIR
      c.teacher.epochs = 15
      s.images_per_class = 20
      s.iterations = 200
      st.batch_size = 100
    if variant in DP_VARIANTS:
      # The audit scale in DP mode (epsilon 8 by default; --config.privacy.epsilon=E):
      # the data-free ScatterNet prior (bnsynth_jax/scatternet.py: a fixed wavelet
      # transform, public by construction) under a GroupNorm + linear head on its 2x2-pooled
      # coefficients, trained by DP-SGD with large batches, no augmentation (Tramer & Boneh),
      # no weight decay; 0.9 of the budget for it, noised class-wise statistics of the
      # coefficients for the rest. At epsilon 8 on the 5,000-image base set its teacher
      # reaches 46.18% against 23.77% for the GroupNorm ResNet-20 trained from scratch
      # (docs/privacy.md, "CIFAR-10 with the ScatterNet prior"). At epsilon 1 a coarser head
      # and more images are better: the variant cpu_dp_eps1 (`epsilon_one`).
      # The canary audit at its scale (200 synthetic images per shadow; replace-one
      # adjacency, its one-run epsilon lower bound; docs/privacy.md, 2026-12-05). With 400
      # canaries per run (6,400 pairs; 50 cannot show the <= 1% criterion even at chance)
      # every target is at chance at epsilon 8: TPR at 0.1% FPR upper ends 0.5-0.6%.
      #   python -m bnsynth_jax.canary --config=configs/cifar10.py:cpu_dp \
      #       --train_subset=5000 --canaries=400 --shadows=16 --adjacency=replace \
      #       --release_students=1 --workdir=DIR --config.synthesis.images_per_class=20 \
      #       --config.teacher.eval_every_epochs=0
      c.model.name = 'scatternet_linear_pool4'
      c.model.norm = 'group'
      c.privacy.epsilon = 8.0
      # 2026-12-05: 0.9 of the budget for the teacher and 2,000 synthetic images: the
      # student (the teacher's architecture) then learns most of the teacher (46.07%
      # / 44.76 / 45.43 / 45.87, mean 45.53%, against teachers 46.18 / 46.05 / 45.83 / 46.28%
      # at epsilon 8, four runs; 38.81% with 0.7 and 200 images). Canary
      # audits keep the audit scale: --config.synthesis.images_per_class=20 (200 images).
      c.privacy.teacher_fraction = 0.9
      s.images_per_class = 200
      # DP mode derives nothing from the private files: CIFAR-10's public shape, given.
      c.data.image_size = 32
      c.data.channels = 3
      c.teacher.batch_size = 1024
      c.teacher.epochs = 60
      c.teacher.learning_rate = 0.5
      c.teacher.weight_decay = 0.0
      c.teacher.warmup_epochs = 2
      c.teacher.eval_every_epochs = 10
      c.teacher.crop_padding = 0
      c.teacher.flip = False
  else:
    raise ValueError(f'unknown cifar10 config variant {variant!r}: use gpu, gpu_quick, cpu, '
                     'cpu_audit, cpu_dp or cpu_dp_eps1')
  # Common to both: class-wise statistics, DeepInversion's CIFAR settings, teacher soft
  # labels at T=3 stored with the dataset, and per-view labels for every student epoch
  # (student.labels = hard | soft | views picks which the student uses; views by default).
  c.stats.kind = 'classwise'
  s.learning_rate = 0.1
  s.jitter = 2
  s.flip = True
  s.soft_label_temperature = 3.0
  s.view_epochs = int(st.epochs)
  s.view_crop_padding = st.crop_padding
  s.view_flip = st.flip
  st.labels = 'views'
  if variant in ('cpu', 'gpu_quick'):
    generator_with_mixed_labels(c)
  if variant in DP_VARIANTS:
    scatternet_student_with_mixed_labels(c)
  if variant == 'cpu_dp_eps1':
    epsilon_one(c)
  return c


def full_scale_in_ten_minutes(c) -> None:
  """gpu_quick: the CPU default (generator, mixed-view labels) at full scale -- ResNet-18
  teacher on all 50,000 images, 50,000 generator images, mixed-view students, the real
  baseline on the same recipe -- sized for one 10-minute call on a lent H100
  (launch/device_rows.sh): 10-epoch schedules at batch 512, image folder input (the device has
  no TensorFlow). Throughput, not tuning, set the epochs."""
  c.data.source = 'imagefolder'
  c.data.name = ''
  c.data.root = '~/.cache/bnsynth/cifar10'
  for run in (c.teacher, c.student):
    run.batch_size = 512
    run.epochs = 10
    run.learning_rate = 0.4
    run.checkpoint_every_steps = 500
  c.teacher.eval_every_epochs = 5
  c.synthesis.images_per_class = 5000     # 50,000 images
  c.relabel.batch_size = 1000


def scatternet_student_with_mixed_labels(c) -> None:
  """cpu_dp since 2026-12-03: the student has the DP teacher's architecture (GroupNorm +
  linear head on the fixed ScatterNet coefficients) and learns the teacher's logits on each
  epoch's CutMix view (relabel stage, T 4). On the 5,000-image base set, 200 synthetic
  images, students 38.81% / 35.01% / 26.84% at epsilon 8 / 3 / 1 (teachers 43.78% /
  38.95% / 28.26%) against 21.17% at epsilon 8 for a ResNet-20 student on per-view labels;
  with 1,000 / 2,000 images (teacher_fraction 0.9, teacher 46.18%) 44.59% / 46.07%
  (docs/privacy.md, "CIFAR-10 with the ScatterNet prior"). A linear student on the
  teacher's fixed features recovers the teacher wherever the synthetic set spans those
  features: it measures the DP teacher through the set more than the images' realism.
  Post-processing only: the student sees the released teacher and synthetic images, never
  the private data."""
  st = c.student
  st.model.name = 'scatternet_linear_pool4'
  st.model.norm = 'group'
  c.relabel.epochs = int(st.epochs)
  st.labels = 'mixed'
  st.mixed_temperature = 4.0


def generator_with_mixed_labels(c) -> None:
  """The CPU default since 2026-12-02 (two seeds, 70.60% / 71.96% against 60.36% for 2,000
  real images; the docstring above): the generator makes the set, the relabel stage labels
  each student epoch's CutMix view, the student learns those logits at T 4."""
  s = c.synthesis
  s.method = 'generator'
  s.iterations = 200            # batch 0 from scratch; each later batch generator.steps
  s.generator.steps = 30
  c.relabel.epochs = int(c.student.epochs)
  c.student.labels = 'mixed'
  c.student.mixed_temperature = 4.0


def epsilon_one(c) -> None:
  """cpu_dp_eps1, the best epsilon-1 release measured (2026-12-05, docs/privacy.md "The
  epsilon-1 recipe"): the coarser head (one value per ScatterNet channel: fewer weights,
  less noise on their gradient; teacher 31.32% against 28.01% for the 2x2-pooled one) for
  teacher and student, 20 DP-SGD epochs, and 4,000 generator images (the student then
  recovers the teacher: 31.56% against 29.66% from 2,000 optimised images of the same
  release)."""
  c.privacy.epsilon = 1.0
  c.teacher.epochs = 20
  c.model.name = 'scatternet_linear_pool8'
  c.student.model.name = 'scatternet_linear_pool8'
  s = c.synthesis
  s.method = 'generator'
  s.generator.steps = 30
  s.images_per_class = 400
