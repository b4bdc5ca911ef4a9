"""A public model the user already has, as a teacher folder (a DP prior, or a teacher).

  python -m bnsynth_jax.convert --torchvision=resnet18.pth --arch=resnet18 \
      --image_size=64 --out=priors/resnet18_imagenet
  python -m bnsynth_jax.convert --flax=CKPT --arch=resnet18 --mean=0.5,0.5,0.5 \
      --std=0.5,0.5,0.5 --image_size=64 --out=priors/resnet18_flax

--torchvision: a torchvision ResNet-18/34/50 state dict (`torch.save(model.state_dict())`,
e.g. the ImageNet weights torchvision downloads; reading it needs torch, nothing else does).
--flax: an orbax checkpoint folder or a flax msgpack file holding {'params', 'batch_stats'}
in this package's module names (a model trained with bnsynth_jax.models elsewhere; one with
the ImageNet stem trained before 2026-12-03 padded its stride-2 layers on one side, and
computes other features in today's layout). --mean / --std: the normalisation its inputs
were trained with (required with --flax; torchvision's ImageNet constants by default).

The result is this package's ResNet with the ImageNet stem, which is torchvision's layout
exactly (bnsynth_jax/models.py), in the teacher-folder format (variables.msgpack +
manifest.json, artifacts.py). Use it as

  --config.privacy.prior=priors/resnet18_imagenet --config.privacy.prior_is_public=True \
      --config.model.name=resnet18 --config.model.stem=imagenet --config.model.norm=batch \
      --config.data.image_size=64

Input resolution: the convolutions take any size, so --image_size only states the size the
folder is used at (privacy.prior checks it against data.image_size). ImageNet models were
trained at 224x224; their 7x7 stride-2 stem and max-pool divide the side by 4 and the
network by 32 in all, so 32x32 images leave a 1x1 map at the last stage. Resizing the data
up (data.image_size 64 or more) keeps more of what the prior learned, at (size / 32)^2 the
compute. Normalisation: the manifest records torchvision's ImageNet mean / std (pixels in
[0, 1]); in DP mode the preflight takes a prior's mean / std as the public constants.
A 1,000-class head starts fresh when the private task has other classes (privacy/prior.py).
"""

from __future__ import annotations

import hashlib
import re
import sys
from typing import Any, Mapping

import numpy as np
from absl import app, flags, logging

from bnsynth_jax import artifacts, fileio, models
from bnsynth_jax.errors import UserError

ARCHS = ('resnet18', 'resnet34', 'resnet50')
IMAGENET_MEAN = (0.485, 0.456, 0.406)      # torchvision's transforms for its ImageNet weights
IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCH_NORMS = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def _module_name(torch_prefix: str) -> str:
  """torchvision's module path -> this package's: conv1 -> stem_conv, layer2.0.bn1 ->
  stage2_block1/bn1, layer2.0.downsample.0 -> stage2_block1/proj_conv, fc -> head."""
  fixed = {'conv1': 'stem_conv', 'bn1': 'stem_bn', 'fc': 'head'}
  if torch_prefix in fixed:
    return fixed[torch_prefix]
  m = re.fullmatch(r'layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)', torch_prefix)
  if not m:
    raise UserError(f'unexpected torchvision parameter {torch_prefix!r}: give the state dict '
                    f'of a torchvision ResNet ({", ".join(ARCHS)})')
  layer = {'downsample.0': 'proj_conv', 'downsample.1': 'proj_bn'}.get(m[3], m[3])
  return f'stage{m[1]}_block{int(m[2]) + 1}/{layer}'


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):       # a torch tensor (float() first: numpy has no bfloat16)
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def from_torchvision(state_dict: Mapping[str, Any]) -> dict:
  """{'params', 'batch_stats'} for this package's ResNet (ImageNet stem) from a torchvision
  ResNet state dict: convolution kernels OIHW -> HWIO, the linear layer transposed."""
  out: dict = {'params': {}, 'batch_stats': {}}
  for key, value in state_dict.items():
    prefix, _, leaf = key.rpartition('.')
    if leaf == 'num_batches_tracked':
      continue
    array = _as_numpy(value)
    name = _module_name(prefix)
    if leaf == 'weight' and array.ndim == 4:
      collection, target, array = 'params', 'kernel', array.transpose(2, 3, 1, 0)
    elif name == 'head' and leaf in ('weight', 'bias'):
      collection, target = 'params', 'kernel' if leaf == 'weight' else 'bias'
      array = array.T if leaf == 'weight' else array
    elif name != 'head' and leaf in _TORCH_NORMS:
      collection, target = _TORCH_NORMS[leaf]
    else:
      raise UserError(f'unexpected torchvision parameter {key!r}: give the state dict of a '
                      f'torchvision ResNet ({", ".join(ARCHS)})')
    node = out[collection]
    for part in name.split('/'):
      node = node.setdefault(part, {})
    node[target] = array
  return out


def arch_of_torchvision(state_dict: Mapping[str, Any]) -> str:
  """resnet18 / 34 / 50 from the state dict's block counts and kinds."""
  blocks = sorted({tuple(k.split('.')[:2]) for k in state_dict if k.startswith('layer')})
  counts = tuple(sum(1 for b in blocks if b[0] == f'layer{i}') for i in range(1, 5))
  bottleneck = any(k.endswith('conv3.weight') for k in state_dict)
  by_shape = {((2, 2, 2, 2), False): 'resnet18', ((3, 4, 6, 3), False): 'resnet34',
              ((3, 4, 6, 3), True): 'resnet50'}
  if (counts, bottleneck) not in by_shape:
    raise UserError(f'the state dict has {counts} blocks per stage (bottleneck: {bottleneck}): '
                    f'not one of {", ".join(ARCHS)}')
  return by_shape[(counts, bottleneck)]


def check_fits(variables: dict, arch: str, num_classes: int, image_shape) -> None:
  """UserError naming the first leaf whose path or shape differs from the package's model."""
  import jax
  model = models.create_model(arch, num_classes, stem='imagenet')
  wanted = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_shape))
  held = {jax.tree_util.keystr(p): np.shape(v)
          for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(wanted)[0]:
    name = jax.tree_util.keystr(path)
    if held.pop(name, None) != leaf.shape:
      raise UserError(f'the converted weights do not fit {arch} at {name} (expected '
                      f'{leaf.shape}): give the checkpoint of a {arch}, or the matching --arch')
  if held:
    raise UserError(f'the converted weights hold {len(held)} leaves {arch} has not '
                    f'(first: {next(iter(held))}): give the checkpoint of a {arch}')


def load_torch_state_dict(path) -> dict:
  try:
    import torch
  except ImportError as e:
    raise UserError('--torchvision needs PyTorch to read the .pth file: '
                    'pip install -e .[torch]') from e
  try:
    state = torch.load(str(path), map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001  (torch raises several kinds for a bad file)
    raise UserError(f'{path} is not a readable state dict ({type(e).__name__}): save it with '
                    'torch.save(model.state_dict(), FILE)') from e
  if not isinstance(state, Mapping):
    raise UserError(f'{path} holds a {type(state).__name__}, not a state dict: save it with '
                    'torch.save(model.state_dict(), FILE)')
  if 'state_dict' in state and isinstance(state['state_dict'], Mapping):
    state = state['state_dict']
  return {k.removeprefix('module.'): v for k, v in state.items()}


def load_flax_variables(path) -> dict:
  """{'params', 'batch_stats'} from a flax msgpack file or an orbax checkpoint folder."""
  path = fileio.path(path)
  if path.is_dir():
    import orbax.checkpoint as ocp
    read = lambda: ocp.PyTreeCheckpointer().restore(str(path))
  else:
    from flax import serialization
    read = lambda: serialization.msgpack_restore(path.read_bytes())
  try:
    tree = read()
  except Exception as e:  # noqa: BLE001  (orbax / msgpack raise several kinds)
    raise UserError(f'{path} is not a readable flax checkpoint ({type(e).__name__}): give a '
                    'msgpack file or one orbax checkpoint step folder') from e
  if not isinstance(tree, Mapping) or 'params' not in tree:
    raise UserError(f'{path} holds no "params": give a checkpoint of {{"params", '
                    '"batch_stats"}} in bnsynth_jax.models names')
  return {'params': tree['params'], 'batch_stats': tree.get('batch_stats', {})}


def refuse_old_layout_folder(path) -> None:
  """A flax file inside a teacher folder whose manifest predates the ImageNet stem's
  symmetric padding: its weights were trained with the old layout, and converting them would
  stamp the new one on them (artifacts._check_layout)."""
  path = fileio.path(path)
  for folder in ([path] if path.is_dir() else []) + list(path.resolve().parents)[:3]:
    manifest = folder / 'manifest.json'
    if manifest.is_file():
      try:
        model = fileio.read_json(manifest).get('model', {})
      except (OSError, ValueError, AttributeError):
        return
      if model.get('stem') == 'imagenet' and model.get('padding') != artifacts.IMAGENET_STEM_PADDING:
        raise UserError(f'{path} belongs to {folder}, an ImageNet-stem model trained with the '
                        'padding layout before 2026-12-03: converting it would not change its '
                        'features; train it again')
      return


def read_class_names(path) -> list[str]:
  try:
    text = fileio.path(path).read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'--class_names={path} is not a readable text file '
                    f'({type(e).__name__}): give one class name per line') from e
  return [n.strip() for n in text.splitlines() if n.strip()]


def _file_sha256(path) -> str:
  path = fileio.path(path)
  files = sorted(p for p in path.rglob('*') if p.is_file()) if path.is_dir() else [path]
  digest = hashlib.sha256()
  for f in files:
    digest.update(f.read_bytes())
  return digest.hexdigest()


def write_teacher_folder(out, variables, *, arch, image_size, source: dict,
                         class_names=None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
  """Checks `variables` against the package's `arch` and writes the teacher folder."""
  import ml_collections
  head = variables['params'].get('head', {})
  if 'bias' not in head:
    raise UserError('the checkpoint has no classifier head (params/head/bias): give a whole '
                    'ResNet, head included')
  num_classes = np.shape(head['bias'])[0]
  class_names = list(class_names or [f'class_{i}' for i in range(num_classes)])
  if len(class_names) != num_classes:
    raise UserError(f'{len(class_names)} class names for a {num_classes}-class head: give '
                    f'{num_classes} or none')
  image_shape = (image_size, image_size, 3)
  check_fits(variables, arch, num_classes, image_shape)
  model_config = ml_collections.ConfigDict(
      {'name': arch, 'stem': 'imagenet', 'dtype': 'float32', 'norm': 'batch'})
  if fileio.path(out).exists() and (fileio.path(out) / artifacts.MANIFEST_FILE).exists():
    raise UserError(f'{out} already holds a model: choose another --out or delete it')
  return artifacts.save_model(out, model_config=model_config, variables=variables,
                              class_names=class_names, image_shape=image_shape,
                              mean=mean, std=std, extra={'converted_from': source})


FLAGS = flags.FLAGS
flags.DEFINE_string('torchvision', None, 'a torchvision ResNet state dict (.pth)')
flags.DEFINE_string('flax', None, 'an orbax checkpoint folder or flax msgpack file')
flags.DEFINE_enum('arch', None, ARCHS, 'the architecture (default: read from a torchvision '
                  'state dict; required with --flax)')
flags.DEFINE_integer('image_size', 64, 'the image side the folder is used at')
flags.DEFINE_string('out', None, 'the teacher folder to write')
flags.DEFINE_string('class_names', None, 'a text file, one class name per line')
flags.DEFINE_list('mean', None, 'per-channel input mean in [0, 1] the model was trained with '
                  '(required with --flax; default with --torchvision: ImageNet\'s)')
flags.DEFINE_list('std', None, 'per-channel input std (as --mean)')


def main(argv) -> None:
  if len(argv) > 1:
    print(f'error: unexpected arguments {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(2)
  try:
    convert()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


def _normalisation() -> tuple[tuple, tuple]:
  """--mean / --std as 3 floats each; torchvision's ImageNet constants for --torchvision."""
  if FLAGS.mean is None and FLAGS.std is None and FLAGS.torchvision:
    return IMAGENET_MEAN, IMAGENET_STD
  try:
    mean, std = tuple(map(float, FLAGS.mean or ())), tuple(map(float, FLAGS.std or ()))
  except ValueError as e:
    raise UserError(f'--mean / --std must be numbers ({e})') from e
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise UserError('give --mean=R,G,B and --std=R,G,B (3 values each, std > 0): the '
                    'normalisation the model was trained with')
  return mean, std


def convert() -> None:
  """The command line's conversion (flags read here)."""
  if bool(FLAGS.torchvision) == bool(FLAGS.flax) or not FLAGS.out:
    raise UserError('give --out=DIR and exactly one of --torchvision=FILE or --flax=PATH')
  source = FLAGS.torchvision or FLAGS.flax
  if not fileio.path(source).exists():
    raise UserError(f'{source} does not exist: give the path of the checkpoint to convert')
  if FLAGS.torchvision:
    state = load_torch_state_dict(source)
    arch = FLAGS.arch or arch_of_torchvision(state)
    variables = from_torchvision(state)
  else:
    if not FLAGS.arch:
      raise UserError('--flax needs --arch (one of ' + ', '.join(ARCHS) + ')')
    refuse_old_layout_folder(source)
    arch, variables = FLAGS.arch, load_flax_variables(source)
  names = read_class_names(FLAGS.class_names) if FLAGS.class_names else None
  mean, std = _normalisation()
  manifest = write_teacher_folder(
      FLAGS.out, variables, arch=arch, image_size=FLAGS.image_size, class_names=names,
      mean=mean, std=std,
      source={'format': 'torchvision' if FLAGS.torchvision else 'flax',
              'file': str(source), 'sha256': _file_sha256(source)})
  logging.info('wrote %s: %s, %d classes, %s images, variables sha256 %s', FLAGS.out, arch,
               manifest['num_classes'], manifest['image_shape'],
               manifest['variables_sha256'][:12])


if __name__ == '__main__':
  app.run(main)
