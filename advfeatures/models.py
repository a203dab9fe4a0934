"""Model registry. Every model takes images in [0, 1] pixel space, shape (B, 3, H, W), and
normalises per channel inside, so an attack's eps is measured in pixel space.

Register with ``@register("name")``; tests loop over ``MODELS`` so every entry gets forward,
backward and finite-value checks. ``advfeatures.archs`` adds the robustness library's CIFAR ResNets
and the other forms of a model's name (timm, a user's module).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

MODELS: dict[str, Callable[[int], nn.Module]] = {}


def register(name: str):
    def deco(fn: Callable[[int], nn.Module]):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = fn
        return fn

    return deco


class Normalized(nn.Module):
    """x in [0, 1] -> net((x - mean) / std)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_model(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> Normalized:
    """``arch`` in any form ``advfeatures.archs`` reads (a registered name, ``timm/<name>``,
    ``package.module:factory``), wrapped in the normalisation."""
    from advfeatures.archs import build_net

    return Normalized(build_net(arch, num_classes), mean, std)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("small_cnn")
def small_cnn(num_classes: int = 10) -> nn.Module:
    """~0.1 M parameters, ~10 M MACs per 32x32 image: the CPU demo network.
    (B,3,32,32) -> 32ch@32 -> pool -> 64ch@16 -> pool -> 128ch@8 -> pool -> global max -> fc."""
    return nn.Sequential(
        *_conv_bn(3, 32), nn.MaxPool2d(2),
        *_conv_bn(32, 64), nn.MaxPool2d(2),
        *_conv_bn(64, 128), nn.MaxPool2d(2),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


@register("cnn_wide")
def cnn_wide(num_classes: int = 10) -> nn.Module:
    """small_cnn at twice the width (~0.4 M parameters, ~4x the MACs): a stronger CPU source.
    (B,3,32,32) -> 64ch@32 -> pool -> 128ch@16 -> pool -> 256ch@8 -> pool -> global max -> fc."""
    return nn.Sequential(
        *_conv_bn(3, 64), nn.MaxPool2d(2),
        *_conv_bn(64, 128), nn.MaxPool2d(2),
        *_conv_bn(128, 256), nn.MaxPool2d(2),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(256, num_classes),
    )


class _Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)


class _Scale(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def _resnet9(num_classes: int, w: int) -> nn.Module:
    return nn.Sequential(
        *_conv_bn(3, w),
        *_conv_bn(w, 2 * w), nn.MaxPool2d(2),
        _Residual(*_conv_bn(2 * w, 2 * w), *_conv_bn(2 * w, 2 * w)),
        *_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        *_conv_bn(4 * w, 8 * w), nn.MaxPool2d(2),
        _Residual(*_conv_bn(8 * w, 8 * w), *_conv_bn(8 * w, 8 * w)),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes, bias=False), _Scale(0.125),
    )


@register("resnet9")
def resnet9(num_classes: int = 10) -> nn.Module:
    """The fast CIFAR ResNet-9 (Page, 2018; used by airbench and DAWNBench entries)."""
    return _resnet9(num_classes, 64)


@register("resnet9_narrow")
def resnet9_narrow(num_classes: int = 10) -> nn.Module:
    """ResNet-9 at a quarter of its width (~0.4 M parameters, 1/16 of its MACs): a residual
    network that trains on 2 CPU cores at small_cnn's pace (the transfer profile's)."""
    return _resnet9(num_classes, 16)


@register("mlp")
def mlp(num_classes: int = 10) -> nn.Module:
    """A two-hidden-layer perceptron on the raw pixels (~1.7 M parameters, no convolution): the
    architecture furthest from the CNNs, for the transfer experiment at CPU scale."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(inplace=True),
        nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(cin, planes * 4, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class CifarResNet(nn.Module):
    """ResNet with the CIFAR stem of MadryLab/robustness: 3x3 conv, stride 1, no max-pool.
    (B,3,32,32) -> 64@32 -> 128@16 -> 256@8 -> 512*e@4 -> avg -> fc."""

    def __init__(self, block, num_blocks: Sequence[int], num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(cin, planes, stride))
                cin = planes * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register("resnet18")
def resnet18(num_classes: int = 10) -> nn.Module:
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes)


@register("resnet50")
def resnet50(num_classes: int = 10) -> nn.Module:
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes)


from advfeatures import archs as _archs  # noqa: E402,F401 - registers the robustness library's ResNets
