"""Trained-model artifacts: DIR/variables.msgpack + DIR/manifest.json.

The teacher stage, the student stage and pretrained/ all use this format. The
manifest says everything needed to rebuild and feed the model (architecture,
classes, image shape, normalisation) and carries the sha256 of the variables
file, which the statistics artifact and the synthetic dataset record so that a
mismatch is caught when they are used together. The manifest is written last:
its presence means the artifact is complete.
"""

from __future__ import annotations

from typing import Any

import jax

from bnsynth_jax import checkpointing, fileio, models
from bnsynth_jax.errors import UserError

VARIABLES_FILE = 'variables.msgpack'
MANIFEST_FILE = 'manifest.json'


def save_model(directory, *, model_config, variables, class_names, image_shape, mean, std,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes the artifact (process 0 only) and returns its manifest."""
  directory = fileio.path(directory)
  manifest = {
      **(extra or {}),      # first, so that the keys below always mean what they say
      'model': {'name': model_config.name, 'stem': model_config.stem,
                'dtype': model_config.dtype},
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
  model = models.create_model(m['name'], manifest['num_classes'], stem=m['stem'],
                              dtype=dtype or m['dtype'])
  return model, variables, manifest
