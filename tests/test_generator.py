"""synthesis.method=generator: the Fast-DFKD-style generator writes the same shards, resumes
exactly, and its sharded step equals one device's."""

import filecmp

import flax
import jax
import numpy as np
import pytest

from bnsynth_jax import parallel, synthesis, synthetic_data
from bnsynth_jax.errors import UserError
from bnsynth_jax.synthesis import generator
from test_synthesis import assert_eight_devices_equal_one, make_artifacts, synth_config


def gen_config(**kw):
  cfg = synth_config(method='generator', images_per_class=8, iterations=6,
                     checkpoint_every_iterations=2, **kw)
  cfg.generator.update(steps=3, width=8, latent_dim=16)
  return cfg


def gen_steps(inputs, cfg, n_steps):
  problem, mesh = inputs.problem, parallel.make_mesh()
  tx = generator.create_optimizer(cfg)
  init_fn, sharding = generator.make_init(problem, cfg, tx, mesh, seed=0)
  step = generator.make_step(problem, cfg, tx, mesh, sharding, seed=0)
  rep = lambda t: parallel.replicate(mesh, t)
  labels = parallel.to_global(mesh, synthesis.target_labels(cfg.batch_size, problem.num_classes))
  state = init_fn(np.int32(0), rep(generator.initial_params(problem, cfg, 0)))
  for _ in range(n_steps):
    state, terms = step(state, labels, np.int32(0), rep(inputs.teacher_vars), rep(inputs.targets),
                        None)
  return np.asarray(state.x), {k: float(v) for k, v in terms.items()}


def test_eight_device_generator_step_equals_one_device(tmp_path):
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'classwise')
  cfg = gen_config()
  assert_eight_devices_equal_one(gen_steps, synthesis.load_inputs(cfg, teacher_dir, stats_dir),
                                 cfg)


class Killed(Exception):
  pass


def test_generator_writes_the_shards_and_resumes_exactly(tmp_path):
  teacher_dir, stats_dir = make_artifacts(tmp_path, 'classwise')
  cfg = gen_config()
  inputs = synthesis.load_inputs(cfg, teacher_dir, stats_dir)
  straight = tmp_path / 'straight'
  summary = synthesis.generate(inputs, cfg, straight, seed=0)
  assert summary['method'] == 'generator' and summary['num_images'] == 32
  assert summary['iterations'] == (6 + 3) / 2      # warm-up batch, then `steps`
  assert summary['bn_loss_final'] < summary['bn_loss_initial']
  ds = synthetic_data.load_synthetic(straight)
  assert ds.images.shape == (32, 8, 8, 1) and ds.images.dtype == np.uint8
  # The initialisation moved after each batch (Reptile), and batch 1 started from it.
  first = generator.initial_params(inputs.problem, cfg, 0)
  after0 = generator.load_init(straight, inputs.problem, cfg, 0, 1)
  assert not np.allclose(flax.traverse_util.flatten_dict(first)[('params', 'Dense_0', 'kernel')],
                         flax.traverse_util.flatten_dict(after0)[('params', 'Dense_0', 'kernel')])

  def kill_in_batch_1(batch, done):
    if (batch, done) == (1, 3):   # after its checkpoint at iteration 2
      raise Killed()
  killed = tmp_path / 'killed'
  with pytest.raises(Killed):
    synthesis.generate(inputs, cfg, killed, seed=0, on_iteration=kill_in_batch_1)
  assert (killed / 'generator' / 'init_00000.msgpack').exists()
  synthesis.generate(inputs, cfg, killed, seed=0)
  # Killed after batch 1's initialisation was written but before its shard: redone the same.
  (killed / 'shards' / 'shard-00001.npz').unlink()
  (killed / 'manifest.json').unlink()
  synthesis.generate(inputs, cfg, killed, seed=0)
  for f in ('shards/shard-00000.npz', 'shards/shard-00001.npz', 'generator/init_00000.msgpack',
            'generator/init_00001.msgpack', 'manifest.json'):
    assert filecmp.cmp(straight / f, killed / f, shallow=False), f
  # Batches are made in sequence: a hole before the last batch is refused, not papered over.
  (killed / 'shards' / 'shard-00000.npz').unlink()
  (killed / 'manifest.json').unlink()
  with pytest.raises(UserError, match='in sequence'):
    synthesis.generate(inputs, cfg, killed, seed=0)


def test_generator_settings_are_checked():
  from bnsynth_jax import config_lib
  config = config_lib.default_config()
  config.synthesis.method = 'gan'
  with pytest.raises(UserError, match='synthesis.method'):
    synthesis.validate(config)
  config.synthesis.method = 'generator'
  synthesis.validate(config)
  config.synthesis.reuse_from = '/elsewhere'
  with pytest.raises(UserError, match='reuse_from'):
    synthesis.validate(config)
  config.synthesis.reuse_from = ''
  config.synthesis.generator.meta_lr = 0.0
  with pytest.raises(UserError, match='meta_lr'):
    synthesis.validate(config)
  config.synthesis.generator.meta_lr = 0.5
  config.synthesis.stats_scope = 'per_device'
  with pytest.raises(UserError, match='stats_scope=global'):
    synthesis.validate(config)
  with pytest.raises(UserError, match='divisible by 4'):
    generator.check((10, 8, 1))
