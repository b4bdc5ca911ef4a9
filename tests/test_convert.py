"""bnsynth_jax.convert: torchvision / flax ResNets as teacher folders (a DP prior)."""

import importlib.util
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
  assert manifest['model'] == {'name': 'resnet18', 'stem': 'imagenet', 'dtype': 'float32'}
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
  code = 'import sys, bnsynth_jax.convert; assert "torch" not in sys.modules, "torch imported"'
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
