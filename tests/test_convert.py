"""bnsynth_jax.convert: torchvision / flax ResNets as teacher folders (a DP prior)."""

import importlib.util
import json
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from bnsynth_jax import artifacts, checkpointing, convert, models
from bnsynth_jax.errors import UserError


def _torch():
  """torch, or the test skips: the converter's torchvision tests need it (not a dependency)."""
  return pytest.importorskip(
      'torch', reason='PyTorch is not installed (optional: pip install -e .[torch])')


def _torchvision_resnet():
  """torchvision.models.resnet. A torchvision wheel built for another torch (here a CUDA
  build beside the CPU torch) fails on its compiled ops at import; its ResNet is plain Python,
  so that module alone is loaded then."""
  _torch()
  try:
    import torchvision.models.resnet as resnet
    return resnet
  except (ImportError, RuntimeError, OSError):
    pass
  spec = importlib.util.find_spec('torchvision')
  if spec is None:
    pytest.skip('torchvision is not installed (pip install torchvision)')
  for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
    del sys.modules[name]
  package = types.ModuleType('torchvision')
  package.__path__ = [str(pathlib.Path(spec.origin).parent)]
  sys.modules['torchvision'] = package
  import torchvision.models.resnet as resnet
  return resnet


def _random_torchvision(arch: str, num_classes: int, seed: int):
  """A randomly initialised torchvision ResNet in eval mode, its BatchNorm running
  statistics and affine parameters drawn too (so every converted leaf matters)."""
  torch = _torch()
  torch.manual_seed(seed)
  net = getattr(_torchvision_resnet(), arch)(num_classes=num_classes)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.3, 0.7)
        m.bias.uniform_(-0.2, 0.2)
  return net.eval()


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_torchvision_logits_match(arch):
  torch = _torch()
  net = _random_torchvision(arch, num_classes=7, seed=0)
  # 48x48: the stride-2 layers meet an odd side (3 -> 2), where padding conventions differ.
  x = np.random.default_rng(1).normal(size=(3, 48, 48, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  state = net.state_dict()
  assert convert.arch_of_torchvision(state) == arch
  variables = convert.from_torchvision(state)
  convert.check_fits(variables, arch, 7, (48, 48, 3))
  model = models.create_model(arch, 7, stem='imagenet')
  got = np.asarray(jax.jit(model.apply)(variables, x))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_cli_writes_a_teacher_folder_the_prior_loads(tmp_path):
  torch = _torch()
  net = _random_torchvision('resnet18', num_classes=5, seed=2)
  pth = tmp_path / 'r18.pth'
  torch.save(net.state_dict(), pth)
  out = tmp_path / 'prior'
  run = subprocess.run([sys.executable, '-m', 'bnsynth_jax.convert', f'--torchvision={pth}',
                        '--image_size=40', f'--out={out}'], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  model, variables, manifest = artifacts.load_model(out)
  assert manifest['model'] == {'name': 'resnet18', 'stem': 'imagenet', 'dtype': 'float32',
                               'padding': 'symmetric'}
  assert manifest['image_shape'] == [40, 40, 3] and manifest['num_classes'] == 5
  assert manifest['mean'] == pytest.approx(convert.IMAGENET_MEAN)
  assert manifest['converted_from']['format'] == 'torchvision'
  x = np.random.default_rng(3).normal(size=(2, 40, 40, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), want, atol=1e-4, rtol=0)
  again = subprocess.run([sys.executable, '-m', 'bnsynth_jax.convert', f'--torchvision={pth}',
                          f'--out={out}'], capture_output=True, text=True)
  assert again.returncode == 2 and 'already holds a model' in again.stderr


def test_imagenet_stem_pads_like_torch_without_torch():
  """The layout the torchvision test checks, without torch (it runs in CI): the 7x7 stem and
  a stride-2 3x3 pad k // 2 on both sides, and the max-pool pads with -inf one on each side,
  at even sides (32 -> 16 -> 8), where flax's 'SAME' pads a stride-2 layer (0, 1)."""
  from jax import lax
  model = models.create_model('resnet18', 3, stem='imagenet')
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  out = state['intermediates']
  params = variables['params']

  def conv(inputs, kernel, stride, pad):
    return lax.conv_general_dilated(inputs, kernel, (stride, stride), [(pad, pad)] * 2,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  np.testing.assert_allclose(out['stem_conv']['__call__'][0],
                             conv(x, params['stem_conv']['kernel'], 2, 3), atol=1e-5)
  stage1 = out['stage1_block2']['__call__'][0]
  np.testing.assert_allclose(out['stage2_block1']['conv1']['__call__'][0],
                             conv(stage1, params['stage2_block1']['conv1']['kernel'], 2, 1),
                             atol=1e-5)
  stem = np.asarray(jax.nn.relu(out['stem_bn']['__call__'][0]))
  padded = np.pad(stem, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  pooled = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                               for j in range(8)], axis=1) for i in range(8)], axis=1)
  block1_input = conv(pooled, params['stage1_block1']['conv1']['kernel'], 1, 1)
  np.testing.assert_allclose(out['stage1_block1']['conv1']['__call__'][0], block1_input,
                             atol=1e-4)


@pytest.mark.versions
def test_old_imagenet_layout_is_refused(tmp_path):
  """A teacher folder saved before the padding changed (no layout marker) is refused."""
  model = models.create_model('resnet18', 3, stem='imagenet')
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  manifest = convert.write_teacher_folder(tmp_path / 't', variables, arch='resnet18',
                                          image_size=32, source={'format': 'flax'})
  assert manifest['model']['padding'] == 'symmetric'
  artifacts.load_model(tmp_path / 't')
  path = tmp_path / 't' / artifacts.MANIFEST_FILE
  old = json.loads(path.read_text())
  del old['model']['padding']
  path.write_text(json.dumps(old))
  with pytest.raises(UserError, match='padding layout before 2026-12-03'):
    artifacts.load_model(tmp_path / 't')
  # Its weights converted again with --flax would be stamped with the new layout: refused.
  with pytest.raises(UserError, match='converting it would not change its features'):
    convert.refuse_old_layout_folder(tmp_path / 't' / artifacts.VARIABLES_FILE)
  old['model']['padding'] = 'symmetric'
  path.write_text(json.dumps(old))
  convert.refuse_old_layout_folder(tmp_path / 't' / artifacts.VARIABLES_FILE)


def test_bad_inputs_are_user_errors(tmp_path):
  """A file that is no state dict, a tree without a head, a bad --mean: one-line errors."""
  junk = tmp_path / 'junk.msgpack'
  junk.write_bytes(b'not msgpack at all')
  with pytest.raises(UserError, match='not a readable flax checkpoint'):
    convert.load_flax_variables(junk)
  model = models.create_model('resnet18', 3, stem='imagenet')
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  headless = {'params': {k: v for k, v in variables['params'].items() if k != 'head'},
              'batch_stats': variables['batch_stats']}
  with pytest.raises(UserError, match='no classifier head'):
    convert.write_teacher_folder(tmp_path / 'h', headless, arch='resnet18', image_size=32,
                                 source={})
  with pytest.raises(UserError, match='unexpected torchvision parameter'):
    convert.from_torchvision({'fc.scale': np.zeros(3)})
  source = tmp_path / 'v.msgpack'
  checkpointing.save_variables(source, variables)
  run = subprocess.run([sys.executable, '-m', 'bnsynth_jax.convert', f'--flax={source}',
                        '--arch=resnet18', f'--out={tmp_path}/o'],
                       capture_output=True, text=True)
  assert run.returncode == 2 and '--mean=R,G,B' in run.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'o').exists()
  with pytest.raises(UserError, match='--class_names=.* is not a readable text file'):
    convert.read_class_names(tmp_path / 'no_names.txt')


@pytest.mark.versions
def test_flax_msgpack_round_trip(tmp_path):
  model = models.create_model('resnet18', 4, stem='imagenet')
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  source = tmp_path / 'v.msgpack'
  sha = checkpointing.save_variables(source, variables)
  loaded = convert.load_flax_variables(source)
  manifest = convert.write_teacher_folder(tmp_path / 'out', loaded, arch='resnet18',
                                          image_size=32, source={'format': 'flax'})
  assert manifest['variables_sha256'] == sha


def test_wrong_architecture_is_a_user_error():
  model = models.create_model('resnet18', 4, stem='imagenet')
  variables = jax.tree.map(np.asarray, models.init_variables(model, jax.random.key(0),
                                                             (32, 32, 3)))
  with pytest.raises(UserError, match='do not fit resnet34'):
    convert.check_fits(variables, 'resnet34', 4, (32, 32, 3))
  with pytest.raises(UserError, match='unexpected torchvision parameter'):
    convert.from_torchvision({'features.0.weight': np.zeros((3, 3, 1, 1))})
  with pytest.raises(UserError, match='blocks per stage'):
    convert.arch_of_torchvision({'layer1.0.conv1.weight': 0})


def test_cli_missing_file_is_one_line_error(tmp_path):
  run = subprocess.run([sys.executable, '-m', 'bnsynth_jax.convert',
                        f'--torchvision={tmp_path}/none.pth', f'--out={tmp_path}/o'],
                       capture_output=True, text=True)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'does not exist' in run.stderr and not (tmp_path / 'o').exists()


def test_convert_imports_no_torch():
  # torch blocked (an import of it raises), so the test fails also where torch is installed.
  code = ('import sys; sys.modules["torch"] = None; sys.modules["torchvision"] = None; '
          'import bnsynth_jax.convert')
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-1000:]


def test_dp_mode_normalises_with_the_priors_constants(tmp_path):
  from bnsynth_jax import config_lib, preflight
  model = models.create_model('resnet18', 4, stem='imagenet')
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  convert.write_teacher_folder(tmp_path / 'prior', variables, arch='resnet18', image_size=32,
                               source={'format': 'flax'})
  config = config_lib.default_config()
  config.privacy.prior = str(tmp_path / 'prior')
  mean, std, whose = preflight._public_normalisation(config, 3)
  assert mean == pytest.approx(convert.IMAGENET_MEAN) and std == pytest.approx(convert.IMAGENET_STD)
  assert 'prior' in whose
  config.privacy.prior = ''
  assert preflight._public_normalisation(config, 1)[:2] == ((0.5,), (0.5,))
