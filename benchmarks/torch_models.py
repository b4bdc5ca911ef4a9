"""PyTorch twins of bnsynth_jax.models (optional benchmark dependency: pip install -e .[torch]).

Used by throughput.py (the synthesis step in PyTorch eager) and torch_student.py (a student
trained in PyTorch from the portable release).
"""

from __future__ import annotations

# Stems by model name, as in throughput.py: ResNet-50 with the ImageNet stem, the CIFAR
# models with the 3x3 CIFAR stem.
STEM = {'resnet50': 'imagenet'}


def torch_resnet(model_name: str, num_classes: int = 10, in_channels: int = 3,
                 stem: str | None = None, flax_init: bool = False):
  """The same architectures as bnsynth_jax.models, in PyTorch (NCHW).

  flax_init: initialise as the Flax model does (LeCun truncated-normal kernels, zero
  biases, the last BatchNorm scale of each residual branch at zero), for training runs
  meant to match the JAX student.
  """
  import torch.nn as tnn

  class Basic(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(cout)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                   tnn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.bn2(self.conv2(tnn.functional.relu(self.bn1(self.conv1(x)))))
      return tnn.functional.relu(y + (self.proj(x) if self.proj is not None else x))

  class Bottleneck(tnn.Module):
    def __init__(self, cin, width, stride):
      super().__init__()
      cout = width * 4
      self.c1, self.b1 = tnn.Conv2d(cin, width, 1, bias=False), tnn.BatchNorm2d(width)
      self.c2 = tnn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.b2 = tnn.BatchNorm2d(width)
      self.c3, self.b3 = tnn.Conv2d(width, cout, 1, bias=False), tnn.BatchNorm2d(cout)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                   tnn.BatchNorm2d(cout))

    def forward(self, x):
      r = tnn.functional.relu
      y = self.b3(self.c3(r(self.b2(self.c2(r(self.b1(self.c1(x))))))))
      return r(y + (self.proj(x) if self.proj is not None else x))

  if model_name.startswith('resnet') and model_name[6:].isdigit() and int(model_name[6:]) % 6 == 2:
    n = (int(model_name[6:]) - 2) // 6
    stages, widths, block, stem_w = [n] * 3, [16, 32, 64], Basic, 16
  elif model_name == 'resnet18':
    stages, widths, block, stem_w = [2, 2, 2, 2], [64, 128, 256, 512], Basic, 64
  elif model_name == 'resnet50':
    stages, widths, block, stem_w = [3, 4, 6, 3], [64, 128, 256, 512], Bottleneck, 64
  else:
    raise SystemExit(f'no PyTorch twin for {model_name}')
  stem = stem or STEM.get(model_name, 'cifar')
  layers = []
  if stem == 'cifar':
    layers += [tnn.Conv2d(in_channels, stem_w, 3, 1, 1, bias=False), tnn.BatchNorm2d(stem_w), tnn.ReLU()]
  else:
    layers += [tnn.Conv2d(in_channels, stem_w, 7, 2, 3, bias=False), tnn.BatchNorm2d(stem_w), tnn.ReLU(),
               tnn.MaxPool2d(3, 2, 1)]
  cin = stem_w
  for i, (nb, w) in enumerate(zip(stages, widths)):
    for j in range(nb):
      layers.append(block(cin, w, 2 if i > 0 and j == 0 else 1))
      cin = w * (4 if block is Bottleneck else 1)
  layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, num_classes)]
  model = tnn.Sequential(*layers)
  if flax_init:
    _flax_init(model, tnn, Basic, Bottleneck)
  return model


def _flax_init(model, tnn, basic, bottleneck):
  import math
  import torch
  for m in model.modules():
    if isinstance(m, (tnn.Conv2d, tnn.Linear)):
      fan_in = m.weight[0].numel()
      std = math.sqrt(1.0 / fan_in) / 0.87962566103423978   # flax lecun_normal (truncated)
      torch.nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
      if m.bias is not None:
        torch.nn.init.zeros_(m.bias)
    elif isinstance(m, basic):
      torch.nn.init.zeros_(m.bn2.weight)
    elif isinstance(m, bottleneck):
      torch.nn.init.zeros_(m.b3.weight)


