"""Networks for the end-to-end benchmark, written here (torchvision is not a dependency).

- `resnet50(attention)`: ResNet-50 (bottleneck blocks [3, 4, 6, 3], torchvision's v1.5 layout:
  stride on the 3x3 conv). As in SE-ResNet, the attention module sits after the block's last
  BatchNorm, before the residual add; a module whose forward takes `residual` (SqueezeExcite)
  is given the shortcut and does the add itself (`x * g + residual`, the same math).
- `mobilenet(attention)`: a small MobileNetV3-like stack of inverted residual blocks (expand
  1x1, depthwise 3x3, attention on the expanded channels, project 1x1), as MobileNetV3 places SE.

`attention` is a factory `channels -> nn.Module`, or None for the plain network.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import nn

Attention = Optional[Callable[[int], nn.Module]]


def _takes_residual(m: nn.Module) -> bool:
    return "residual" in inspect.signature(m.forward).parameters


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, attention: Attention):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            *_conv_bn(cin, planes, 1), nn.ReLU(inplace=True),
            *_conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
            *_conv_bn(planes, cout, 1),
        )
        self.attn = attention(cout) if attention else None
        self.fuse_residual = self.attn is not None and _takes_residual(self.attn)
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout
                         else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = self.body(x)
        if self.fuse_residual:
            return self.relu(self.attn(out, residual=identity))
        if self.attn is not None:
            out = self.attn(out)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), attention: Attention = None, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for i, n in enumerate(layers):
            planes = 64 * 2 ** i
            for j in range(n):
                blocks.append(Bottleneck(cin, planes, 2 if (j == 0 and i > 0) else 1, attention))
                cin = planes * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def resnet50(attention: Attention = None, num_classes: int = 1000) -> ResNet:
    return ResNet((3, 4, 6, 3), attention, num_classes)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, attention: Attention):
        super().__init__()
        self.expand = nn.Sequential(*_conv_bn(cin, hidden, 1), nn.Hardswish(inplace=True))
        self.dw = nn.Sequential(*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Hardswish(inplace=True))
        self.attn = attention(hidden) if attention else nn.Identity()
        self.project = nn.Sequential(*_conv_bn(hidden, cout, 1))
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.attn(self.dw(self.expand(x))))
        return out + x if self.use_res else out


# (hidden, out, stride) per block, after a 16-channel stride-2 stem: MobileNetV3-small-like widths.
MOBILENET_BLOCKS = [(64, 24, 2), (72, 24, 1), (96, 40, 2), (240, 40, 1), (120, 48, 1), (288, 96, 2), (576, 96, 1)]


class MobileNet(nn.Module):
    def __init__(self, attention: Attention = None, num_classes: int = 1000, blocks=MOBILENET_BLOCKS):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 16, 3, 2), nn.Hardswish(inplace=True))
        layers, cin = [], 16
        for hidden, cout, stride in blocks:
            layers.append(InvertedResidual(cin, hidden, cout, stride, attention))
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(*_conv_bn(cin, 576, 1), nn.Hardswish(inplace=True),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(576, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def mobilenet(attention: Attention = None, num_classes: int = 1000) -> MobileNet:
    return MobileNet(attention, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {"resnet50": resnet50, "mobilenet": mobilenet}
