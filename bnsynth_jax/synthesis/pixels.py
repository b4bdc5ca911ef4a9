"""synthesis.method=pixels: each batch's images are the optimised variables (DeepInversion).

Batch i starts from clipped N(0, 1) noise drawn from fold_in(seed, i) and takes
`iterations` optimiser steps on the shared objective (objective.py). One `jax.jit` step over
the 'data' mesh axis: images, labels and optimiser state are sharded, the teacher and the
targets replicated. With stats_scope=global the moments reduce over the global batch (XLA
all-reduces the sums: the same numbers as one device). With stats_scope=per_device each
device matches on its own slice inside `jax.shard_map` (what the single-GPU PyTorch peers
do; cheaper on pods).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from bnsynth_jax import parallel
from bnsynth_jax.errors import UserError
from bnsynth_jax.synthesis.objective import Problem, make_loss_fn


@flax.struct.dataclass
class SynthState:
  x: jax.Array             # [B, H, W, C] images in normalised space, float32
  opt_state: Any
  best_x: jax.Array
  best_loss: jax.Array     # scalar
  iteration: jax.Array     # int32 scalar



def create_optimizer(cfg, total_iterations: int) -> optax.GradientTransformation:
  if cfg.schedule == 'cosine':
    lr = optax.cosine_decay_schedule(cfg.learning_rate, max(total_iterations, 1))
  elif cfg.schedule == 'constant':
    lr = cfg.learning_rate
  else:
    raise UserError(f"unknown synthesis.schedule {cfg.schedule!r}: use 'cosine' or 'constant'")
  if cfg.optimizer == 'adam':
    return optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  if cfg.optimizer == 'sgd':
    return optax.sgd(lr, momentum=cfg.b1)
  if cfg.optimizer == 'lion':
    return optax.lion(lr, b1=cfg.b1, b2=cfg.b2)
  raise UserError(f"unknown synthesis.optimizer {cfg.optimizer!r}: use adam, sgd or lion")


def state_shardings(state, mesh, batch_shape):
  """Leaves shaped like the image batch are sharded on 'data'; the rest replicated."""
  data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)
  return jax.tree.map(lambda leaf: data if tuple(leaf.shape) == tuple(batch_shape) else repl,
                      state)


def batch_keys(seed: int, batch_index):
  """(noise key, iteration key) of batch `batch_index`: fold_in(seed, i), split in two."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), batch_index))


def make_init(problem: Problem, tx, mesh, batch_size: int, seed: int):
  """init(batch_index) -> SynthState: clipped N(0, 1) noise from batch i's key."""
  shape = (batch_size, *problem.image_shape)
  lo, hi = problem.bounds

  def init(batch_index):
    noise_key = batch_keys(seed, batch_index)[0]
    x = jnp.clip(jax.random.normal(noise_key, shape, jnp.float32), lo, hi)
    return SynthState(x=x, opt_state=tx.init(x), best_x=x,
                      best_loss=jnp.asarray(jnp.inf, jnp.float32),
                      iteration=jnp.asarray(0, jnp.int32))

  abstract = jax.eval_shape(init, np.int32(0))
  shardings = state_shardings(abstract, mesh, shape)
  return jax.jit(init, in_shardings=parallel.replicated(mesh), out_shardings=shardings), shardings


def make_step(problem: Problem, cfg, tx, mesh, state_sharding, seed: int, lowres: bool = False):
  """The jitted step: (state, labels, batch_index, teacher, targets, student) -> (state, terms).

  Iteration t of batch i augments with fold_in(iteration key of batch i, t).
  """
  value_and_grad = jax.value_and_grad(make_loss_fn(problem, cfg, lowres), has_aux=True)
  grad_fn = value_and_grad
  if cfg.stats_scope == 'per_device':
    axis = parallel.DATA_AXIS

    num_devices = mesh.devices.size

    def local_grad(x, labels, rng, teacher_vars, targets, student_vars):
      if num_devices > 1:   # each device its own augmentation; one device = global scope
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
      (loss, terms), grad = value_and_grad(x, labels, rng, teacher_vars, targets, student_vars)
      return (jax.lax.pmean(loss, axis), jax.lax.pmean(terms, axis)), grad

    grad_fn = jax.shard_map(local_grad, mesh=mesh,
                            in_specs=(P(axis), P(axis), P(), P(), P(), P()),
                            out_specs=((P(), P()), P(axis)))
  lo, hi = problem.bounds

  def step(state: SynthState, labels, batch_index, teacher_vars, targets, student_vars):
    rng = jax.random.fold_in(batch_keys(seed, batch_index)[1], state.iteration)
    (loss, terms), grad = grad_fn(state.x, labels, rng, teacher_vars, targets, student_vars)
    updates, opt_state = tx.update(grad, state.opt_state, state.x)
    x = jnp.clip(optax.apply_updates(state.x, updates), lo, hi)
    # The loss was measured at state.x. A low-resolution (multires warm-up) loss is not
    # comparable with full-resolution ones (often lower): only full-resolution iterates can
    # be the kept best, else an image never optimised at full resolution is released.
    better = jnp.logical_and(not lowres, loss < state.best_loss)
    return SynthState(x=x, opt_state=opt_state,
                      best_x=jnp.where(better, state.x, state.best_x),
                      best_loss=jnp.where(better, loss, state.best_loss),
                      iteration=state.iteration + 1), terms

  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(state_sharding, data, repl, repl, repl, repl),
                 out_shardings=(state_sharding, repl), donate_argnums=0)
