"""The synthesis objective, shared by every method (pixels.py, generator.py).

For a batch x (normalised input space) with target labels y:

  x~   = augment(x)          random shift (roll) + flip, or random resized crop
  L_bn = sum_l w_l (||mu_l(x~) - m_l|| + ||s2_l(x~) - v_l||)
         global: moments over the whole (global) batch; classwise: per class c over
         the images of class c in the batch, against m_lc, v_lc, averaged over the
         classes present. w_1 = first_bn_multiplier, other w_l = 1.
  L    = a_bn L_bn + a_ce CE(teacher(x~), y) + a_tv2 TV_l2(x) + a_tv1 TV_l1(x)
         + a_l2 ||x|| [+ a_adi (1 - JS(student, teacher))] [+ a_div D(x~)]
         D = mean cosine similarity of the teacher's penultimate features over the pairs
         of distinct images of one class in the batch (a batch-level diversity term)

The BN inputs are captured inside the teacher's own Flax forward pass
(`models.capture_bn_inputs`): the model code that trained the teacher is the code
that synthesises. The teacher runs in inference mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnsynth_jax import augment, models

# ----------------------------------------------------------------------------
# Losses


def total_variation(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(L2, L1) total variation over the four neighbour directions (DeepInversion's form)."""
  diffs = (x[:, :, :-1, :] - x[:, :, 1:, :], x[:, :-1, :, :] - x[:, 1:, :, :],
           x[:, 1:, :-1, :] - x[:, :-1, 1:, :], x[:, :-1, :-1, :] - x[:, 1:, 1:, :])
  l2 = sum(jnp.sqrt(jnp.sum(jnp.square(d))) for d in diffs)
  l1 = sum(jnp.mean(jnp.abs(d)) for d in diffs)
  return l2, l1


def _distance(a: jax.Array, b: jax.Array, norm: str) -> jax.Array:
  sq = jnp.sum(jnp.square(a - b), axis=-1)
  return jnp.sqrt(sq + 1e-12) if norm == 'l2' else sq


def bn_matching_loss(captured: Mapping[tuple[str, ...], jax.Array], targets, layer_weights,
                     labels: jax.Array | None, num_classes: int, norm: str = 'l2'):
  """Sum over layers of w_l (||mu - m|| + ||s2 - v||); class-wise when labels is given.

  Args:
    captured: {layer path: BN input [N, H, W, ch]}.
    targets: {'mean': {name: [ch] or [C, ch]}, 'var': {...}} (name = '/'.join(path)).
    layer_weights: {name: weight}.
    labels: None for global matching; int labels [N] for class-wise matching.
  Returns:
    (loss, {name: per-layer loss}).
  """
  total, per_layer = 0.0, {}
  for path, a in captured.items():
    name = '/'.join(path)
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))   # bf16 -> f32; f64 stays
    m, v = targets['mean'][name], targets['var'][name]
    # One pass over the activations: sums of d = a - m and d^2, shifted by the (constant)
    # target mean m so that E[d^2] - E[d]^2 does not cancel. XLA fuses both sums into one
    # reduction; a two-pass variance would write a full-size (a - mu) tensor per layer,
    # in the forward and again in the backward pass (benchmarks/profile_synthesis.py).
    shift = jax.lax.stop_gradient(m).astype(a.dtype)
    if labels is None:
      d = a - shift
      s1 = jnp.mean(d, axis=(0, 1, 2))
      s2 = jnp.mean(jnp.square(d), axis=(0, 1, 2)) - jnp.square(s1)   # biased
      mu = s1 + shift
      layer = _distance(mu, m, norm) + _distance(s2, v, norm)
    else:
      w = jax.nn.one_hot(labels, num_classes, dtype=a.dtype)       # [N, C]
      hw = a.shape[1] * a.shape[2]
      n = jnp.sum(w, axis=0) * hw                                   # [C]
      safe_n = jnp.maximum(n, 1.0)[:, None]
      d = a - shift[labels][:, None, None, :]                       # each image: its class's m
      s1 = jnp.einsum('nc,nk->ck', w, jnp.sum(d, axis=(1, 2))) / safe_n
      s2 = (jnp.einsum('nc,nk->ck', w, jnp.sum(jnp.square(d), axis=(1, 2))) / safe_n -
            jnp.square(s1))
      mu = s1 + shift
      present = (n > 0).astype(a.dtype)
      per_class = _distance(mu, m, norm) + _distance(s2, v, norm)    # [C]
      layer = jnp.sum(per_class * present) / jnp.maximum(jnp.sum(present), 1.0)
    per_layer[name] = layer
    total = total + layer_weights[name] * layer
  return total, per_layer


def js_competition(teacher_logits, student_logits, temperature: float) -> jax.Array:
  """DeepInversion's adaptive term: 1 - clip(JS(student, teacher), 0, 1), softened by T."""
  p = jnp.clip(jax.nn.softmax(student_logits / temperature), 1e-3, 1.0)
  q = jnp.clip(jax.nn.softmax(teacher_logits / temperature), 1e-3, 1.0)
  m = 0.5 * (p + q)
  kl_m = lambda a: jnp.mean(jnp.sum(m * (jnp.log(m) - jnp.log(a)), axis=-1))
  js = 0.5 * kl_m(p) + 0.5 * kl_m(q)
  return 1.0 - jnp.clip(js, 0.0, 1.0)


def feature_similarity(features: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cosine similarity of features [N, D] over the pairs (i != j) of one class: the
  diversity term (0 where no class has two images in the batch)."""
  f = features * jax.lax.rsqrt(jnp.sum(jnp.square(features), -1, keepdims=True) + 1e-12)
  same = labels[:, None] == labels[None, :]
  pairs = same & ~jnp.eye(labels.shape[0], dtype=bool)
  sims = jnp.where(pairs, f @ f.T, 0.0)
  return jnp.sum(sims) / jnp.maximum(jnp.sum(pairs), 1)


def downsample2(x):
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') / 4.0


@dataclasses.dataclass(frozen=True)
class Problem:
  """What stays fixed during a synthesis run (closed over by the jitted functions)."""
  model: Any                 # the teacher in the synthesis dtype
  eval_model: Any            # the teacher in float32 (final measurements, soft labels)
  num_classes: int
  image_shape: tuple[int, int, int]
  classwise: bool
  layer_weights: dict[str, float]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  student: Any = None        # adaptive competition: a student model, or None

  @property
  def bounds(self):
    mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
    return (0.0 - mean) / std, (1.0 - mean) / std


def make_loss_fn(problem: Problem, cfg, lowres: bool = False) -> Callable:
  """loss_fn(x, labels, rng, teacher_vars, targets, student_vars) -> (loss, terms)."""

  def loss_fn(x, labels, rng, teacher_vars, targets, student_vars):
    x_aug = augment.augment(rng, x, cfg)
    if lowres:
      x_aug = downsample2(x_aug)
    if cfg.diversity_weight:
      (logits, features), captured = models.capture_bn_inputs(
          problem.model, teacher_vars, x_aug, return_features=True)
    else:
      logits, captured = models.capture_bn_inputs(problem.model, teacher_vars, x_aug)
    logits = logits.astype(jnp.float32)
    bn, _ = bn_matching_loss(captured, targets, problem.layer_weights,
                             labels if problem.classwise else None, problem.num_classes,
                             cfg.bn_norm)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    tv_l2, tv_l1 = total_variation(x)
    l2 = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2, 3))))
    loss = (cfg.bn_weight * bn + cfg.ce_weight * ce + cfg.tv_l2_weight * tv_l2 +
            cfg.tv_l1_weight * tv_l1 + cfg.l2_weight * l2)
    terms = {'bn': bn, 'ce': ce, 'tv_l2': tv_l2, 'tv_l1': tv_l1, 'l2': l2}
    if cfg.diversity_weight:
      div = feature_similarity(features.astype(jnp.float32), labels)
      loss = loss + cfg.diversity_weight * div
      terms['diversity'] = div
    if problem.student is not None:
      student_logits = problem.student.apply(student_vars, x_aug, train=False)
      adi = js_competition(logits, student_logits.astype(jnp.float32), cfg.adi_temperature)
      loss = loss + cfg.adi_weight * adi
      terms['adi'] = adi
    terms['loss'] = loss
    return loss, terms

  return loss_fn
