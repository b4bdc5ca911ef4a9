"""Flax linen ResNets whose BatchNorm running statistics live in `batch_stats`.

Two ResNet families (and ScatterNetCNN, a fixed wavelet transform under a small
normalised head: the data-free DP prior of scatternet.py):
  * CIFAR ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of
    basic blocks with 16/32/64 channels (resnet8/14/20/32/44/56/110).
  * ResNet-18/34/50 with a CIFAR stem (3x3 conv, stride 1, no max-pool) or an
    ImageNet stem (7x7 conv, stride 2, 3x3 max-pool). With the ImageNet stem the network
    is torchvision's layout exactly (symmetric padding k // 2 on every convolution and the
    max-pool, stride on the 3x3 of a bottleneck), so bnsynth_jax/convert.py maps a
    torchvision state dict onto it; the CIFAR models keep flax's 'SAME' padding (which
    pads a stride-2 convolution on one side only) that the committed checkpoints use.

`dtype` is the computation dtype (float32 or bfloat16); parameters and the BN
running statistics are always float32 (flax reduces BN moments in float32).

Every BatchNorm layer is an `nn.BatchNorm`, so the synthesis code can capture
the input of each one with `nn.intercept_methods` (see `capture_bn_inputs`)
without a second copy of the model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnsynth_jax import scatternet
from bnsynth_jax.errors import UserError

ModuleDef = Any

NORMS = ('batch', 'group')
NORM_LAYERS = (nn.BatchNorm, nn.GroupNorm)
GROUPS = 8      # GroupNorm: gcd(channels, 8) groups


class StandardizedConv(nn.Module):
  """A convolution with weight standardisation (Qiao et al. 2019): the kernel is centred and
  scaled to unit variance over its fan-in before use. With GroupNorm it is what DP image
  classifiers use in place of BatchNorm, which mixes the examples of a batch (De et al. 2022)."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', self.kernel_init, shape, jnp.float32)
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
    kernel = (kernel - mean) * jax.lax.rsqrt(var + 1e-5)
    padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides), padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class GroupNorm(nn.Module):
  """nn.GroupNorm with gcd(channels, 8) groups (known only from the input), keyword-compatible
  with how the blocks build nn.BatchNorm. The normalisation layer itself is the child 'norm'."""
  scale_init: Callable = nn.initializers.ones
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    groups = math.gcd(x.shape[-1], GROUPS)
    return nn.GroupNorm(num_groups=groups, epsilon=BN_EPSILON, scale_init=self.scale_init,
                        dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(x)


# PyTorch's BatchNorm momentum 0.1 is flax's 0.9 (flax keeps 0.9 of the old value).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class BasicBlock(nn.Module):
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), name='conv2')(y)
    # Zero-init of the last BN scale makes each block start as the identity.
    y = self.norm(name='bn2', scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), (self.strides, self.strides),
                           name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  expansion: int = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.filters * self.expansion, (1, 1), name='conv3')(y)
    y = self.norm(name='bn3', scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * self.expansion, (1, 1),
                           (self.strides, self.strides), name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(residual + y)


def conv_and_norm(norm: str, train: bool, dtype) -> tuple[ModuleDef, ModuleDef]:
  """The convolution and normalisation layer factories of `model.norm`: 'group' --
  weight-standardised convolutions and GroupNorm (per-example, DP-SGD safe); 'batch' --
  plain convolutions and BatchNorm (batch statistics in training, running ones otherwise)."""
  kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
  if norm == 'group':
    conv = functools.partial(StandardizedConv, dtype=dtype, kernel_init=kernel_init)
    return conv, functools.partial(GroupNorm, dtype=dtype, param_dtype=jnp.float32)
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, kernel_init=kernel_init)
  return conv, functools.partial(nn.BatchNorm, use_running_average=not train,
                                 momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                 dtype=dtype, param_dtype=jnp.float32)


def symmetric_padding(conv: ModuleDef) -> ModuleDef:
  """`conv` padded k // 2 on both sides (PyTorch's Conv2d(padding=k // 2)) unless told."""
  def make(features, kernel_size, strides=(1, 1), **kwargs):
    kwargs.setdefault('padding', [(k // 2, k // 2) for k in kernel_size])
    return conv(features, kernel_size, strides, **kwargs)
  return make


class ResNet(nn.Module):
  """Generic ResNet. `features` returns the pooled penultimate features."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  widths: Sequence[int]
  stem: str = 'cifar'          # 'cifar' | 'imagenet'
  stem_width: int = 64
  dtype: Any = jnp.float32
  norm: str = 'batch'          # batch | group (GroupNorm + weight-standardised convolutions)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    conv, norm = conv_and_norm(self.norm, train, self.dtype)
    x = x.astype(self.dtype)
    if self.stem == 'imagenet':     # torchvision's layout (see the module docstring)
      conv = symmetric_padding(conv)
      x = conv(self.stem_width, (7, 7), (2, 2), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = conv(self.stem_width, (3, 3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    else:
      raise UserError(f"unknown model.stem {self.stem!r}: use 'cifar' or 'imagenet'")
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(width, strides, conv=conv, norm=norm,
                           name=f'stage{i + 1}_block{j + 1}')(x)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(features)
    if return_features:
      return logits, features
    return logits


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
    return self.from_front_end(self.public_front_end(x), train=train,
                               return_features=return_features)

  @staticmethod
  def public_front_end(x):
    return scatternet.scattering(x)

  @nn.compact
  def from_front_end(self, s, train: bool = False, return_features: bool = False):
    conv, norm = conv_and_norm(self.norm, train, self.dtype)
    if self.norm == 'group':
      y = nn.GroupNorm(num_groups=_groups(s.shape[-1]), epsilon=BN_EPSILON,
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
  return 27 if channels % 27 == 0 else 1


def _cifar_resnet(depth: int, width: int = 16):
  if (depth - 2) % 6:
    raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {depth}')
  n = (depth - 2) // 6
  return dict(stage_sizes=[n] * 3, block_cls=BasicBlock,
              widths=[width, 2 * width, 4 * width], stem_width=width)


_ARCHS: dict[str, Callable[[], dict]] = {
    # "for testing only": one block per stage, 4/8/16 channels.
    'resnet_tiny': lambda: _cifar_resnet(8, width=4),
    **{f'resnet{d}': functools.partial(_cifar_resnet, d)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    'resnet18': lambda: dict(stage_sizes=[2, 2, 2, 2], block_cls=BasicBlock,
                             widths=[64, 128, 256, 512]),
    'resnet34': lambda: dict(stage_sizes=[3, 4, 6, 3], block_cls=BasicBlock,
                             widths=[64, 128, 256, 512]),
    'resnet50': lambda: dict(stage_sizes=[3, 4, 6, 3], block_cls=BottleneckBlock,
                             widths=[64, 128, 256, 512]),
}

# ScatterNet front ends (bnsynth_jax/scatternet.py): a fixed wavelet transform that needs
# no data (public by construction), then a small normalised CNN (Tramer & Boneh 2021).
SCATTER_ARCHS: dict[str, dict] = {
    'scatternet_cnn': dict(widths=(64, 64)),
    'scatternet_cnn_tiny': dict(widths=(8, 8)),    # for tests
    'scatternet_linear': dict(widths=()),
    'scatternet_linear_pool2': dict(widths=(), pool=2),
    'scatternet_linear_pool4': dict(widths=(), pool=4),
    'scatternet_linear_pool8': dict(widths=(), pool=8),    # one value per channel
}

MODEL_NAMES = tuple(_ARCHS) + tuple(SCATTER_ARCHS)


def has_data_free_features(name: str) -> bool:
  """Whether the model's features (the head's input) need no training and no data: the
  scattering, then GroupNorm at its initial scale 1 and offset 0 (scatternet_linear*)."""
  return SCATTER_ARCHS.get(name, {}).get('widths') == ()


_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def from_config(model_config, num_classes: int) -> nn.Module:
  """The model a config's `model` section names."""
  return create_model(model_config.name, num_classes, stem=model_config.get('stem', 'cifar'),
                      norm=model_config.get('norm', 'batch'),
                      dtype=model_config.get('dtype', 'float32'))


def create_model(name: str, num_classes: int, *, stem: str = 'cifar',
                 dtype: str = 'float32', norm: str = 'batch') -> nn.Module:
  """Builds a model by name; raises UserError naming the valid choices."""
  if name not in MODEL_NAMES:
    raise UserError(f'unknown model {name!r}: choose one of {", ".join(MODEL_NAMES)}')
  if dtype not in _DTYPES:
    raise UserError(f'unknown model dtype {dtype!r}: use float32 or bfloat16')
  if norm not in NORMS:
    raise UserError(f"unknown model.norm {norm!r}: use 'batch' or 'group'")
  if name in SCATTER_ARCHS:
    return ScatterNetCNN(num_classes=num_classes, dtype=_DTYPES[dtype], norm=norm,
                                    **SCATTER_ARCHS[name])
  kwargs = _ARCHS[name]()
  if name in ('resnet18', 'resnet34', 'resnet50'):  # CIFAR ResNets have one stem
    kwargs['stem'] = stem
  return ResNet(num_classes=num_classes, dtype=_DTYPES[dtype], norm=norm, **kwargs)


def init_variables(model: ResNet, rng: jax.Array, image_shape: Sequence[int]):
  """Returns {'params', 'batch_stats'} for inputs of shape `image_shape` (H, W, C); a
  GroupNorm model's batch_stats is empty."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, dummy)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def capture_bn_inputs(model: ResNet, variables, x, *, return_features: bool = False):
  """Runs the model in inference mode and returns (outputs, {bn_path: bn_input}).

  The paths are tuples of module names, the same keys that index
  `variables['batch_stats']`; the dict is in forward (execution) order. BN normalises
  with its running statistics, which is how the teacher runs during synthesis. A
  GroupNorm model's GroupNorm inputs are captured the same way (the method matches the
  per-channel moments of whatever normalisation layers the teacher has).
  """
  captured: dict[tuple[str, ...], jax.Array] = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, NORM_LAYERS) and context.method_name == '__call__':
      captured[tuple(context.module.scope.path)] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = model.apply(variables, x, train=False, return_features=return_features)
  return out, captured
