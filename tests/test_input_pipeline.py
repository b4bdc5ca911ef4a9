import ml_collections
import numpy as np
import pytest
from PIL import Image

from bnsynth_jax import config_lib, input_pipeline, sources
from bnsynth_jax.errors import UserError


def data_config(**kw):
  c = config_lib.default_config().data
  c.update(kw)
  return c


def test_digits_source():
  src = sources.create_source(data_config(source='digits'))
  info = src.info()
  assert info.image_shape == (8, 8, 1) and info.num_classes == 10
  assert info.num_examples['train'] + info.num_examples['test'] == 1797
  [train] = src.load('train', [0], 1)
  assert train.images.dtype == np.uint8 and train.images.max() == 255
  assert len(train) == info.num_examples['train']
  assert set(np.unique(train.labels)) == set(range(10))
  # Stratified split: every class is in the test split at ~20%.
  [test] = src.load('test', [0], 1)
  counts = np.bincount(test.labels, minlength=10)
  assert counts.min() >= 30


def test_image_folder_mixed_modes_and_sizes(tmp_path):
  root = tmp_path / 'imgs'
  rng = np.random.RandomState(0)
  specs = {'a': [('RGB', (20, 20)), ('L', (16, 24)), ('RGBA', (40, 30))],
           'b': [('P', (20, 20)), ('RGB', (10, 10))]}
  for split in ('train', 'test'):
    for cls, items in specs.items():
      (root / split / cls).mkdir(parents=True)
      for i, (mode, size) in enumerate(items):
        arr = rng.randint(0, 256, (size[1], size[0], 3), np.uint8)
        ext = 'jpg' if mode == 'L' else 'png'
        Image.fromarray(arr).convert(mode).save(root / split / cls / f'{i}.{ext}')
  src = sources.create_source(data_config(source='imagefolder', root=str(root),
                                                 image_size=16))
  info = src.info()
  assert info.class_names == ('a', 'b') and info.image_shape == (16, 16, 3)
  assert info.num_examples == {'train': 5, 'test': 5}
  [part] = src.load('train', [0], 1)
  assert part.images.shape == (5, 16, 16, 3) and part.images.dtype == np.uint8
  assert sorted(part.labels.tolist()) == [0, 0, 0, 1, 1]
  gray = sources.create_source(data_config(source='imagefolder', root=str(root),
                                                  image_size=8, channels=1))
  assert gray.load('test', [0], 1)[0].images.shape == (5, 8, 8, 1)


def test_image_folder_grayscale_is_detected(tmp_path):
  from conftest import write_image_folder
  root = write_image_folder(tmp_path / 'g', modes=('L',))
  src = sources.create_source(data_config(source='imagefolder', root=str(root)))
  assert src.info().image_shape == (12, 12, 1)


def test_partitions_cover_the_split_once(image_folder):
  src = sources.create_source(data_config(source='imagefolder', root=str(image_folder)))
  whole = src.load('train', [0], 1)[0]
  parts = src.load('train', [0, 1, 2], 3)
  assert sum(len(p) for p in parts) == len(whole)
  key = lambda imgs: sorted(x.tobytes() for x in imgs)
  assert key(np.concatenate([p.images for p in parts])) == key(whole.images)


def test_batches_do_not_depend_on_the_process_split():
  """The global batch is the same whether one process holds all partitions or two hold half."""
  src = sources.create_source(data_config(source='digits'))
  size = src.info().num_examples['train']
  all_parts = src.load('train', [0, 1, 2, 3], 4)
  one = input_pipeline.PartitionedBatches(all_parts, 4, size, 32, seed=3)
  halves = [input_pipeline.PartitionedBatches(src.load('train', ids, 4), 4, size, 32, seed=3)
            for ids in ([0, 1], [2, 3])]
  for step in (0, 5, one.steps_per_epoch + 2):
    whole = one.get(step)
    joined = {k: np.concatenate([h.get(step)[k] for h in halves]) for k in whole}
    for k in whole:
      np.testing.assert_array_equal(whole[k], joined[k])
  # Different epochs see different orders; one epoch has no repeats within a partition.
  assert not np.array_equal(one.get(0)['labels'], one.get(one.steps_per_epoch)['labels'])


def test_eval_batches_pad_and_mask():
  src = sources.create_source(data_config(source='digits'))
  parts = src.load('test', [0, 1], 2)
  size = src.info().num_examples['test']
  batches = list(input_pipeline.eval_batches(parts, size, 2, 1, 100))
  assert sum(b['mask'].sum() for b in batches) == size
  assert all(b['images'].shape[0] == 100 for b in batches)


def test_tfds_code_path_with_image_folder_builder(image_folder):
  tfds = pytest.importorskip('tensorflow_datasets')
  builder = tfds.ImageFolder(str(image_folder))
  src = sources.TfdsSource(data_config(source='tfds', name='image_folder', image_size=12),
                                  builder=builder)
  info = src.info()
  assert info.class_names == ('cat', 'dog', 'fish') and info.image_shape[:2] == (12, 12)
  parts = src.load('train', [0, 1], 2)
  ref = sources.create_source(data_config(source='imagefolder', root=str(image_folder)))
  whole = ref.load('train', [0], 1)[0]
  got = sorted((x.tobytes(), int(y)) for p in parts for x, y in zip(p.images, p.labels))
  want = sorted((x.tobytes(), int(y)) for x, y in zip(whole.images, whole.labels))
  assert got == want


@pytest.mark.parametrize('mutate,match', [
    (lambda root: None, 'does not exist'),
    (lambda root: root.mkdir(), 'is empty'),
    (lambda root: (root / 'train').mkdir(parents=True), 'holds no class folders'),
    (lambda root: (root / 'other' / 'a').mkdir(parents=True), "no 'train' split"),
])
def test_image_folder_errors(tmp_path, mutate, match):
  root = tmp_path / 'missing'
  mutate(root)
  with pytest.raises(UserError, match=match):
    sources.create_source(data_config(source='imagefolder', root=str(root))).info()
