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

The model (models.ScatterNetCNN) is in models.py; this module holds the transform.
kymatio is imported only when such a model runs.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from bnsynth_jax.errors import UserError

SCALES = 2          # J: the transform downsamples by 2**J
ORIENTATIONS = 8    # L


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
