"""Classifier networks with a features/head split: `forward(x) = head(features(x))`.

ResNet-18/34 are torchvision's, with the CIFAR stem (3x3 stride-1 convolution, no max-pool). ResNet-20 and WRN-40-2
have no torchvision equivalent (their CIFAR forms differ from the ImageNet models), so they are written here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from oodbench.errors import OODBenchError


class Classifier(nn.Module):
    """`features` maps (B, C, H, W) to (B, D); `head` is the last linear layer."""

    def __init__(self, features: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.body = features
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _torchvision_resnet(depth: int, in_channels: int) -> nn.Module:
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class _Block(nn.Module):
    """Pre-activation basic block (WRN) or post-activation basic block (ResNet-20)."""

    def __init__(self, cin: int, cout: int, stride: int, preact: bool, dropout: float = 0.0):
        super().__init__()
        self.preact, self.dropout = preact, dropout
        self.bn1 = nn.BatchNorm2d(cin if preact else cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else nn.Identity())
        self.drop = nn.Dropout(dropout)   # a module, so that MC-dropout (mcdropout) finds and activates it

    def forward(self, x):
        if self.preact:
            o = F.relu(self.bn1(x))
            y = self.conv1(o)
            y = self.drop(F.relu(self.bn2(y)))
            return self.conv2(y) + self.shortcut(o if not isinstance(self.shortcut, nn.Identity) else x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def _stages(widths, blocks, in_width, preact, dropout):
    layers, cin = [], in_width
    for i, w in enumerate(widths):
        for b in range(blocks):
            layers.append(_Block(cin, w, 2 if (i > 0 and b == 0) else 1, preact, dropout))
            cin = w
    return layers


def _resnet20(in_channels: int) -> tuple[nn.Module, int]:
    body = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         *_stages((16, 32, 64), 3, 16, False, 0.0),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return body, 64


def _wrn(in_channels: int, depth: int = 40, widen: int = 2, dropout: float = 0.0) -> tuple[nn.Module, int]:
    n = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    body = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                         *_stages(widths, n, 16, True, dropout),
                         nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return body, widths[-1]


def _small_cnn(in_channels: int, width: int = 32) -> tuple[nn.Module, int]:
    body = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.BatchNorm2d(4 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return body, 4 * width


ARCHS = ("resnet18", "resnet20", "resnet34", "wrn40_2", "small_cnn")


def build_classifier(arch: str, in_channels: int, num_classes: int, dropout: float = 0.0,
                     width: int = 32) -> Classifier:
    """A classifier by name (see ARCHS). `dropout` applies to wrn40_2, `width` to small_cnn."""
    if arch in ("resnet18", "resnet34"):
        body, dim = _torchvision_resnet(int(arch[6:]), in_channels), 512
    elif arch == "resnet20":
        body, dim = _resnet20(in_channels)
    elif arch == "wrn40_2":
        body, dim = _wrn(in_channels, 40, 2, dropout)
    elif arch == "small_cnn":
        body, dim = _small_cnn(in_channels, width)
    else:
        raise OODBenchError(f"unknown classifier arch {arch!r}; choose one of {', '.join(ARCHS)} "
                            f"(--set model.arch=...)")
    return Classifier(body, dim, num_classes)
