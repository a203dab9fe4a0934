"""A user's own model for `source.model.arch=examples.mini_resnet:build` (docs/your-model.md): a
small residual network, ~0.5 M parameters and ~17 M multiply-adds per 32x32 image (small_cnn's
1.8x), not one of the registry's. Importable from the checkout's root; its file's sha256 is in the
key of every model built from it, so editing it recomputes those models and what depends on them.

    advfeatures run --profile demo --set source.model.arch=examples.mini_resnet:build
"""

from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm around an identity shortcut."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(*_conv(ch, ch), nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


def build(num_classes: int) -> nn.Module:
    """(B,3,32,32) -> 32ch, pool -> block@16 -> 64ch/2 -> block@8 -> 128ch/2 -> block@4 -> mean -> fc."""
    return nn.Sequential(
        *_conv(3, 32), nn.MaxPool2d(2), Block(32),
        *_conv(32, 64, 2), Block(64),
        *_conv(64, 128, 2), Block(128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )
