"""torchvision-shaped models built from plain ``torch.nn`` (torchvision stays out of the dependencies).

* :func:`densenet121`: the layer structure of ``torchvision.models.densenet121`` (stem 7x7 conv / BN / ReLU /
  3x3 max-pool, dense blocks of 6, 12, 24, 16 bottleneck layers with growth rate 32 and bottleneck width 4 x 32,
  transitions BN / ReLU / 1x1 conv / 2x2 avg-pool, final BN, ``F.relu``, adaptive avg-pool, Linear); 7.98M
  parameters with 1000 classes.
* :func:`mobilenet_v2`: the layer structure of ``torchvision.models.mobilenet_v2`` (Conv-BN-ReLU6 stem, 17 inverted
  residual blocks with depthwise 3x3 convs and residual adds where stride 1 and widths match, 1x1 conv to 1280,
  adaptive avg-pool, dropout, Linear); 3.50M parameters with 1000 classes.

Both forwards are plain module calls, ``torch.cat`` and ``+`` (no ``torch.jit`` / checkpointing branches), so
``torch.fx`` traces them.  Used by ``benchmarks/analyze.py``, ``benchmarks/teleport.py`` and the equivalence test of
the graph analysis (``tests/test_graph_speed_equivalence.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, growth: int, bn_size: int):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 32, blocks=(6, 12, 24, 16), init_features: int = 64, bn_size: int = 4,
                 num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        f = nn.Sequential()
        f.add_module("conv0", nn.Conv2d(in_channels, init_features, 7, stride=2, padding=3, bias=False))
        f.add_module("norm0", nn.BatchNorm2d(init_features))
        f.add_module("relu0", nn.ReLU(inplace=True))
        f.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        c = init_features
        for i, n in enumerate(blocks):
            f.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                f.add_module(f"transition{i + 1}", _Transition(c, c // 2))
                c //= 2
        f.add_module("norm5", nn.BatchNorm2d(c))
        self.features = f
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def densenet121(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121-shaped model (see the module docstring)."""
    return DenseNet(32, (6, 12, 24, 16), 64, 4, num_classes)


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_ConvBNReLU(cin, hidden, 1)]
        layers += [_ConvBNReLU(hidden, hidden, 3, stride, groups=hidden), _ConvBNReLU(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                   (6, 320, 1, 1)]
        layers = [_ConvBNReLU(in_channels, 32, 3, 2)]
        c = 32
        for t, cout, n, s in setting:
            for i in range(n):
                layers.append(_InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers.append(_ConvBNReLU(c, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    """MobileNetV2-shaped model (see the module docstring)."""
    return MobileNetV2(num_classes)
