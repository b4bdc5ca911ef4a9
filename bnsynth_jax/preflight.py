"""Preflight: derive what the data decides, then check everything knowable, before any work.

`run(config, workdir, selected, data)` is called by the pipeline before the first
selected stage does anything (nothing is written until it passes):

1. Facts: device, process and partition counts; the classes, image shape, split sizes
   and images per class from the data *listing* (no image is decoded) where a stage
   that reads private data will run, else from the artifacts already on disk.
2. Derived values: config fields left at 0 ("derive it") -- data.image_size,
   synthesis.images_per_class, synthesis.batch_size, teacher.batch_size,
   student.batch_size -- are set from the facts, logged, and so recorded in each
   stage's stage_config.json. A workdir that already recorded a value keeps it (a
   resume on another device count does not change a finished stage's config).
3. Checks: every selected, unfinished stage's settings against the facts and each
   other (batch divisibility for every device and partition count, batches against
   the sets they are drawn from, class counts, image size against the model stem,
   per-view labels against student augmentation, artifacts given by path). All
   problems are raised together, one line each (PreflightError).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from absl import logging

from bnsynth_jax import artifacts, fileio, input_pipeline, models, parallel, privacy
from bnsynth_jax.privacy import prior as privacy_prior
from bnsynth_jax import stats as stats_stage
from bnsynth_jax.errors import UserError
from bnsynth_jax.workdir import is_done, stage_dir, stats_dir, teacher_dir

MIN_IMAGE_SIZE = 8
MAX_DERIVED_IMAGE_SIZE = 64      # image folders: larger images are resized to this by default
MAX_DERIVED_BATCH = 128          # teacher / student batches
MAX_DERIVED_SYNTHESIS_BATCH = 256
DERIVED_IMAGES_PER_CLASS = 100
IMAGENET_STEM_MIN_SIZE = 32


class PreflightError(UserError):
  """Several problems, one line each."""

  def __init__(self, problems: list[str]):
    super().__init__('\n'.join(problems))
    self.problems = problems


@dataclasses.dataclass
class Facts:
  devices: int
  partitions: int
  num_classes: int | None = None
  class_names: tuple[str, ...] | None = None
  image_shape: tuple[int, int, int] | None = None
  train_size: int | None = None
  train_counts: tuple[int, ...] | None = None
  native_size: tuple[int, int] | None = None
  data_error: bool = False        # the listing failed (already reported)

  @property
  def batch_unit(self) -> int:
    """Every global training batch must be a multiple of this."""
    return math.lcm(self.devices, self.partitions)


def _read_manifest(directory):
  path = fileio.path(directory) / artifacts.MANIFEST_FILE
  return fileio.read_json(path) if path.exists() else None


def _stored(workdir, stage_folder: str, key: str):
  """A value a previous run recorded in WORKDIR/<stage_folder>/stage_config.json."""
  record = fileio.path(workdir) / stage_folder / 'stage_config.json'
  try:
    return fileio.read_json(record).get(key) if record.exists() else None
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------
# Facts


def _gather_facts(config, workdir, pending, private, data, problems) -> Facts:
  devices = parallel.make_mesh().devices.size
  try:
    partitions, _ = input_pipeline.local_partitions(config.data)
  except UserError as e:
    problems.append(str(e))
    partitions = jax.process_count()
  facts = Facts(devices, partitions)
  reads_images = [s for s in pending if s in private
                  and not (s == 'stats' and not stats_stage.reads_images(config))]
  if reads_images:
    try:
      info = data.info
    except UserError as e:
      problems.append(str(e))
      facts.data_error = True
      return facts
    facts.class_names = tuple(info.class_names)
    facts.num_classes = info.num_classes
    facts.image_shape = tuple(info.image_shape)
    facts.train_size = info.num_examples[config.data.train_split]
    if info.class_counts:
      facts.train_counts = info.class_counts.get(config.data.train_split)
    facts.native_size = info.native_size
    return facts
  # No private data this run: what the artifacts on disk say.
  for directory in (teacher_dir(config, workdir),
                    stage_dir(workdir, 'synthesize')):
    manifest = _read_manifest(directory)
    if manifest:
      facts.num_classes = manifest['num_classes']
      facts.class_names = tuple(manifest['class_names'])
      facts.image_shape = tuple(manifest['image_shape'])
      break
  stats = _read_manifest(stats_dir(config, workdir))
  if stats and stats.get('kind') == 'classwise' and any(stats.get('class_counts', [])):
    facts.train_counts = tuple(int(c) for c in stats['class_counts'])
  return facts


# ----------------------------------------------------------------------------
# Derived values


def _largest_batch(total: int, unit: int, cap: int) -> int:
  """The largest multiple of `unit` that is <= min(total, cap) (0 if none)."""
  return (min(total, cap) // unit) * unit


def _synthesis_batch(images_per_class: int, num_classes: int, devices: int) -> int:
  """The largest multiple m*C of the class count, m dividing images_per_class, that the
  devices divide, up to MAX_DERIVED_SYNTHESIS_BATCH (0 if none)."""
  best = 0
  for m in range(1, images_per_class + 1):
    b = m * num_classes
    if b > max(MAX_DERIVED_SYNTHESIS_BATCH, num_classes * (devices // math.gcd(num_classes,
                                                                                devices))):
      break
    if images_per_class % m == 0 and b % devices == 0:
      best = b
  return best


# The stages that use each derived section (a value no pending stage uses stays 0).
_USERS = {'synthesis': {'synthesize', 'student', 'evaluate', 'audit'},
          'teacher': {'teacher', 'audit'}, 'student': {'student', 'evaluate'}}


def _derive(config, workdir, facts: Facts, data, problems, pending) -> list[str]:
  """Fills config fields left at 0; returns one log line per derived value.

  A value this workdir recorded is reused; otherwise it is computed from the facts where
  they allow (a run of public stages alone reads no private listing); a value still 0 that
  a pending stage needs is a problem.
  """
  notes = []
  used = {section for section, stages in _USERS.items() if stages & set(pending)}
  c, syn, unit = facts.num_classes, config.synthesis, facts.batch_unit

  def derive(section, key, folder, compute):
    if config[section][key]:
      return
    stored = _stored(workdir, folder, f'{section}.{key}') if workdir else None
    got = (stored, 'recorded in this workdir by an earlier run') if stored else compute()
    if got and got[0]:
      config[section][key] = got[0]
      notes.append(f'derived {section}.{key}={got[0]} ({got[1]})')

  def image_size():
    if config.data.source != 'imagefolder' or facts.native_size is None:
      return None
    native = min(facts.native_size)
    size = min(native, MAX_DERIVED_IMAGE_SIZE)
    return size, (f'the first image is {facts.native_size[0]}x{facts.native_size[1]}'
                  + (f'; capped at {MAX_DERIVED_IMAGE_SIZE}, set data.image_size to train '
                     'larger' if native > size else ''))

  def images_per_class():
    if not facts.train_counts:
      return None
    smallest = min(facts.train_counts)
    ipc = min(DERIVED_IMAGES_PER_CLASS, smallest)
    why = f'{DERIVED_IMAGES_PER_CLASS}, or the smallest training class ({smallest})'
    # Round down so that some multiple of the class count divides the devices.
    step = facts.devices // math.gcd(c or 1, facts.devices)
    if ipc >= step:
      ipc -= ipc % step
      why += f'; a multiple of {step} for {facts.devices} devices' if step > 1 else ''
    elif 'synthesis' in used:
      problems.append(
          f'the smallest training class has {smallest} images, but with {c} classes on '
          f'{facts.devices} devices the images per class must be a multiple of {step}: add '
          'images to the small classes, run on fewer devices, or set '
          f'synthesis.images_per_class={step} and evaluate.real_subset=False')
    return ipc, why

  def synthesis_batch():
    b = _synthesis_batch(syn.images_per_class, c, facts.devices) if c else 0
    return b, (f'the largest multiple of the {c} classes up to {MAX_DERIVED_SYNTHESIS_BATCH} '
               f'dividing {syn.images_per_class * (c or 0)} images and {facts.devices} devices')

  def teacher_batch():
    if not facts.train_size:
      return None
    return (_largest_batch(facts.train_size, unit, MAX_DERIVED_BATCH),
            f'up to {MAX_DERIVED_BATCH}, a multiple of {unit}, at most the {facts.train_size} '
            'training images')

  def student_batch():
    n = syn.images_per_class * (c or 0)
    return (_largest_batch(n, unit, MAX_DERIVED_BATCH),
            f'up to {MAX_DERIVED_BATCH}, a multiple of {unit}, at most the {n} synthetic images')

  before = config.data.image_size
  derive('data', 'image_size', 'teacher', image_size)
  if config.data.image_size != before and facts.image_shape:
    data.reset()              # the source was made with the old size
    facts.image_shape = (config.data.image_size, config.data.image_size, facts.image_shape[2])
  derive('synthesis', 'images_per_class', 'synthetic', images_per_class)
  derive('synthesis', 'batch_size', 'synthetic', synthesis_batch)
  derive('teacher', 'batch_size', 'teacher', teacher_batch)
  derive('student', 'batch_size', 'student', student_batch)
  if ('synthesis' in used and not syn.images_per_class and not facts.data_error
      and not facts.train_counts):
    problems.append('synthesis.images_per_class=0 is derived from the class sizes of the '
                    'private data, which this run does not read: set '
                    '--config.synthesis.images_per_class')
  return notes


# DP mode: values that would be derived from the private data, and why each must be given.
_PRIVATE_DERIVATIONS = (
    ('data', 'image_size', 'teacher', 'imagefolder',
     'would be read from a private file (the first image\'s size)'),
    ('data', 'channels', 'teacher', 'imagefolder',
     'would be read from private files (whether every class looks grayscale)'),
    ('synthesis', 'images_per_class', 'synthetic', None,
     'would come from the size of the smallest private class, which the release would show'),
    ('teacher', 'batch_size', 'teacher', None,
     'would be derived from the training split\'s size'),
)


def _private_derivations(config, workdir, pending) -> list[str]:
  """DP mode: every value left at 0 that would be derived from the private data is a
  problem, one line each (the release must not depend on the data outside the two
  mechanisms). Values derived from public facts (devices, classes, the given image count)
  stay derived."""
  used = {section for section, stages in _USERS.items() if stages & set(pending)}
  problems = []
  for section, key, folder, source, why in _PRIVATE_DERIVATIONS:
    if source and config.data.source != source:
      continue                      # the digits and TFDS sizes are public metadata
    if (section if section != 'data' else 'teacher') not in used:
      continue
    if config[section][key] or (workdir and _stored(workdir, folder, f'{section}.{key}')):
      continue
    problems.append(f'DP mode: {section}.{key}=0 {why}: set --config.{section}.{key} '
                    'to a value chosen without looking at the private data')
  return problems


def _public_normalisation(config, channels: int) -> tuple[tuple, tuple, str]:
  """DP mode's data.mean / std: a public prior's own (what its weights were trained with),
  else the public constants of privacy.PUBLIC_MEAN / PUBLIC_STD."""
  manifest = (_read_manifest(privacy_prior.folder(config))
              if privacy_prior.enabled(config) else None)
  if manifest and len(manifest.get('mean', ())) == channels:
    return (tuple(manifest['mean']), tuple(manifest['std']),
            f'the public prior {config.privacy.prior}\'s')
  return (privacy.PUBLIC_MEAN,) * channels, (privacy.PUBLIC_STD,) * channels, 'public constants'


def _derive_privacy(config, workdir, facts: Facts, problems, pending) -> list[str]:
  """DP mode: public normalisation constants, and the noise multipliers calibrated to the
  budget (a plan over budget is a problem, before any training). A workdir whose teacher
  recorded them keeps them (a resumed run's later stages must see the same config)."""
  if not privacy.enabled(config):
    return []
  keys = ('data.mean', 'data.std', 'privacy.teacher_noise_multiplier',
          'privacy.stats_noise_multiplier')
  for key in keys:
    section, field = key.split('.')
    stored = _stored(workdir, 'teacher', key) if workdir else None
    if stored and not config[section][field]:
      config[section][field] = tuple(stored) if isinstance(stored, list) else stored
  if 'teacher' not in pending or not facts.train_size or not config.teacher.batch_size:
    return []
  notes = []
  if not (config.data.mean or config.data.std) and facts.image_shape:
    config.data.mean, config.data.std, whose = _public_normalisation(config, facts.image_shape[2])
    notes.append(f'derived data.mean={config.data.mean}, data.std={config.data.std} (DP mode: '
                 f'{whose}, not statistics of the private images)')
  try:
    record = privacy.plan(config, facts.train_size)
  except UserError as e:
    problems.append(str(e))
    return notes
  for key, part in (('teacher_noise_multiplier', 'teacher'), ('stats_noise_multiplier', 'stats')):
    if not config.privacy[key]:
      config.privacy[key] = record[part]['noise_multiplier']
      notes.append(f'derived privacy.{key}={config.privacy[key]:.4g} (calibrated)')
  notes.append(f'privacy: (epsilon {record["epsilon"]:.4g}, delta {record["delta"]:g}) for the '
               f'teacher (alone {record["teacher"]["epsilon_alone"]:.4g}) and the statistics '
               f'(alone {record["stats"]["epsilon_alone"]:.4g}), composed by '
               f'{record["accountant"]}')
  return notes


# ----------------------------------------------------------------------------
# Checks


def _check_batch(problems, facts: Facts, key: str, batch: int, drawn_from: int | None,
                 what: str) -> None:
  if batch < 0:
    problems.append(f'{key}={batch} must be positive (0 = derived from the data): set '
                    f'--config.{key}')
    return
  if batch == 0:
    problems.append(f'{key}={batch} could not be derived (no multiple of {facts.batch_unit} '
                    f'fits {what}): set --config.{key} or use more images')
    return
  for n, name in ((facts.devices, f'the {facts.devices} devices'),
                  (facts.partitions, f'data.num_partitions={facts.partitions}')):
    if batch % n:
      problems.append(f'{key}={batch} is not divisible by {name}: set it to a multiple of {n}')
  if drawn_from is not None and batch > drawn_from:
    problems.append(f'{key}={batch} is larger than {what} ({drawn_from}): lower it to at most '
                    f'{drawn_from}')


def _check_model(problems, facts: Facts, section: str, model_config) -> None:
  try:
    models.create_model(model_config.name, 2, stem=model_config.stem, dtype=model_config.dtype,
                        norm=model_config.get('norm', 'batch'))
  except UserError as e:
    problems.append(str(e))
    return
  if facts.image_shape and model_config.stem == 'imagenet' and (
      facts.image_shape[0] < IMAGENET_STEM_MIN_SIZE):
    problems.append(f'{section}.stem=imagenet downsamples 4x at once, too much for '
                    f'{facts.image_shape[0]}x{facts.image_shape[1]} images: set '
                    f'--config.{section}.stem=cifar')


def _check_teacher_source(problems, facts: Facts, key: str, directory) -> None:
  manifest = _read_manifest(directory)
  if manifest is None:
    problems.append(f'{key}={directory} holds no finished model ({artifacts.MANIFEST_FILE} is '
                    'missing): point it at a folder written by the teacher stage')
  elif facts.class_names and (list(manifest['class_names']) != list(facts.class_names) or (
      facts.image_shape and list(manifest['image_shape']) != list(facts.image_shape))):
    problems.append(f'{key} {directory} was trained on classes {manifest["class_names"]} at '
                    f'{manifest["image_shape"]}, but the data has {list(facts.class_names)} at '
                    f'{list(facts.image_shape or ())}: use a matching teacher or data.image_size')


def _check_data(problems, config, facts: Facts, pending) -> None:
  if facts.num_classes is not None and facts.num_classes < 2:
    problems.append(f'the data has a single class ({", ".join(facts.class_names or ())}): a '
                    'classifier needs at least 2 classes; add a folder per class')
  if facts.image_shape:
    h, w, ch = facts.image_shape
    if min(h, w) < MIN_IMAGE_SIZE:
      problems.append(f'images of {h}x{w} are smaller than {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}: '
                      f'set --config.data.image_size to {MIN_IMAGE_SIZE} or more')
    if ch not in (1, 3):
      problems.append(f'data.channels={ch}: use 1 (grayscale), 3 (RGB) or 0 (from the images)')
    if 'synthesize' in pending and config.synthesis.multires_iterations and (h % 2 or w % 2):
      problems.append(f'synthesis.multires_iterations needs even image sizes, not {h}x{w}: '
                      'set it to 0 or data.image_size to an even size')
  if facts.train_counts and facts.class_names and facts.num_classes and facts.num_classes > 1:
    empty = [n for n, k in zip(facts.class_names, facts.train_counts) if k == 0]
    if empty:
      problems.append(f'class(es) {", ".join(empty)} have no training images: add images or '
                      'remove their folders')


def _check_stages(problems, config, workdir, facts: Facts, pending, selected) -> None:
  syn, student = config.synthesis, config.student
  c = facts.num_classes
  num_synthetic = syn.images_per_class * c if c and syn.images_per_class > 0 else None

  def finished_or_coming(stage):
    return stage in selected or is_done(workdir, stage)

  if 'teacher' in pending:
    _check_model(problems, facts, 'model', config.model)
    if config.teacher.pretrained:
      _check_teacher_source(problems, facts, 'teacher.pretrained', config.teacher.pretrained)
    else:
      _check_batch(problems, facts, 'teacher.batch_size', config.teacher.batch_size,
                   facts.train_size, 'the training split')
    if config.teacher.init_from:
      _check_teacher_source(problems, facts, 'teacher.init_from', config.teacher.init_from)
  if 'stats' in pending and not finished_or_coming('teacher'):
    problems.append(f'the stats stage needs a finished teacher in '
                    f'{stage_dir(workdir, "teacher")}: add teacher to --stages')
  if 'synthesize' in pending:
    _check_synthesis(problems, syn, workdir, facts, finished_or_coming, num_synthetic)
  if 'student' in pending:
    _check_model(problems, facts, 'student.model', student.model)
    _check_batch(problems, facts, 'student.batch_size', student.batch_size, num_synthetic,
                 'the synthetic set')
    if student.labels == 'views':
      _check_views(problems, config, workdir)
  _check_evaluate_and_audit(problems, config, workdir, facts, pending, finished_or_coming)


def _check_synthesis(problems, syn, workdir, facts, finished_or_coming, num_synthetic) -> None:
  c = facts.num_classes
  for key, stage in (('teacher_dir', 'teacher'), ('stats_dir', 'stats')):
    if syn[key]:
      if _read_manifest(syn[key]) is None:
        problems.append(f'synthesis.{key}={syn[key]} holds no finished {stage} artifact '
                        f'({artifacts.MANIFEST_FILE} is missing): point it at the folder the '
                        f'{stage} stage wrote')
    elif not finished_or_coming(stage):
      problems.append(f'the synthesize stage needs a finished {stage} stage in '
                      f'{stage_dir(workdir, stage)}: add {stage} to --stages or set '
                      f'synthesis.{key}')
  if syn.teacher_dir and syn.stats_dir:
    tm, sm = _read_manifest(syn.teacher_dir), _read_manifest(syn.stats_dir)
    if tm and sm and tm.get('variables_sha256') != sm.get('teacher_sha256'):
      problems.append(f'the statistics in {syn.stats_dir} were computed with teacher sha256 '
                      f'{sm.get("teacher_sha256", "?")[:12]} but synthesis.teacher_dir has '
                      f'{tm.get("variables_sha256", "?")[:12]}: use the teacher the '
                      'statistics came from')
  if syn.adi_weight and syn.adi_student and _read_manifest(syn.adi_student) is None:
    problems.append(f'synthesis.adi_student={syn.adi_student} holds no finished model: point '
                    'it at a student or teacher folder')
  if syn.batch_size < 1:
    if num_synthetic:
      problems.append(f'synthesis.batch_size could not be derived: no multiple of the {c} '
                      f'classes divides both {num_synthetic} images and {facts.devices} '
                      'devices; set --config.synthesis.batch_size and images_per_class')
  else:
    if syn.batch_size % facts.devices:
      problems.append(f'synthesis.batch_size={syn.batch_size} is not divisible by the '
                      f'{facts.devices} devices: set it to a multiple of {facts.devices}')
    if num_synthetic and num_synthetic % syn.batch_size:
      problems.append(f'synthesis.batch_size={syn.batch_size} does not divide the '
                      f'{num_synthetic} images ({syn.images_per_class} per class x {c} '
                      'classes): choose a divisor, or 0 to derive it')


def _check_evaluate_and_audit(problems, config, workdir, facts, pending,
                              finished_or_coming) -> None:
  syn, student = config.synthesis, config.student
  if 'evaluate' in pending and not finished_or_coming('student'):
    problems.append(f'the evaluate stage needs a finished student in '
                    f'{stage_dir(workdir, "student")}: add student to --stages')
  if 'evaluate' in pending and config.evaluate.real_subset and facts.train_counts and (
      syn.images_per_class > 0 and facts.class_names):
    small = [f'{n} ({k})' for n, k in zip(facts.class_names, facts.train_counts)
             if k < syn.images_per_class]
    if small:
      problems.append(f'the real-subset baseline needs {syn.images_per_class} training images '
                      f'per class, but {", ".join(small[:5])} have fewer: lower '
                      'synthesis.images_per_class (0 derives it) or set '
                      'evaluate.real_subset=False')
  if 'evaluate' in pending and config.evaluate.full_real:
    _check_batch(problems, facts, 'student.batch_size', student.batch_size, facts.train_size,
                 'the training split (evaluate.full_real)')
  if 'audit' in pending and config.audit.reference_models and facts.train_size:
    members = min(config.audit.mia_examples, facts.train_size // 2)
    pool = int((facts.train_size - members) * config.audit.reference_train_fraction)
    if config.teacher.batch_size > pool:
      problems.append(f'teacher.batch_size={config.teacher.batch_size} is larger than the '
                      f'{pool} images each audit reference model trains on: lower it or set '
                      'audit.reference_models=0')


def _check_views(problems, config, workdir) -> None:
  from bnsynth_jax import synthetic_data
  from bnsynth_jax import student as student_lib
  syn, student = config.synthesis, config.student
  manifest_dir = stage_dir(workdir, 'synthesize')
  if (manifest_dir / 'manifest.json').exists():
    try:
      student_lib.check_views(student, synthetic_data.read_manifest(manifest_dir))
    except UserError as e:
      problems.append(str(e))
    return
  if not syn.view_epochs:
    problems.append('student.labels=views needs per-view labels: set synthesis.view_epochs > 0 '
                    '(e.g. the student\'s epochs) or student.labels=hard')
  elif (student.crop_padding, bool(student.flip)) != (syn.view_crop_padding, bool(syn.view_flip)):
    problems.append(f'student.crop_padding/flip ({student.crop_padding}, {student.flip}) differ '
                    f'from the views the teacher will label ({syn.view_crop_padding}, '
                    f'{syn.view_flip}): set them equal to synthesis.view_crop_padding / view_flip')


# ----------------------------------------------------------------------------


def run(config, workdir, stages, data) -> list[str]:
  """Derives values into `config` and checks everything; returns the derivation notes.

  `stages`: the selected pipeline.Stage records (their `validate` is each stage's own
  config check, raising UserError). Raises PreflightError with every problem found.
  """
  problems: list[str] = []
  for stage in stages:
    if stage.validate:
      try:
        stage.validate(config)
      except UserError as e:
        problems.append(str(e))
  selected = [stage.name for stage in stages]
  private = {stage.name for stage in stages if stage.private}
  pending = [s for s in selected if not is_done(workdir, s)]
  facts = _gather_facts(config, workdir, pending, private, data, problems)
  if privacy.enabled(config):
    problems.extend(_private_derivations(config, workdir, pending))
  notes = _derive(config, workdir, facts, data, problems, pending)
  notes += _derive_privacy(config, workdir, facts, problems, pending)
  _check_data(problems, config, facts, pending)
  _check_stages(problems, config, workdir, facts, pending, selected)
  problems = list(dict.fromkeys(problems))     # one line per distinct problem
  if problems:
    raise PreflightError(problems)
  for note in notes:
    logging.info('preflight: %s', note)
  return notes
