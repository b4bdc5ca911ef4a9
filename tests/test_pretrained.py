"""The committed CIFAR-10 teachers (pretrained/cifar10_resnet20*) load intact and still classify.

The accuracy check reads real CIFAR-10 test images and skips where the image folder is absent
(CI); the integrity checks need only the committed files.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnsynth_jax import artifacts, augment, config_lib, input_pipeline, sources, train
from bnsynth_jax.errors import UserError

PRETRAINED = pathlib.Path(__file__).resolve().parents[1] / 'pretrained' / 'cifar10_resnet20'
# The 30-epoch teacher, the one trained 20 more epochs from it (teacher.init_from), and the one
# trained 30 more from that (80 epochs in all).
TEACHERS = [PRETRAINED, PRETRAINED.with_name('cifar10_resnet20_50ep'),
            PRETRAINED.with_name('cifar10_resnet20_80ep')]
each_teacher = pytest.mark.parametrize('folder', TEACHERS, ids=lambda p: p.name)
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck']

pytestmark = pytest.mark.skipif(not (PRETRAINED / 'manifest.json').exists(),
                                reason=f'{PRETRAINED} is not committed in this checkout')


@pytest.mark.versions
@each_teacher
def test_committed_teacher_loads_with_the_structure_of_a_fresh_resnet20(folder):
  model, variables, manifest = artifacts.load_model(folder)  # checks the sha256
  assert manifest['model']['name'] == 'resnet20'
  assert manifest['class_names'] == CIFAR10_CLASSES
  assert manifest['image_shape'] == [32, 32, 3]
  fresh = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  shapes = lambda tree: jax.tree.map(lambda a: tuple(np.shape(a)), tree)
  assert shapes(dict(variables)) == shapes(dict(fresh))
  assert set(variables) == {'params', 'batch_stats'}


@pytest.mark.versions
def test_altered_teacher_file_is_refused(tmp_path):
  copy = tmp_path / 'teacher'
  copy.mkdir()
  for f in PRETRAINED.iterdir():
    copy.joinpath(f.name).write_bytes(f.read_bytes())
  data = bytearray(copy.joinpath('variables.msgpack').read_bytes())
  data[-1] ^= 0xFF
  copy.joinpath('variables.msgpack').write_bytes(bytes(data))
  with pytest.raises(UserError, match='does not match its manifest'):
    artifacts.load_model(copy)


@each_teacher
def test_committed_teacher_accuracy_on_real_cifar10_test_images(cifar_root, folder):
  model, variables, manifest = artifacts.load_model(folder)
  data = config_lib.default_config().data
  data.source, data.root, data.image_size = 'imagefolder', str(cifar_root), 32
  # Partition 0 of 10 strided partitions: every 10th test image, all classes (1,000 images).
  [part] = sources.create_source(data).load('test', [0], 10)
  assert len(part) == 1000
  x = augment.normalise(jnp.asarray(part.images), manifest['mean'], manifest['std'])
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  logits = np.concatenate([np.asarray(apply(variables, x[i:i + 250])) for i in range(0, 1000, 250)])
  accuracy = float(np.mean(logits.argmax(-1) == part.labels))
  # The manifest records the whole-test-split accuracy; 1,000 images sit within a few points.
  assert accuracy >= manifest['test_accuracy'] - 0.04, (accuracy, manifest['test_accuracy'])
  assert accuracy >= 0.85


def test_export_readme_counts_epochs_along_the_init_from_chain():
  spec = importlib.util.spec_from_file_location(
      'export_pretrained', PRETRAINED.parents[1] / 'benchmarks' / 'export_pretrained.py')
  export = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(export)
  epochs = {}
  for folder in TEACHERS:
    manifest = artifacts.load_model(folder)[2]
    epochs[folder.name] = export._total_epochs(f'pretrained/{folder.name}', manifest['epochs'])
  assert epochs == {'cifar10_resnet20': 30, 'cifar10_resnet20_50ep': 50, 'cifar10_resnet20_80ep': 80}
  assert '(80 in all)' in (TEACHERS[-1] / 'README.md').read_text()
