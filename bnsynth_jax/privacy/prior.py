"""A public prior in DP mode: DP-SGD fine-tunes a teacher made without the private data.

  --config.privacy.prior=DIR --config.privacy.prior_is_public=True

DIR is a teacher folder of the package's format (variables.msgpack + manifest.json): a
teacher the project's command trained on public or generated data, the data-free prior
shipped under pretrained/, or a converted public model. `prior_is_public=True` is the
data owner's declaration that DIR was made without the private data; the prior then
costs no privacy and the accountant counts the private DP-SGD steps only, exactly as
from scratch (the record names the prior and the sha256 of its weights).

`privacy.prior_trainable` chooses what DP-SGD trains: 'all', 'last_stage' (the last
ResNet stage and the head) or 'head'; the rest stays the prior's (no gradient: the clip
norm is spent on the trained parameters only; their updates, noise included, are
dropped). Normalisation keeps per-example gradients independent of the batch: GroupNorm,
or BatchNorm frozen in inference mode (the prior's running statistics, public). A head
of another class count (a prior trained on generated classes) starts from a fresh
initialisation; every other layer must match the configured model.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib

import jax
import numpy as np
from absl import logging

from bnsynth_jax import fileio
from bnsynth_jax.errors import UserError

TRAINABLE = ('all', 'last_stage', 'head')
HEAD = 'head'


def enabled(config) -> bool:
  return bool(config.get('privacy', {}).get('prior', ''))


def folder(config):
  """privacy.prior as given, or, relative and not found from here, in the source checkout
  the package runs from (the shipped pretrained/ priors: configs name them so)."""
  given = fileio.path(config.privacy.prior)
  checkout = fileio.path(str(pathlib.Path(__file__).resolve().parents[2] / config.privacy.prior))
  relative = not str(config.privacy.prior).startswith(('/', 'gs://'))
  return checkout if relative and not given.exists() and checkout.exists() else given


def problems(config) -> list[str]:
  """Config-only checks of a prior (privacy.validate reports them with the others)."""
  p = config.privacy
  if not enabled(config):
    return []
  out = []
  if not p.get('prior_is_public', False):
    out.append(f'privacy.prior={p.prior} costs no privacy only if it was made without the '
               'private data: declare it with --config.privacy.prior_is_public=True')
  if p.get('prior_trainable', 'all') not in TRAINABLE:
    out.append(f'privacy.prior_trainable={p.prior_trainable!r}: use one of {", ".join(TRAINABLE)}')
  if not (folder(config) / 'manifest.json').exists():
    out.append(f'privacy.prior={p.prior} holds no teacher (no manifest.json): give a teacher '
               'folder (WORKDIR/teacher of a run on public data, or pretrained/...)')
  return out


def frozen_batch_norm(config) -> bool:
  """A BatchNorm model fine-tuned from a prior runs its normalisation in inference mode."""
  return enabled(config) and config.model.get('norm', 'batch') == 'batch'


def weights_sha256(prior_dir) -> str:
  return hashlib.sha256((fileio.path(prior_dir) / 'variables.msgpack').read_bytes()).hexdigest()


def record(config) -> dict:
  """What every manifest's privacy record says of the prior."""
  p = config.privacy
  manifest = fileio.read_json(folder(config) / 'manifest.json')
  return {'folder': str(p.prior), 'variables_sha256': weights_sha256(folder(config)),
          'declared_public': bool(p.prior_is_public),
          'trainable': p.get('prior_trainable', 'all'),
          'normalisation': ('BatchNorm frozen (the prior\'s running statistics)'
                            if frozen_batch_norm(config) else 'GroupNorm'),
          'prior_classes': manifest.get('class_names'),
          'prior_command': manifest.get('command')}


def initial_variables(config, model, image_shape, rng, field: str = 'model') -> dict:
  """The prior's variables for `model` (checked against the config's `field`: model, or
  student.model), with a fresh head where the prior's has another class count."""
  from bnsynth_jax import artifacts, models
  where = config.privacy.prior
  _, prior, manifest = artifacts.load_model(folder(config))
  model_config = functools.reduce(getattr, field.split('.'), config)
  artifacts.check_same_model(manifest, model_config, f'privacy.prior {where}', field)
  if list(manifest['image_shape']) != list(image_shape):
    raise UserError(f'privacy.prior {where} takes {manifest["image_shape"]} images but the '
                    f'data is {list(image_shape)}: set --config.data.image_size and '
                    'data.channels to the prior\'s, or use a prior of this shape')
  fresh = models.init_variables(model, rng, image_shape)
  return {col: _merge(fresh[col], prior.get(col, {}), where) for col in fresh}


def _merge(fresh, prior, where):
  """The prior's leaf for every leaf of `fresh` of the same path and shape; the head's
  fresh leaves where its shape differs; an error for any other mismatch."""
  held = {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(prior)[0]}

  def pick(path, leaf):
    name = jax.tree_util.keystr(path)
    theirs = held.get(name)
    if theirs is not None and np.shape(theirs) == np.shape(leaf):
      return np.asarray(theirs, leaf.dtype)
    if name.startswith(f"['{HEAD}']"):
      logging.info('privacy.prior: %s%s starts fresh (the prior has %s)', HEAD, name[6:],
                   None if theirs is None else np.shape(theirs))
      return leaf
    raise UserError(f'privacy.prior {where} does not fit the configured model at {name}: '
                    'give a prior of the same architecture (model.name, widths)')

  return jax.tree_util.tree_map_with_path(pick, fresh)


def student_problems(config) -> list[str]:
  """student.init_from_prior needs a prior declared public (it is then free: the student
  reads only it and the released synthetic set)."""
  if not config.student.get('init_from_prior', False):
    return []
  if not enabled(config):
    return ['student.init_from_prior=True starts the students from privacy.prior, which is '
            'empty: give --config.privacy.prior=DIR (a public teacher folder) or drop the flag']
  return [] if config.privacy.get('prior_is_public', False) else [
      f'student.init_from_prior=True reads privacy.prior={config.privacy.prior}: declare it '
      'public with --config.privacy.prior_is_public=True']


def student_start(config, num_classes: int, image_shape, seed: int) -> dict | None:
  """student.init_from_prior: the variables a student (and its real-subset baseline, the
  same recipe) starts from -- the public prior's, a fresh head where the class count
  differs; None (a random initialisation) otherwise."""
  if not config.student.get('init_from_prior', False):
    return None
  from bnsynth_jax import models
  model = models.from_config(config.student.model, num_classes)
  return initial_variables(config, model, image_shape, jax.random.key(seed), 'student.model')


def student_record(config) -> dict | None:
  """What a student's manifest says of its start: the prior, its sha256, the declaration."""
  if not config.student.get('init_from_prior', False):
    return None
  return {'prior': str(config.privacy.prior), 'variables_sha256': weights_sha256(folder(config)),
          'declared_public': bool(config.privacy.prior_is_public)}


def trainable_mask(params, which: str):
  """True for the parameters DP-SGD trains (`which` in TRAINABLE)."""
  stages = sorted({k.split('_')[0] for k in params if k.startswith('stage')})

  def trains(path, _):
    top = str(path[0].key)
    return (which == 'all' or top == HEAD
            or (which == 'last_stage' and bool(stages) and top.startswith(stages[-1] + '_')))

  return jax.tree_util.tree_map_with_path(trains, params)
