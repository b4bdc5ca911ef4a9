"""The artifact formats: trained models, and the BN statistics.

Trained models: DIR/variables.msgpack + DIR/manifest.json.

The teacher stage, the student stage and pretrained/ all use this format. The
manifest says everything needed to rebuild and feed the model (architecture,
classes, image shape, normalisation) and carries the sha256 of the variables
file, which the statistics artifact and the synthetic dataset record so that a
mismatch is caught when they are used together. The manifest is written last:
its presence means the artifact is complete.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np
from flax import serialization, traverse_util

from bnsynth_jax import checkpointing, fileio, models, parallel
from bnsynth_jax.errors import UserError

VARIABLES_FILE = 'variables.msgpack'
MANIFEST_FILE = 'manifest.json'


def model_record(model_config) -> dict[str, str]:
  """The manifest's 'model': name, stem, dtype, and norm when it is not BatchNorm (so the
  manifests of BatchNorm models stay as they were); with the ImageNet stem, the padding
  layout (models.py: torchvision's symmetric padding since 2026-12-03)."""
  record = {'name': model_config.name, 'stem': model_config.stem, 'dtype': model_config.dtype}
  if model_config.get('norm', 'batch') != 'batch':
    record['norm'] = model_config.norm
  if model_config.stem == 'imagenet':
    record['padding'] = IMAGENET_STEM_PADDING
  return record


IMAGENET_STEM_PADDING = 'symmetric'


def _check_layout(directory, m: dict) -> None:
  """An ImageNet-stem model saved before its padding became torchvision's (one-sided 'SAME'
  on the stride-2 layers then) would compute other features with the same weights."""
  if m['stem'] == 'imagenet' and m.get('padding') != IMAGENET_STEM_PADDING:
    raise UserError(f'{directory} holds an ImageNet-stem {m["name"]} saved with the padding '
                    'layout before 2026-12-03 (one-sided on stride-2 layers), which this '
                    'version does not build: train it again (a folder converted from a torchvision '
                    '.pth: convert the .pth again; converting its variables with --flax would '
                    'keep the old layout)')


def save_model(directory, *, model_config, variables, class_names, image_shape, mean, std,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes the artifact (process 0 only) and returns its manifest."""
  directory = fileio.path(directory)
  manifest = {
      **(extra or {}),      # first, so that the keys below always mean what they say
      'model': model_record(model_config),
      'num_classes': len(class_names), 'class_names': list(class_names),
      'image_shape': list(image_shape), 'mean': list(map(float, mean)),
      'std': list(map(float, std)),
  }
  if jax.process_index() == 0:
    manifest['variables_sha256'] = checkpointing.save_variables(
        directory / VARIABLES_FILE, variables)
    fileio.atomic_write_json(directory / MANIFEST_FILE, manifest)
  else:
    manifest['variables_sha256'] = checkpointing.variables_hash(variables)
  return manifest


def check_same_model(manifest: dict, model_config, what: str, field: str = 'model') -> None:
  """Raises a UserError naming the first of name / stem / norm in which the artifact of
  `manifest` (described as `what`, e.g. 'privacy.prior DIR') differs from `model_config`, the
  config's `field` (model, or student.model)."""
  for key in ('name', 'stem', 'norm'):
    held = manifest['model'].get(key, 'batch')
    wanted = model_config.get(key, 'batch')
    if held != wanted:
      raise UserError(f'{what} holds model.{key}={held!r} but the config says {wanted!r}: set '
                      f'--config.{field}.{key}={held}')


def load_model(directory, dtype: str | None = None):
  """Returns (model, variables, manifest); raises UserError if incomplete or altered."""
  directory = fileio.path(directory)
  manifest_path = directory / MANIFEST_FILE
  if not manifest_path.exists():
    raise UserError(f'{directory} holds no finished model ({MANIFEST_FILE} is missing): point '
                    'at a folder written by the teacher or student stage')
  manifest = fileio.read_json(manifest_path)
  variables, digest = checkpointing.load_variables(directory / VARIABLES_FILE)
  if digest != manifest['variables_sha256']:
    raise UserError(f'{directory / VARIABLES_FILE} does not match its manifest (sha256 '
                    f'{digest[:12]} != {manifest["variables_sha256"][:12]}): the file was '
                    'altered or half-copied; copy the folder again')
  m = manifest['model']
  _check_layout(directory, m)
  model = models.create_model(m['name'], manifest['num_classes'], stem=m['stem'],
                              dtype=dtype or m['dtype'], norm=m.get('norm', 'batch'))
  return model, variables, manifest


# ----------------------------------------------------------------------------
# BN statistics

STATS_FILE = 'statistics.msgpack'


def layer_key(path: tuple[str, ...]) -> str:
  return '/'.join(path)


def global_statistics(variables) -> dict[str, dict[str, np.ndarray]]:
  """{'mean': {layer: [ch]}, 'var': {layer: [ch]}} from the teacher's batch_stats."""
  flat = traverse_util.flatten_dict(variables.get('batch_stats') or {})
  out = {'mean': {}, 'var': {}}
  for path, value in flat.items():
    out[path[-1]][layer_key(path[:-1])] = np.asarray(value, np.float64)
  return out


# ----------------------------------------------------------------------------
# The statistics artifact (written by the stats stage, read by synthesis)


def save_statistics(directory, *, kind, statistics, class_counts, teacher_manifest, layers):
  directory = fileio.path(directory)
  payload = {'mean': statistics['mean'], 'var': statistics['var'],
             'class_counts': np.asarray(class_counts, np.float64)}
  data = serialization.msgpack_serialize(
      jax.tree.map(lambda a: np.asarray(a, np.float32) if np.ndim(a) else a, payload))
  manifest = {
      'kind': kind,
      'class_names': teacher_manifest['class_names'],
      'num_classes': teacher_manifest['num_classes'],
      'image_shape': teacher_manifest['image_shape'],
      'mean': teacher_manifest['mean'], 'std': teacher_manifest['std'],
      'model': teacher_manifest['model'],
      'teacher_sha256': teacher_manifest['variables_sha256'],
      'layers': [layer_key(p) for p in layers],
      'statistics_sha256': hashlib.sha256(data).hexdigest(),
      'class_counts': np.asarray(class_counts).tolist(),
  }
  if 'privacy' in teacher_manifest:   # the DP record: teacher and statistics together
    manifest['privacy'] = teacher_manifest['privacy']
  if parallel.is_main_process():
    fileio.atomic_write_bytes(directory / STATS_FILE, data)
    fileio.atomic_write_json(directory / 'manifest.json', manifest)
  return manifest


def load_statistics(directory, teacher_manifest=None, teacher_variables=None):
  """Returns (statistics, manifest); refuses altered files or a different teacher."""
  directory = fileio.path(directory)
  if not (directory / 'manifest.json').exists():
    raise UserError(f'{directory} holds no statistics artifact (manifest.json is missing): run '
                    'the stats stage or point synthesis.stats_dir at its folder')
  manifest = fileio.read_json(directory / 'manifest.json')
  data = (directory / STATS_FILE).read_bytes()
  if hashlib.sha256(data).hexdigest() != manifest['statistics_sha256']:
    raise UserError(f'{directory / STATS_FILE} does not match its manifest: the file was '
                    'altered or half-copied; copy the statistics folder again')
  statistics = serialization.msgpack_restore(data)
  if teacher_manifest is not None:
    if teacher_manifest['variables_sha256'] != manifest['teacher_sha256']:
      raise UserError(
          f'the statistics in {directory} were computed with teacher sha256 '
          f'{manifest["teacher_sha256"][:12]} but the teacher given has '
          f'{teacher_manifest["variables_sha256"][:12]}: use the teacher checkpoint the '
          'statistics came from, or recompute the statistics (stats stage)')
    for key in ('class_names', 'image_shape', 'model'):
      if teacher_manifest[key] != manifest[key]:
        raise UserError(f'statistics and teacher disagree on {key} ({manifest[key]} vs '
                        f'{teacher_manifest[key]}): use matching artifacts')
  if teacher_variables is not None:
    expected = global_statistics(teacher_variables)['mean']
    lead = (manifest['num_classes'],) if manifest['kind'] == 'classwise' else ()
    for name, value in expected.items():
      got = statistics['mean'].get(name)
      if got is None or tuple(got.shape) != lead + value.shape:
        raise UserError(f'statistics layer {name} has shape '
                        f'{None if got is None else got.shape}, the teacher needs '
                        f'{lead + value.shape}: the statistics belong to another model')
  return statistics, manifest
