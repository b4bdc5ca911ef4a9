"""ScatterNet + a small normalised CNN (Tramer & Boneh, "Differentially private learning
needs better features (or much more data)", ICLR 2021).

The front end is kymatio's 2-D wavelet scattering transform (J = 2 scales, L = 8
orientations: 81 coefficients per input channel at 1/4 of the resolution). It has no
parameters and is computed from the Morlet filters alone, so it is a prior that needs no
data at all -- public by construction -- and DP-SGD only has to train what is on top:
GroupNorm over the coefficients (27 groups, as Tramer & Boneh), then (`scatternet_cnn`)
two 3x3 convolutions, each normalised (GroupNorm, or BatchNorm for a non-DP teacher) and
with tanh (their choice for DP-SGD), a 2x2 max-pool after the first, and a linear head on
the flattened map; or (`scatternet_linear`, `scatternet_linear_pool2`) the linear head
directly on the normalised coefficients (pooled 2x2 first: 4x fewer weights, so 2x less
DP-SGD noise on their gradient). On this 2-core CPU the per-example gradients of the
convolutions are too slow for DP-SGD (no 50-step log in 8 minutes at batches of 1,024);
the linear heads train in minutes. Every normalisation layer is a flax GroupNorm/BatchNorm, so the statistics
stage records, and synthesis matches, the per-class moments of the scattering
coefficients and of both convolution layers; synthesis differentiates through the
transform (kymatio's JAX frontend is plain jax.numpy).

kymatio is imported only when such a model is built.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bnsynth_jax import models
from bnsynth_jax.errors import UserError

SCALES = 2          # J: the transform downsamples by 2**J
ORIENTATIONS = 8    # L
SCATTER_GROUPS = 27


@functools.lru_cache(maxsize=None)
def _transform(height: int, width: int):
  try:
    from kymatio import Scattering2D
  except ImportError as e:     # a dependency of the package; an environment without it
    raise UserError('model scatternet_cnn needs kymatio: pip install "kymatio>=0.3"') from e
  if height % 2 ** SCALES or width % 2 ** SCALES:
    raise UserError(f'model scatternet_cnn needs an image size divisible by {2 ** SCALES}, '
                    f'got {height}x{width}: set --config.data.image_size')
  return Scattering2D(J=SCALES, shape=(height, width), L=ORIENTATIONS, frontend='jax')


def scattering(x: jnp.ndarray) -> jnp.ndarray:
  """[B, H, W, C] -> [B, H/4, W/4, 81 C] scattering coefficients (float32)."""
  b, h, w, c = x.shape
  s = _transform(h, w)(jnp.transpose(x.astype(jnp.float32), (0, 3, 1, 2)))  # [B, C, K, h, w]
  s = s.reshape(b, c * s.shape[2], *s.shape[3:])
  return jnp.transpose(s, (0, 2, 3, 1))


class ScatterNetCNN(nn.Module):
  """Scattering -> GroupNorm(27) -> [conv 3x3 -> norm -> tanh (-> max-pool)] x len(widths)
  (-> avg-pool) -> linear head. `features` returns the flattened last map. No widths is
  Tramer & Boneh's ScatterNet + linear model.

  `public_front_end` (the scattering) has no parameters and depends on no data: DP-SGD
  (train.dp_train_step) computes it once per batch, outside the per-example gradients,
  and calls `from_front_end` on its output."""
  num_classes: int
  widths: Sequence[int] = (64, 64)
  pool: int = 1
  dtype: Any = jnp.float32
  norm: str = 'group'

  def __call__(self, x, train: bool = False, return_features: bool = False):
    return self.from_front_end(scattering(x), train=train, return_features=return_features)

  @staticmethod
  def public_front_end(x):
    return scattering(x)

  @nn.compact
  def from_front_end(self, s, train: bool = False, return_features: bool = False):
    conv, norm = models.conv_and_norm(self.norm, train, self.dtype)
    if self.norm == 'group':
      y = nn.GroupNorm(num_groups=_groups(s.shape[-1]), epsilon=models.BN_EPSILON,
                       dtype=self.dtype, name='scatter_norm')(s)
    else:
      y = norm(name='scatter_norm')(s)
    for i, width in enumerate(self.widths):
      y = conv(width, (3, 3), name=f'conv{i + 1}')(y.astype(self.dtype))
      y = nn.tanh(norm(name=f'norm{i + 1}')(y))
      if i == 0:
        y = nn.max_pool(y, (2, 2), strides=(2, 2))
    if self.pool > 1:
      y = nn.avg_pool(y, (self.pool, self.pool), strides=(self.pool, self.pool))
    features = y.astype(jnp.float32).reshape(y.shape[0], -1)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(features)
    if return_features:
      return logits, features
    return logits


def _groups(channels: int) -> int:
  """27 groups where the coefficients allow it (81 per input channel), else one."""
  return SCATTER_GROUPS if channels % SCATTER_GROUPS == 0 else 1
