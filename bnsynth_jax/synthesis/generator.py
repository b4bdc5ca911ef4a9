"""synthesis.method=generator: a small generator makes each batch in a few steps (Fast-DFKD).

Fast-DFKD (Fang et al. 2022, zju-vipa/Fast-Datafree) replaces the per-image optimiser by a
small convolutional generator G and per-image latents z: batch i starts from the generator's
meta-learned initialisation and fresh latents drawn from fold_in(seed, i), takes a few Adam
steps on the shared objective (objective.py) through G(z), and the meta-initialisation then
moves towards the adapted generator (Reptile: init += meta_lr x (adapted - init)). The first
batch takes `synthesis.iterations` steps (the warm-up), every later one
`synthesis.generator.steps`. The teacher never trains; there is no student in the loop.

Batch i depends on batches 0..i-1 through the initialisation, so each finished batch's
initialisation is written (atomically, before its shard) to synthetic/generator/init_NNNNN:
a run killed anywhere resumes from the last one and repeats exactly what it would have done.
The generator's BatchNorm uses the statistics of the whole (global) batch, so the batch
sharded over devices gives the numbers of one device.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnsynth_jax import fileio, parallel
from bnsynth_jax.errors import UserError
from bnsynth_jax.synthesis.objective import Problem, make_loss_fn
from bnsynth_jax.synthesis.pixels import batch_keys


class Generator(nn.Module):
  """Fast-DFKD's CIFAR generator: linear -> (BN, up x2, conv 3x3, BN, LeakyReLU) x 2 ->
  conv 3x3 -> BN without affine (images in the teacher's normalised input space)."""
  image_shape: tuple[int, int, int]
  width: int = 64

  @nn.compact
  def __call__(self, z):
    h, w, c = self.image_shape
    bn = lambda **kw: nn.BatchNorm(use_running_average=False, momentum=0.9, **kw)
    x = nn.Dense(2 * self.width * (h // 4) * (w // 4))(z)
    x = bn()(x.reshape(z.shape[0], h // 4, w // 4, 2 * self.width))
    for features in (2 * self.width, self.width):
      x = jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]),
                           'nearest')
      x = nn.leaky_relu(bn()(nn.Conv(features, (3, 3))(x)), 0.2)
    return bn(use_scale=False, use_bias=False)(nn.Conv(c, (3, 3))(x))


@flax.struct.dataclass
class GenState:
  params: Any              # the generator's, replicated
  z: jax.Array             # [B, latent_dim] per-image latents, sharded
  opt_state: Any
  x: jax.Array             # [B, H, W, C] the images of the latest evaluated iterate
  best_x: jax.Array
  best_loss: jax.Array
  iteration: jax.Array


def check(image_shape) -> None:
  """The generator upsamples twice by 2: image sides must be divisible by 4."""
  h, w = image_shape[:2]
  if h % 4 or w % 4:
    raise UserError(f'synthesis.method=generator makes images in two x2 upsamplings: the '
                    f'{h}x{w} images need sides divisible by 4; use method=pixels')


def iterations_of_batch(cfg, i: int) -> int:
  return int(cfg.iterations) if i == 0 else int(cfg.generator.steps)


def _model(problem: Problem, cfg) -> Generator:
  return Generator(tuple(problem.image_shape), int(cfg.generator.width))


def _images(model, params, z, bounds):
  x, _ = model.apply({'params': params['params'], 'batch_stats': params['batch_stats']}, z,
                     mutable=['batch_stats'])
  return jnp.clip(x, *bounds)


def initial_params(problem: Problem, cfg, seed: int):
  """The generator's initialisation before batch 0 (a function of the seed)."""
  model = _model(problem, cfg)
  z = jnp.zeros((2, int(cfg.generator.latent_dim)), jnp.float32)
  key = jax.random.fold_in(jax.random.key(seed), 0x67656E)
  return jax.tree.map(np.asarray, dict(model.init(key, z)))


def create_optimizer(cfg) -> optax.GradientTransformation:
  g = cfg.generator
  return optax.multi_transform({'generator': optax.adam(g.learning_rate, b1=0.5, b2=0.999),
                                'latents': optax.adam(g.latent_learning_rate)},
                               ('generator', 'latents'))


def _shardings(state, mesh):
  """The latents, the images and the latents' Adam moments on 'data'; the rest replicated."""
  data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)
  latents_opt = state.opt_state.inner_states['latents']
  opt = jax.tree.map(lambda _: repl, state.opt_state)
  opt = opt._replace(inner_states={**opt.inner_states, 'latents': jax.tree.map(
      lambda leaf: data if leaf.ndim else repl, latents_opt)})
  return state.replace(params=jax.tree.map(lambda _: repl, state.params), z=data,
                       opt_state=opt, x=data, best_x=data, best_loss=repl, iteration=repl)


def make_init(problem: Problem, cfg, tx, mesh, seed: int):
  """init(batch_index, generator params) -> GenState with batch i's latents."""
  model, bounds = _model(problem, cfg), problem.bounds
  shape = (int(cfg.batch_size), int(cfg.generator.latent_dim))

  def init(batch_index, params):
    z = jax.random.normal(batch_keys(seed, batch_index)[0], shape, jnp.float32)
    x = _images(model, params, z, bounds)
    return GenState(params=params, z=z, opt_state=tx.init((params['params'], z)), x=x,
                    best_x=x, best_loss=jnp.asarray(jnp.inf, jnp.float32),
                    iteration=jnp.asarray(0, jnp.int32))

  abstract = jax.eval_shape(init, np.int32(0), initial_params(problem, cfg, seed))
  shardings = _shardings(abstract, mesh)
  repl = parallel.replicated(mesh)
  return jax.jit(init, in_shardings=(repl, repl), out_shardings=shardings), shardings


def make_step(problem: Problem, cfg, tx, mesh, state_sharding, seed: int):
  """The jitted step: (state, labels, batch_index, teacher, targets, student) -> (state,
  terms); iteration t of batch i augments with fold_in(iteration key of batch i, t)."""
  model, bounds, loss_fn = _model(problem, cfg), problem.bounds, make_loss_fn(problem, cfg)

  def step(state: GenState, labels, batch_index, teacher_vars, targets, student_vars):
    rng = jax.random.fold_in(batch_keys(seed, batch_index)[1], state.iteration)

    def objective(variables):
      gen_params, z = variables
      x = _images(model, {'params': gen_params, 'batch_stats': state.params['batch_stats']},
                  z, bounds)
      loss, terms = loss_fn(x, labels, rng, teacher_vars, targets, student_vars)
      return loss, (terms, x)

    variables = (state.params['params'], state.z)
    (loss, (terms, x)), grads = jax.value_and_grad(objective, has_aux=True)(variables)
    updates, opt_state = tx.update(grads, state.opt_state, variables)
    gen_params, z = optax.apply_updates(variables, updates)
    better = loss < state.best_loss
    return GenState(params={**state.params, 'params': gen_params}, z=z, opt_state=opt_state,
                    x=x, best_x=jnp.where(better, x, state.best_x),
                    best_loss=jnp.where(better, loss, state.best_loss),
                    iteration=state.iteration + 1), terms

  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(state_sharding, data, repl, repl, repl, repl),
                 out_shardings=(state_sharding, repl), donate_argnums=0)


def meta_update(init_params, adapted_params, meta_lr: float):
  """Reptile: the initialisation moves meta_lr of the way to the adapted generator."""
  return jax.tree.map(lambda a, b: np.asarray(a + meta_lr * (np.asarray(b) - a), np.float32),
                      init_params, adapted_params)


def init_path(out_dir, i: int):
  return fileio.path(out_dir) / 'generator' / f'init_{i:05d}.msgpack'


def load_init(out_dir, problem: Problem, cfg, seed: int, i: int):
  """The initialisation batch i starts from: after batch i - 1 (written by it), or the
  seed's for batch 0."""
  template = initial_params(problem, cfg, seed)
  if i == 0:
    return template
  path = init_path(out_dir, i - 1)
  if not path.exists():
    raise UserError(f'{path} is missing: the generator of batch {i} starts where batch {i - 1} '
                    'left it; rerun the synthesis with --overwrite')
  return flax.serialization.from_bytes(template, path.read_bytes())


def save_init(out_dir, i: int, params) -> None:
  if parallel.is_main_process():
    fileio.atomic_write_bytes(init_path(out_dir, i), flax.serialization.to_bytes(params))
