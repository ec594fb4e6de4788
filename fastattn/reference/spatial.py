"""Spatial attention (MODULES.md section 2): ResidualAttention, SpatialGroupEnhance, ULSAM."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_config, check_feature_map, like_input

__all__ = ["ResidualAttention", "SpatialGroupEnhance", "ULSAM"]


class _PreActBottleneck(nn.Module):
    """Pre-activation bottleneck residual unit with an identity shortcut.

    (BN, ReLU, 1x1 C->C/4) -> (BN, ReLU, 3x3 C/4->C/4) -> (BN, ReLU, 1x1 C/4->C), all convs
    without bias, plus the input. This is the residual unit of the Residual Attention Network
    (the Caffe model and the tengshaofeng port) for equal in/out channels and stride 1.
    """

    def __init__(self, channels: int):
        super().__init__()
        mid = channels // 4
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + x


class _MaskLevel(nn.Module):
    """One level of the soft-mask encoder: residual unit(s) after a max-pool, and the skip unit.

    The deepest level has two residual units and no skip unit.
    """

    def __init__(self, channels: int, deepest: bool):
        super().__init__()
        units = 2 if deepest else 1
        self.down = nn.Sequential(*[_PreActBottleneck(channels) for _ in range(units)])
        self.skip = None if deepest else _PreActBottleneck(channels)


class ResidualAttention(nn.Module):
    """Attention module of the Residual Attention Network: ``out = (1 + M(x)) * T(x)``.

    Paper: Wang et al., "Residual Attention Network for Image Classification", CVPR 2017
    (arXiv 1704.06904). Source of truth: the authors' Caffe model
    ``fwang91/residual-attention-network`` (``Attention-56-deploy.prototxt``) with the PyTorch
    port ``tengshaofeng/ResidualAttentionNetwork-pytorch``
    (``Residual-Attention-Network/model/attention_module.py``, ``basic_layers.py``).

    - Trunk ``T``: two pre-activation bottleneck residual units (width ``channels // 4``).
    - Soft mask ``M``: ``depth`` levels of max-pool(3, stride 2, padding 1) followed by a
      residual unit (two at the deepest level); every level but the deepest also feeds a skip
      residual unit. Going back up, the features are bilinearly upsampled
      (``align_corners=True``, as the port's ``UpsamplingBilinear2d`` and Caffe's ``Interp``)
      to the size of the level above, the skip is added, and one residual unit follows. A
      last upsampling to the input size feeds BN-ReLU-1x1-BN-ReLU-1x1 (no biases) - sigmoid.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.

    Deviations: the upsampling sizes are taken from the input at run time, not fixed at
    construction (the port hard-codes them per stage), so any ``H x W`` works. Only the
    attention part is implemented: the pre-processing and post-processing residual units that
    surround it in the network (the paper's ``p = 1``) are left to the caller. The skip
    additions follow the Caffe model (upsampled mask features + skip unit), which the port
    keeps in ``AttentionModule_pre``; the port's later stage modules also add the encoder
    features and the trunk output before each upsampled unit, which is not done here.
    No official PyTorch weights exist, so parameter names are fastattn's own; they are
    registered in the port's order (trunk, then the mask levels from the top, then the
    decoder units from the deepest, then the mask head).
    """

    def __init__(self, channels: int, depth: int = 2):
        super().__init__()
        check_config("ResidualAttention", "channels", isinstance(channels, int) and channels >= 4,
                     "an int >= 4 (the residual units are channels // 4 wide)", channels)
        check_config("ResidualAttention", "depth", isinstance(depth, int) and depth >= 1,
                     "an int >= 1", depth)
        self.channels = channels
        self.depth = depth
        self.trunk = nn.Sequential(_PreActBottleneck(channels), _PreActBottleneck(channels))
        self.levels = nn.ModuleList([_MaskLevel(channels, deepest=(i == depth - 1)) for i in range(depth)])
        # up[0] follows the deepest skip addition, up[-1] the top one.
        self.up = nn.ModuleList([_PreActBottleneck(channels) for _ in range(depth - 1)])
        self.mask_head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    @staticmethod
    def _upsample(x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The soft mask ``M(x)`` in (0, 1), of x's shape."""
        feats, skips = [], []
        cur = x
        for level in self.levels:
            cur = level.down(F.max_pool2d(cur, kernel_size=3, stride=2, padding=1))
            feats.append(cur)
            if level.skip is not None:
                skips.append(level.skip(cur))
        for unit, i in zip(self.up, reversed(range(self.depth - 1))):
            cur = unit(self._upsample(cur, feats[i].shape[-2:]) + skips[i])
        return self.mask_head(self._upsample(cur, x.shape[-2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("ResidualAttention", x, channels=self.channels)
        return like_input((1 + self.mask(x)) * self.trunk(x), x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, depth={self.depth}"


class SpatialGroupEnhance(nn.Module):
    """Spatial Group-wise Enhance (SGE).

    Paper: Li, Hu, Yang, "Spatial Group-wise Enhance: Improving Semantic Feature Learning in
    Convolutional Networks", arXiv 1905.09646. Source of truth: ``implus/PytorchInsight``
    ``classification/models/imagenet/resnet_sge.py`` (``SpatialGroupEnhance``).

    Channels are split into ``groups`` groups. In each group, every position's similarity to
    the group's global-average descriptor (``sum_c x * mean_hw(x)``) is normalised over the
    ``H x W`` positions (mean removed, divided by the *unbiased* std + 1e-5), scaled and
    shifted per group by ``weight`` (init 0) and ``bias`` (init 1), both ``(1, G, 1, 1)``, and
    passed through a sigmoid that gates the group's features.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)`` with ``C % groups == 0`` and ``H * W >= 2``.
    No deviation from the official code.
    """

    def __init__(self, groups: int = 64):
        super().__init__()
        check_config("SpatialGroupEnhance", "groups", isinstance(groups, int) and groups >= 1,
                     "a positive int", groups)
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SpatialGroupEnhance", x)
        b, c, h, w = x.shape
        g = self.groups
        if c % g:
            raise ValueError(
                f"SpatialGroupEnhance: argument 'x' must have channels divisible by groups={g}, got {c}"
            )
        if h * w < 2:
            raise ValueError(
                "SpatialGroupEnhance: argument 'x' must have at least 2 spatial positions "
                f"(H*W >= 2, for the unbiased std), got H={h}, W={w}"
            )
        xg = x.reshape(b * g, c // g, h, w)
        sim = (xg * xg.mean(dim=(2, 3), keepdim=True)).sum(dim=1).reshape(b * g, h * w)
        sim = sim - sim.mean(dim=1, keepdim=True)
        sim = sim / (sim.std(dim=1, keepdim=True) + 1e-5)
        t = sim.reshape(b, g, h, w) * self.weight + self.bias
        out = xg * torch.sigmoid(t).reshape(b * g, 1, h, w)
        return like_input(out.reshape(b, c, h, w), x)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class _SubSpace(nn.Module):
    """One ULSAM subspace: a single attention map over H x W for its group of channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_dws = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn_dws = nn.BatchNorm2d(channels, momentum=0.9)
        self.conv_point = nn.Conv2d(channels, 1, 1)
        self.bn_point = nn.BatchNorm2d(1, momentum=0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn_dws(self.conv_dws(x)))
        a = F.max_pool2d(a, kernel_size=3, stride=1, padding=1)
        a = F.relu(self.bn_point(self.conv_point(a)))
        b, _, h, w = a.shape
        a = torch.softmax(a.reshape(b, 1, h * w), dim=2).reshape(b, 1, h, w)
        return a * x + x


class ULSAM(nn.Module):
    """Ultra-Lightweight Subspace Attention Module.

    Paper: Saini et al., "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact
    Convolutional Neural Networks", WACV 2020. Source of truth: ``Nandan91/ULSAM`` ``ulsam.py``.

    The channels are split into ``num_splits`` equal subspaces. Each computes one spatial map:
    depthwise 1x1 conv (bias) -> BN -> ReLU -> max-pool 3/1/1 -> 1x1 conv to one channel
    (bias) -> BN -> ReLU -> softmax over the ``H * W`` positions, and returns
    ``map * x_sub + x_sub``; the subspaces are concatenated back.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.

    Both BatchNorms use momentum 0.9, as the official code does (so the running statistics
    follow the latest batch closely). The official constructor also takes ``nout``, ``h`` and
    ``w``, which it does not use; they are dropped here.
    """

    def __init__(self, channels: int, num_splits: int):
        super().__init__()
        check_config("ULSAM", "num_splits", isinstance(num_splits, int) and num_splits >= 1,
                     "a positive int", num_splits)
        check_config("ULSAM", "channels", isinstance(channels, int) and channels >= 1 and channels % num_splits == 0,
                     f"a positive int divisible by num_splits={num_splits}", channels)
        self.channels = channels
        self.num_splits = num_splits
        self.subspaces = nn.ModuleList([_SubSpace(channels // num_splits) for _ in range(num_splits)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("ULSAM", x, channels=self.channels)
        parts = torch.chunk(x, self.num_splits, dim=1)
        return like_input(torch.cat([s(p) for s, p in zip(self.subspaces, parts)], dim=1), x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_splits={self.num_splits}"
