"""Channel attention (MODULES.md section 1).

SqueezeExcite, CompetitiveSE, GatherExcite, GSoP, SRM, SelectiveKernel, DIACell, ECA,
SpatialPyramidAttention, MultiSpectralAttention, PyramidSplitAttention, TiledSqueezeExcite, NAM.

Every module here computes a per-channel (or per-tile) gate from pooled statistics of the
feature map and multiplies the feature map by it. Parameters and buffers are registered in the
order (and, where the official code is PyTorch, under the names) of the authors' modules, so an
official state dict loads by position.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_config, check_feature_map, check_same_shape, check_tensor, like_input

__all__ = [
    "SqueezeExcite",
    "CompetitiveSE",
    "GatherExcite",
    "GSoP",
    "SRM",
    "SelectiveKernel",
    "DIACell",
    "ECA",
    "SpatialPyramidAttention",
    "MultiSpectralAttention",
    "PyramidSplitAttention",
    "TiledSqueezeExcite",
    "NAM",
]


# --------------------------------------------------------------------------------------------
# small shared helpers
# --------------------------------------------------------------------------------------------


def _check_positive(module: str, name: str, value) -> None:
    check_config(module, name, isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 "a positive integer", value)


def _reduced(module: str, channels: int, reduction: int, name: str = "channels") -> int:
    """``channels // reduction`` for the bottleneck of an excitation MLP, which must be >= 1."""
    _check_positive(module, name, channels)
    _check_positive(module, "reduction", reduction)
    check_config(module, "reduction", reduction <= channels,
                 f"at most {name}={channels} (the hidden width {name} // reduction must be >= 1)",
                 reduction)
    return channels // reduction


def _gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pool: (B, C, H, W) -> (B, C)."""
    return x.mean(dim=(2, 3))


def _channel_gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x * g`` with a per-channel gate ``g`` of shape (B, C)."""
    return x * g[:, :, None, None]


class _ConvMlp(nn.Module):
    """1x1 conv (bias) -> ReLU -> 1x1 conv (bias); the names follow timm's ``ConvMlp``."""

    def __init__(self, channels: int, hidden: int, out_channels: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, out_channels or channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------------
# 1. Squeeze-and-Excitation
# --------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation: ``x * sigmoid(W2 relu(W1 GAP(x)))`` (+ ``residual``).

    Paper: Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018 (arXiv 1709.01507).
    Source of truth: the paper and the authors' Caffe models (``hujie-frank/SENet``); the
    parameter layout follows the PyTorch peer timm ``SEModule`` (``fc1``, ``fc2`` as 1x1
    ``Conv2d``), so timm SE weights load by name.

    - squeeze: global average pool over H x W;
    - excite: 1x1 conv C -> C // reduction (bias), ReLU, 1x1 conv C // reduction -> C (bias),
      sigmoid;
    - scale: ``x * g``; with ``residual`` given, ``x * g + residual`` (the Caffe models fuse
      the scale with the shortcut addition in one ``Axpy`` layer).

    Shapes: ``x``: (B, C, H, W), ``residual``: (B, C, H, W) or None -> (B, C, H, W).

    Deviation: the hidden width is ``channels // reduction`` as in the paper and the Caffe
    models; timm rounds ``channels / reduction`` to a multiple of 8 (the same for the usual
    ResNet widths, 64 * 2^k with reduction 16).
    """

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        hidden = _reduced("SqueezeExcite", channels, reduction)
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=bias)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        check_feature_map("SqueezeExcite", x, channels=self.channels)
        if residual is not None:
            check_tensor("SqueezeExcite", "residual", residual, dim=4, shape_hint="(B, C, H, W)")
            check_same_shape("SqueezeExcite", "residual", residual, "x", x)
        s = x.mean(dim=(2, 3), keepdim=True)
        g = self.gate(self.fc2(self.act(self.fc1(s))))
        out = x * g
        if residual is not None:
            out = out + residual
        return like_input(out, x)


# --------------------------------------------------------------------------------------------
# 2. Competitive SE
# --------------------------------------------------------------------------------------------


class CompetitiveSE(nn.Module):
    """Competitive Squeeze-Excitation: a gate computed from both the residual branch and the
    identity of a residual block; ``out = residual_branch * g + identity``.

    Paper: Hu, Yang, Ling, "Competitive Inner-Imaging Squeeze and Excitation for Residual
    Network" (arXiv 1807.08920). Source of truth: the authors' MXNet code
    ``scut-aitcm/Competitive-Inner-Imaging-SENet`` (``src/block/cmpese_resnetv2_block.py``);
    there is no official PyTorch code, so parameter names are fastattn's own, registered in the
    MXNet blocks' order.

    Both inputs are global-average-pooled to ``u`` (residual branch) and ``v`` (identity), each
    of shape (B, C). With r = ``reduction``:

    - ``mode="double_fc"`` (``PreActBottleneckCMPESEBlockDoubleFC``): ``u`` and ``v`` each go
      through their own 1x1 conv C -> C/r (no bias) + ReLU; the two results are concatenated
      [u-part, v-part] and a 1x1 conv 2C/r -> C (no bias) + sigmoid gives ``g``.
    - ``mode="pair_view"`` (conv 2x1 pair-view, ``PreActBottleneckCMPESEBlock2x1``): the pair
      is stacked as a one-channel (B, 1, C, 2) image; a conv with a (1, 2) kernel (no bias)
      gives ``m`` maps of shape (B, m, C, 1), BN, mean over the maps, flatten to (B, C), then
      Linear C -> C/r (no bias) + ReLU, Linear C/r -> C (no bias) + sigmoid.
    - ``mode="pair_view_1x1"`` (conv 1x1 pair-view, ``PreActBottleneckCMPESEBlock1x1``): as
      ``pair_view`` with a 1x1 kernel, so the mean map stays (B, 1, C, 2) and the first Linear
      takes the 2C values, flattened channel-major (u_0, v_0, u_1, v_1, ...).

    The number of maps is ``m = max(1, C // (4 r))``: the official block uses bottleneck
    width / 16 with C = 4 x bottleneck width.

    Shapes: ``residual_branch``, ``identity``: (B, C, H, W) -> (B, C, H, W).
    """

    MODES = ("double_fc", "pair_view", "pair_view_1x1")

    def __init__(self, channels: int, reduction: int = 16, mode: str = "double_fc"):
        super().__init__()
        hidden = _reduced("CompetitiveSE", channels, reduction)
        check_config("CompetitiveSE", "mode", mode in self.MODES, f"one of {self.MODES}", mode)
        self.channels = channels
        self.mode = mode
        if mode == "double_fc":
            self.fc_residual = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
            self.fc_identity = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
            self.fc_excite = nn.Conv2d(2 * hidden, channels, kernel_size=1, bias=False)
        else:
            maps = max(1, channels // (4 * reduction))
            kernel = (1, 2) if mode == "pair_view" else (1, 1)
            flat = channels if mode == "pair_view" else 2 * channels
            self.pair_conv = nn.Conv2d(1, maps, kernel_size=kernel, bias=False)
            self.pair_bn = nn.BatchNorm2d(maps)
            self.fc1 = nn.Linear(flat, hidden, bias=False)
            self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, residual_branch: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        check_feature_map("CompetitiveSE", residual_branch, channels=self.channels, name="residual_branch")
        check_tensor("CompetitiveSE", "identity", identity, dim=4, shape_hint="(B, C, H, W)")
        check_same_shape("CompetitiveSE", "identity", identity, "residual_branch", residual_branch)
        u = residual_branch.mean(dim=(2, 3), keepdim=True)
        v = identity.mean(dim=(2, 3), keepdim=True)
        if self.mode == "double_fc":
            z = torch.cat([F.relu(self.fc_residual(u)), F.relu(self.fc_identity(v))], dim=1)
            g = torch.sigmoid(self.fc_excite(z))
        else:
            pair = torch.stack([u.flatten(1), v.flatten(1)], dim=-1).unsqueeze(1)  # (B, 1, C, 2)
            one_map = self.pair_bn(self.pair_conv(pair)).mean(dim=1)
            g = torch.sigmoid(self.fc2(F.relu(self.fc1(one_map.flatten(1)))))
            g = g[:, :, None, None]
        return like_input(residual_branch * g + identity, residual_branch)


# --------------------------------------------------------------------------------------------
# 3. Gather-Excite
# --------------------------------------------------------------------------------------------


class GatherExcite(nn.Module):
    """Gather-Excite: ``x * sigmoid(upsample(excite(gather(x))))``.

    Paper: Hu, Shen, Albanie, Sun, Vedaldi, "Gather-Excite: Exploiting Feature Context in
    Convolutional Neural Networks", NeurIPS 2018 (arXiv 1810.12348). Source of truth: the
    authors' Caffe models (``hujie-frank/GENet``, ``models/RN50-GEP*.prototxt``); the layout
    and names follow the PyTorch peer timm ``GatherExcite`` (``gather.conv1``, ``gather.norm1``,
    ..., ``mlp.fc1``, ``mlp.fc2``).

    Gather (``extent`` = e):

    - ``extra_params=False``: e = 0 is a global mean over H x W (GE-theta-minus); e > 0 is
      ``avg_pool2d(kernel=2e-1, stride=e, padding=e-1, count_include_pad=False)``.
    - ``extra_params=True``: e = 0 is one depthwise conv whose kernel is the feature size
      ``feat_size`` (no padding, no bias) + BN, so the input must be ``feat_size``; e > 0 (a
      power of two) is log2(e) depthwise 3x3 stride-2 convs (padding 1, no bias), each + BN,
      with ReLU between them.

    Excite: with ``use_mlp``, 1x1 conv C -> C // reduction (bias), ReLU, 1x1 conv back to C
    (bias); the gathered map is nearest-upsampled to H x W when it is not 1x1; sigmoid;
    ``x * g``.

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Deviations from timm (following the Caffe models): the global depthwise conv has no
    padding (timm pads it by ``feat_size // 2``, which keeps the map at full size instead of
    gathering it to 1x1); with ``extra_params`` and ``use_mlp`` a ReLU follows the last gather
    BN (as in ``RN50-GEPP.prototxt``); the hidden width is ``channels // reduction`` (timm
    rounds ``channels / reduction``). BN momentum is PyTorch's default 0.1 (Caffe: 0.95 moving
    average, i.e. 0.05).
    """

    def __init__(
        self,
        channels: int,
        extent: int = 0,
        extra_params: bool = False,
        use_mlp: bool = True,
        reduction: int = 16,
        feat_size=None,
    ):
        super().__init__()
        name = "GatherExcite"
        _check_positive(name, "channels", channels)
        check_config(name, "extent", isinstance(extent, int) and extent >= 0, "a non-negative integer", extent)
        self.channels = channels
        self.extent = extent
        self.extra_params = extra_params
        self.feat_size = None
        if extra_params:
            self.gather = nn.Sequential()
            if extent == 0:
                check_config(name, "feat_size", feat_size is not None,
                             "the feature map size (int or (H, W)) when extent=0 and extra_params=True",
                             feat_size)
                size = (feat_size, feat_size) if isinstance(feat_size, int) else tuple(feat_size)
                check_config(name, "feat_size", len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size),
                             "a positive int or a pair of positive ints", feat_size)
                self.feat_size = size
                self.gather.add_module("conv1", nn.Conv2d(channels, channels, size, groups=channels, bias=False))
                self.gather.add_module("norm1", nn.BatchNorm2d(channels))
            else:
                check_config(name, "extent", extent >= 2 and extent & (extent - 1) == 0,
                             "a power of two (>= 2) when extra_params=True", extent)
                num_conv = int(math.log2(extent))
                for i in range(num_conv):
                    self.gather.add_module(
                        f"conv{i + 1}",
                        nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
                    )
                    self.gather.add_module(f"norm{i + 1}", nn.BatchNorm2d(channels))
                    if i != num_conv - 1:
                        self.gather.add_module(f"act{i + 1}", nn.ReLU(inplace=True))
        else:
            self.gather = None
        if use_mlp:
            self.mlp = _ConvMlp(channels, _reduced(name, channels, reduction))
        else:
            self.mlp = nn.Identity()
        self.gather_act = nn.ReLU() if (extra_params and use_mlp) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("GatherExcite", x, channels=self.channels)
        size = x.shape[-2:]
        if self.gather is not None:
            if self.feat_size is not None and tuple(size) != self.feat_size:
                raise ValueError(
                    f"GatherExcite: argument 'x' must have spatial size feat_size={self.feat_size} "
                    f"(global gather with extra_params=True), got {tuple(size)}"
                )
            g = self.gather_act(self.gather(x))
        elif self.extent == 0:
            g = x.mean(dim=(2, 3), keepdim=True)
        else:
            e = self.extent
            g = F.avg_pool2d(x, kernel_size=2 * e - 1, stride=e, padding=e - 1, count_include_pad=False)
        g = self.mlp(g)
        if g.shape[-2:] != (1, 1):
            g = F.interpolate(g, size=size, mode="nearest")
        return like_input(x * torch.sigmoid(g), x)


# --------------------------------------------------------------------------------------------
# 4. GSoP
# --------------------------------------------------------------------------------------------


class GSoP(nn.Module):
    """Global second-order pooling channel attention (GSoP-Net, channel mode ``attention='1'``).

    Paper: Gao, Xie, Wang, Li, "Global Second-order Pooling Convolutional Networks", CVPR 2019
    (arXiv 1811.12006). Source of truth: ``ZilinGao/Global-Second-order-Pooling-Convolutional-
    Networks`` (``torchvision/models/resnet.py``, ``Bottleneck.chan_att``, and
    ``torchvision/models/MPNCOV/python/MPNCOV.py``, ``Covpool``); names as there.

    ReLU -> 1x1 conv C -> d (bias, stride ``reduce_stride``) -> BN -> ReLU -> covariance over
    the M = H'W' positions, ``S = X (I/M - 1 1^T / M^2) X^T`` (biased), viewed as (B, d, d, 1)
    -> BN2d(d) -> row-wise conv ``Conv2d(d, 4d, kernel=(d, 1), groups=d)`` (bias) -> 1x1 conv
    4d -> C (bias) -> sigmoid -> ``x * g``. d = ``att_dim``.

    Shapes: (B, C, H, W) -> (B, C, H, W).

    The official block has no stand-alone class: it is the attention part of the bottleneck,
    applied to the output of its last BN; the official code uses ``reduce_stride=2`` when the
    bottleneck width is <= 64 (the first stage) and 1 elsewhere. Deviation: the covariance is
    computed by centring in the input's precision; the official ``Covpool`` builds its
    centring matrix in fp32 even for fp64 inputs.
    """

    def __init__(self, channels: int, att_dim: int = 128, reduce_stride: int = 1):
        super().__init__()
        _check_positive("GSoP", "channels", channels)
        _check_positive("GSoP", "att_dim", att_dim)
        _check_positive("GSoP", "reduce_stride", reduce_stride)
        self.channels = channels
        d = att_dim
        self.conv_for_DR = nn.Conv2d(channels, d, kernel_size=1, stride=reduce_stride, bias=True)
        self.bn_for_DR = nn.BatchNorm2d(d)
        self.row_bn = nn.BatchNorm2d(d)
        self.row_conv_group = nn.Conv2d(d, 4 * d, kernel_size=(d, 1), groups=d, bias=True)
        self.fc_adapt_channels = nn.Conv2d(4 * d, channels, kernel_size=1, bias=True)

    @staticmethod
    def covariance(z: torch.Tensor) -> torch.Tensor:
        """Biased covariance over positions: (B, d, H, W) -> (B, d, d)."""
        z = z.flatten(2)
        z = z - z.mean(dim=2, keepdim=True)
        return z @ z.transpose(1, 2) / z.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("GSoP", x, channels=self.channels)
        z = F.relu(self.bn_for_DR(self.conv_for_DR(F.relu(x))))
        cov = self.covariance(z).unsqueeze(-1)  # (B, d, d, 1)
        g = self.fc_adapt_channels(self.row_conv_group(self.row_bn(cov)))
        return like_input(x * torch.sigmoid(g), x)


# --------------------------------------------------------------------------------------------
# 5. SRM
# --------------------------------------------------------------------------------------------


class SRM(nn.Module):
    """Style-based Recalibration Module: a gate from each channel's mean and standard deviation.

    Paper: Lee, Kim, Nam, "SRM: A Style-based Recalibration Module for Convolutional Neural
    Networks", ICCV 2019 (arXiv 1903.10829). Source of truth:
    ``hyunjaelee410/style-based-recalibration-module`` (``models/recalibration_modules.py``,
    ``SRMLayer``); names as there.

    Style pooling: ``mu`` = mean over H x W, ``sigma = sqrt(unbiased var over H x W + 1e-5)``;
    style integration: ``z = cfc[:, 0] * mu + cfc[:, 1] * sigma`` (``cfc``: (C, 2), initialised
    to 0) -> BN2d(C) -> sigmoid -> ``x * g``.

    Shapes: (B, C, H, W) -> (B, C, H, W); H x W must be at least 2 (unbiased variance).
    """

    def __init__(self, channels: int):
        super().__init__()
        _check_positive("SRM", "channels", channels)
        self.channels = channels
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SRM", x, channels=self.channels)
        if x.shape[2] * x.shape[3] < 2:
            raise ValueError(
                "SRM: argument 'x' must have at least 2 spatial positions (H * W >= 2, for the "
                f"unbiased standard deviation), got H x W = {x.shape[2]} x {x.shape[3]}"
            )
        flat = x.flatten(2)
        mean = flat.mean(dim=2)
        std = (flat.var(dim=2, unbiased=True) + 1e-5).sqrt()
        z = mean * self.cfc[:, 0] + std * self.cfc[:, 1]
        g = torch.sigmoid(self.bn(z[:, :, None, None]))
        return like_input(x * g, x)


# --------------------------------------------------------------------------------------------
# 6. Selective Kernel
# --------------------------------------------------------------------------------------------


class _ConvBnAct(nn.Module):
    """Conv (no bias) + BN + ReLU, named like timm's ``ConvNormAct`` (``conv``, ``bn``)."""

    def __init__(self, channels: int, dilation: int, groups: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=dilation, dilation=dilation,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _SelectiveKernelAttn(nn.Module):
    """Branch attention of SK, named like timm's ``SelectiveKernelAttn``."""

    def __init__(self, channels: int, branches: int, attn_channels: int):
        super().__init__()
        self.branches = branches
        self.fc_reduce = nn.Conv2d(channels, attn_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(attn_channels)
        self.fc_select = nn.Conv2d(attn_channels, channels * branches, kernel_size=1, bias=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, K, C, H, W) branch features -> (B, K, C, 1, 1) softmax weights over K."""
        s = feats.sum(dim=1).mean(dim=(2, 3), keepdim=True)
        a = self.fc_select(F.relu(self.bn(self.fc_reduce(s))))
        return a.view(a.shape[0], self.branches, -1, 1, 1).softmax(dim=1)


class SelectiveKernel(nn.Module):
    """Selective Kernel convolution: branches of growing dilation fused by a softmax attention.

    Paper: Li, Wang, Hu, Yang, "Selective Kernel Networks", CVPR 2019 (arXiv 1903.06586).
    Source of truth: the authors' Caffe models (``implus/SKNet``, ``models/sknet50.prototxt``);
    layout and names follow the PyTorch peer timm ``SelectiveKernel`` / ``SelectiveKernelAttn``
    (``paths.i.conv``, ``paths.i.bn``, ``attn.fc_reduce``, ``attn.bn``, ``attn.fc_select``).

    Branch i (i = 0 .. branches-1): 3x3 conv with dilation i+1 and padding i+1 (``groups``,
    ``stride``, no bias) + BN + ReLU. U = sum of the branches; GAP; 1x1 conv C -> d (no bias),
    d = max(C // reduction, min_dim); BN; ReLU; 1x1 conv d -> branches * C (no bias), viewed
    branch-major as (B, branches, C); softmax across branches; out = sum_i a_i * branch_i.

    Shapes: (B, C, H, W) -> (B, C, H', W') with H' = ceil(H / stride), W' = ceil(W / stride).

    Deviations from timm: every branch sees the whole input (timm's default ``split_input``
    splits the input channels between the branches; the Caffe model does not), and the
    attention width is max(C // reduction, min_dim) as in the paper (timm rounds C / 16 to a
    multiple of 8). BN momentum is PyTorch's default 0.1 (Caffe: 0.05).
    """

    def __init__(self, channels: int, branches: int = 2, groups: int = 32, reduction: int = 16,
                 min_dim: int = 32, stride: int = 1):
        super().__init__()
        name = "SelectiveKernel"
        _check_positive(name, "channels", channels)
        _check_positive(name, "branches", branches)
        _check_positive(name, "groups", groups)
        _check_positive(name, "reduction", reduction)
        _check_positive(name, "min_dim", min_dim)
        _check_positive(name, "stride", stride)
        check_config(name, "channels", channels % groups == 0, f"divisible by groups={groups}", channels)
        self.channels = channels
        self.paths = nn.ModuleList([_ConvBnAct(channels, i + 1, groups, stride) for i in range(branches)])
        self.attn = _SelectiveKernelAttn(channels, branches, max(channels // reduction, min_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SelectiveKernel", x, channels=self.channels)
        feats = torch.stack([path(x) for path in self.paths], dim=1)
        out = (feats * self.attn(feats)).sum(dim=1)
        return like_input(out, x)


# --------------------------------------------------------------------------------------------
# 7. DIANet
# --------------------------------------------------------------------------------------------


class _SmallCell(nn.Module):
    """Linear(C, C/r) -> ReLU -> Linear(C/r, 4C); the attribute ``seq`` keeps the official keys."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4 * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class DIACell(nn.Module):
    """Dense-and-Implicit Attention: one LSTM cell shared by all the blocks of a stage.

    Paper: Huang, Liang, Liang, Li, Zhang, Shen, "DIANet: Dense-and-Implicit Attention
    Network", AAAI 2020 (arXiv 1905.10671). Source of truth: ``gbup-group/DIANet``
    (``models/cifar/dia_resnet.py``, ``LSTMCell`` with one layer and ``small_cell``); names as
    there (``w_ih.0.seq.*``, ``w_hh.0.seq.*``).

    ``forward(x, state=None) -> (x * h', (h', c'))``: the input of the cell is GAP(x), (B, C);
    ``gates = W_ih(GAP(x)) + W_hh(h)``, where W_ih and W_hh are each Linear(C, C/r) -> ReLU ->
    Linear(C/r, 4C) (biases); the 4C pre-activations split in the order i, f, g, o; i, f, o
    sigmoid, g tanh; ``c' = f c + i g``; ``h' = o sigmoid(c')`` (sigmoid, not tanh, as in the
    official code). ``state`` is the (h, c) pair returned by the previous block of the stage,
    each (B, C); None means zeros (the first block of a stage).

    Shapes: ``x``: (B, C, H, W), ``state``: ((B, C), (B, C)) or None ->
    ((B, C, H, W), ((B, C), (B, C))).

    Deviations: the official code hard-codes the reduction at 4 (``reduction`` selects it), its
    states are shaped (1, B, C) (number of layers first), and it builds the zero state with
    ``.cuda()``; here the states are (B, C) and built on ``x``'s device. The official
    ``Dropout(0.1)`` only acts between stacked layers and never fires with its single layer,
    so it is omitted.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = _reduced("DIACell", channels, reduction)
        self.channels = channels
        self.w_ih = nn.ModuleList([_SmallCell(channels, hidden)])
        self.w_hh = nn.ModuleList([_SmallCell(channels, hidden)])

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        check_feature_map("DIACell", x, channels=self.channels)
        s = _gap(x)
        if state is None:
            h = c = s.new_zeros(s.shape)
        else:
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise TypeError(
                    f"DIACell: argument 'state' must be None or a pair (h, c) of (B, C) tensors, "
                    f"got {type(state).__name__}"
                )
            h, c = state
            for nm, t in (("state[0]", h), ("state[1]", c)):
                check_tensor("DIACell", nm, t, dim=2, shape_hint="(B, C)")
                if t.shape != s.shape:
                    raise ValueError(
                        f"DIACell: argument '{nm}' must have shape (B, C) = {tuple(s.shape)}, "
                        f"got {tuple(t.shape)}"
                    )
        gates = self.w_ih[0](s) + self.w_hh[0](h)
        i, f, g, o = gates.chunk(4, dim=1)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.sigmoid(c_next)
        return like_input(_channel_gate(x, h_next), x), (h_next, c_next)


# --------------------------------------------------------------------------------------------
# 8. ECA
# --------------------------------------------------------------------------------------------


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The ECA paper's adaptive kernel size: ``t = int(|log2(C) / gamma + b / gamma|)``, made
    odd by adding 1 when even (C = 64 -> 3, 256 -> 5, 512 -> 5, 1024 -> 5, 2048 -> 7)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """Efficient Channel Attention: a 1-D convolution across the pooled channels.

    Paper: Wang, Wu, Zhu, Li, Zuo, Hu, "ECA-Net: Efficient Channel Attention for Deep
    Convolutional Neural Networks", CVPR 2020 (arXiv 1910.03151). Source of truth:
    ``BangguWu/ECANet`` (``models/eca_module.py``, ``eca_layer``); names as there (``conv``).

    GAP -> ``Conv1d(1, 1, k, padding=(k-1)//2, bias=False)`` along the channel axis -> sigmoid
    -> ``x * g``.

    ``k``: the given ``k_size`` (the official code; its released ResNet-50 weights use
    k = 3, 5, 5, 7 per stage), or with ``adaptive=True`` the paper's rule
    ``k = |log2(C)/gamma + b/gamma|`` rounded to odd (see :func:`eca_kernel_size`), which needs
    ``channels``. ``channels`` is optional otherwise (the official argument is unused); when
    given, the input's channel count is checked against it.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int | None = None, k_size: int = 3, gamma: int = 2, b: int = 1,
                 adaptive: bool = False):
        super().__init__()
        if channels is not None:
            _check_positive("ECA", "channels", channels)
        if adaptive:
            check_config("ECA", "channels", channels is not None,
                         "a positive integer when adaptive=True (the kernel size depends on it)", channels)
            k_size = eca_kernel_size(channels, gamma, b)
        check_config("ECA", "k_size", isinstance(k_size, int) and k_size > 0 and k_size % 2 == 1,
                     "a positive odd integer", k_size)
        self.channels = channels
        self.k_size = k_size
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("ECA", x, channels=self.channels)
        y = self.conv(_gap(x).unsqueeze(1)).squeeze(1)
        return like_input(_channel_gate(x, torch.sigmoid(y)), x)


# --------------------------------------------------------------------------------------------
# 9. SPANet
# --------------------------------------------------------------------------------------------


class SpatialPyramidAttention(nn.Module):
    """Spatial pyramid attention (SPANet): an SE gate fed by a 1 + 4 + 16 bin pyramid pool.

    Paper: Guo, Ma, et al., "Spatial Pyramid Attention Network for Enhanced Image
    Recognition", ICME 2020. Source of truth: ``13952522076/SPANet``
    (``models/spp_se_resnet.py``, ``SPPSELayer``); names as there (``fc.0``, ``fc.2``).

    Adaptive average pools at 1x1, 2x2 and 4x4, each flattened channel-major and concatenated
    (21 C values) -> Linear(21C, C // reduction, no bias) -> ReLU -> Linear(C // reduction, C,
    no bias) -> sigmoid -> ``x * g``.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = _reduced("SpatialPyramidAttention", channels, reduction)
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(21 * channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SpatialPyramidAttention", x, channels=self.channels)
        pooled = [F.adaptive_avg_pool2d(x, size).flatten(1) for size in (1, 2, 4)]
        g = self.fc(torch.cat(pooled, dim=1))
        return like_input(_channel_gate(x, g), x)


# --------------------------------------------------------------------------------------------
# 10. FcaNet
# --------------------------------------------------------------------------------------------

# Frequency indices on a 7x7 grid, ranked by the FcaNet authors (model/layer.py,
# get_freq_indices): "top" by single-frequency accuracy, "low" in zig-zag order from (0, 0),
# "bot" the worst. A method "<table>N" uses the first N pairs.
_FREQ_TABLES = {
    "top": (
        (0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2, 4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1),
        (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2, 6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3),
    ),
    "low": (
        (0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 3, 4, 0, 1, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4),
        (0, 1, 0, 1, 2, 0, 1, 2, 2, 3, 0, 0, 4, 3, 1, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3),
    ),
    "bot": (
        (6, 1, 3, 3, 2, 4, 1, 2, 4, 4, 5, 1, 4, 6, 2, 5, 6, 1, 6, 2, 2, 4, 3, 3, 5, 5, 6, 2, 5, 5, 3, 6),
        (6, 4, 4, 6, 6, 3, 1, 4, 4, 5, 6, 5, 2, 2, 5, 1, 4, 3, 5, 0, 3, 1, 1, 2, 4, 2, 1, 1, 5, 3, 3, 3),
    ),
}
FREQ_SEL_METHODS = tuple(f"{t}{n}" for t in ("top", "low", "bot") for n in (1, 2, 4, 8, 16, 32))


def freq_indices(method: str) -> tuple[list[int], list[int]]:
    """The (height, width) frequency indices of an FcaNet selection method, on the 7x7 grid."""
    if method not in FREQ_SEL_METHODS:
        raise ValueError(f"MultiSpectralAttention: argument 'freq_sel_method' must be one of "
                         f"{FREQ_SEL_METHODS}, got {method!r}")
    xs, ys = _FREQ_TABLES[method[:3]]
    n = int(method[3:])
    return list(xs[:n]), list(ys[:n])


def _dct_basis(pos: int, freq: int, size: int) -> float:
    """Orthonormal DCT-II basis: cos(pi f (pos + 1/2) / P) / sqrt(P), times sqrt(2) for f > 0."""
    v = math.cos(math.pi * freq * (pos + 0.5) / size) / math.sqrt(size)
    return v * math.sqrt(2) if freq != 0 else v


def dct_filters(channels: int, height: int, width: int, mapper_x, mapper_y) -> torch.Tensor:
    """The (C, height, width) filter bank: channel group i (of C / n channels) holds the 2-D DCT
    basis of frequency (mapper_x[i], mapper_y[i]). Computed in float64."""
    n = len(mapper_x)
    part = channels // n
    filt = torch.zeros(channels, height, width, dtype=torch.float64)
    for i, (u, v) in enumerate(zip(mapper_x, mapper_y)):
        bh = torch.tensor([_dct_basis(t, u, height) for t in range(height)], dtype=torch.float64)
        bw = torch.tensor([_dct_basis(t, v, width) for t in range(width)], dtype=torch.float64)
        filt[i * part:(i + 1) * part] = bh[:, None] * bw[None, :]
    return filt


class _DCTPool(nn.Module):
    """Holds the fixed DCT filter as buffer ``weight`` (official key ``dct_layer.weight``)."""

    def __init__(self, filters: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).sum(dim=(2, 3))


class MultiSpectralAttention(nn.Module):
    """Multi-spectral channel attention (FcaNet): the squeeze is a set of 2-D DCT coefficients.

    Paper: Qin, Zhang, Wu, Li, "FcaNet: Frequency Channel Attention Networks", ICCV 2021
    (arXiv 2012.11879). Source of truth: ``cfzd/FcaNet`` (``model/layer.py``,
    ``MultiSpectralAttentionLayer``, ``MultiSpectralDCTLayer``); names as there
    (``dct_layer.weight``, ``fc.0``, ``fc.2``).

    The channels are split evenly among the n frequencies of ``freq_sel_method`` (``top``,
    ``low`` or ``bot`` followed by 1, 2, 4, 8, 16 or 32); each frequency (u, v) is given on a
    7x7 grid and scaled to (u * (dct_h // 7), v * (dct_w // 7)). The fixed buffer
    ``dct_layer.weight`` (C, dct_h, dct_w) holds basis(h, u, dct_h) * basis(w, v, dct_w) with
    basis(pos, f, P) = cos(pi f (pos + 0.5) / P) / sqrt(P), times sqrt(2) when f != 0. If the
    input is not dct_h x dct_w it is first adaptive-average-pooled to that size; then
    ``y = sum_{h,w} x * filter`` (no 1/HW) -> Linear(C, C // reduction, no bias) -> ReLU ->
    Linear(C // reduction, C, no bias) -> sigmoid -> ``x * g``.

    Shapes: (B, C, H, W) -> (B, C, H, W).

    The buffer is computed in float64 and stored in the default dtype (fp32), which gives the
    same values as the official fp32 filter. ``dct_h`` and ``dct_w`` must be at least 7 (the
    official code accepts smaller sizes but then maps every frequency to 0 along that axis).
    """

    def __init__(self, channels: int, dct_h: int, dct_w: int, reduction: int = 16,
                 freq_sel_method: str = "top16"):
        super().__init__()
        name = "MultiSpectralAttention"
        hidden = _reduced(name, channels, reduction)
        check_config(name, "freq_sel_method", freq_sel_method in FREQ_SEL_METHODS,
                     f"one of {FREQ_SEL_METHODS}", freq_sel_method)
        check_config(name, "dct_h", isinstance(dct_h, int) and dct_h >= 7, "an integer >= 7", dct_h)
        check_config(name, "dct_w", isinstance(dct_w, int) and dct_w >= 7, "an integer >= 7", dct_w)
        mapper_x, mapper_y = freq_indices(freq_sel_method)
        n = len(mapper_x)
        check_config(name, "channels", channels % n == 0,
                     f"divisible by the number of frequencies ({n} for {freq_sel_method!r})", channels)
        self.channels = channels
        self.dct_h, self.dct_w = dct_h, dct_w
        self.freq_sel_method = freq_sel_method
        mapper_x = [u * (dct_h // 7) for u in mapper_x]
        mapper_y = [v * (dct_w // 7) for v in mapper_y]
        filters = dct_filters(channels, dct_h, dct_w, mapper_x, mapper_y).to(torch.get_default_dtype())
        self.dct_layer = _DCTPool(filters)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("MultiSpectralAttention", x, channels=self.channels)
        pooled = x
        if x.shape[-2:] != (self.dct_h, self.dct_w):
            pooled = F.adaptive_avg_pool2d(x, (self.dct_h, self.dct_w))
        g = self.fc(self.dct_layer(pooled))
        return like_input(_channel_gate(x, g), x)


# --------------------------------------------------------------------------------------------
# 11. EPSANet
# --------------------------------------------------------------------------------------------


class _SEWeight(nn.Module):
    """GAP -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> sigmoid; names as the official
    ``SEWeightModule`` (``fc1``, ``fc2``)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class PyramidSplitAttention(nn.Module):
    """Pyramid Split Attention (EPSANet's PSA module): multi-scale group convs weighted by a
    softmax over the scales.

    Paper: Zhang, Zu, Lu, Zou, Meng, "EPSANet: An Efficient Pyramid Squeeze Attention Block on
    Convolutional Neural Network", ACCV 2022 (arXiv 2105.14447). Source of truth:
    ``murufeng/EPSANet`` (``models/epsanet.py``, ``PSAModule``; ``models/SE_weight_module.py``);
    names as there (``conv_1`` .. ``conv_4``, ``se.fc1``, ``se.fc2``).

    With S = len(conv_kernels) branches (4 officially): branch i is a conv inplanes ->
    planes / S (no bias, kernel k_i, padding k_i // 2, groups g_i, ``stride``); ONE SE weight
    module (planes / S channels, reduction 16, 1x1 convs with bias, ReLU, sigmoid) is applied
    to every branch; a softmax across the branches turns the S SE outputs into weights; each
    branch is multiplied by its weights and the branches are concatenated **in reversed
    order** (branch S-1 first), as the official code does.

    Shapes: (B, inplanes, H, W) -> (B, planes, H', W') with H' = ceil(H / stride) for odd
    kernels.
    """

    def __init__(self, inplanes: int, planes: int, conv_kernels=(3, 5, 7, 9), stride: int = 1,
                 conv_groups=(1, 4, 8, 16)):
        super().__init__()
        name = "PyramidSplitAttention"
        _check_positive(name, "inplanes", inplanes)
        _check_positive(name, "planes", planes)
        _check_positive(name, "stride", stride)
        conv_kernels, conv_groups = tuple(conv_kernels), tuple(conv_groups)
        n = len(conv_kernels)
        check_config(name, "conv_groups", len(conv_groups) == n,
                     f"a sequence as long as conv_kernels ({n})", conv_groups)
        check_config(name, "planes", n > 0 and planes % n == 0,
                     f"divisible by the number of branches ({n})", planes)
        split = planes // n
        check_config(name, "planes", split >= 16,
                     f"at least 16 * {n} (the shared SE module reduces planes / {n} by 16)", planes)
        for g in conv_groups:
            check_config(name, "conv_groups", inplanes % g == 0 and split % g == 0,
                         f"groups dividing inplanes={inplanes} and planes / {n}={split}", conv_groups)
        self.inplanes = inplanes
        self.planes = planes
        self.split_channel = split
        self.num_branches = n
        for i, (k, g) in enumerate(zip(conv_kernels, conv_groups)):
            self.add_module(f"conv_{i + 1}", nn.Conv2d(inplanes, split, kernel_size=k, stride=stride,
                                                     padding=k // 2, groups=g, bias=False))
        self.se = _SEWeight(split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("PyramidSplitAttention", x, channels=self.inplanes)
        feats = [getattr(self, f"conv_{i + 1}")(x) for i in range(self.num_branches)]
        att = torch.stack([self.se(f) for f in feats], dim=1).softmax(dim=1)  # (B, S, C/S, 1, 1)
        weighted = [f * att[:, i] for i, f in enumerate(feats)]
        return like_input(torch.cat(weighted[::-1], dim=1), x)


# --------------------------------------------------------------------------------------------
# 12. Tiled SE
# --------------------------------------------------------------------------------------------


class TiledSqueezeExcite(nn.Module):
    """Tiled Squeeze-and-Excite: SE computed per spatial tile instead of globally.

    Paper: Vosco, Shenkler, Kubovy, Zamir, "Tiled Squeeze-and-Excite: Channel Attention With
    Local Spatial Context", ICCV Workshops 2021 (arXiv 2107.02145). No official code: the
    paper decides; parameter names are fastattn's own (``fc1``, ``bn``, ``fc2``).

    ``AvgPool2d(kernel=stride=pool_kernel, ceil_mode=True)`` (border tiles are averaged over
    the positions they cover) -> 1x1 conv C -> C // reduction (bias) -> BN -> ReLU -> 1x1 conv
    back to C (bias) -> sigmoid; each tile's gate is repeated over its
    pool_kernel x pool_kernel tile (cropped at the border) -> ``x * g``. With H, W <=
    pool_kernel it is an SE block with a BN in its bottleneck.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 16, pool_kernel: int = 7):
        super().__init__()
        hidden = _reduced("TiledSqueezeExcite", channels, reduction)
        _check_positive("TiledSqueezeExcite", "pool_kernel", pool_kernel)
        self.channels = channels
        self.pool_kernel = pool_kernel
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("TiledSqueezeExcite", x, channels=self.channels)
        k = self.pool_kernel
        h, w = x.shape[-2:]
        s = F.avg_pool2d(x, kernel_size=k, stride=k, ceil_mode=True)
        g = torch.sigmoid(self.fc2(F.relu(self.bn(self.fc1(s)))))
        g = g.repeat_interleave(k, dim=2)[:, :, :h].repeat_interleave(k, dim=3)[:, :, :, :w]
        return like_input(x * g, x)


# --------------------------------------------------------------------------------------------
# 13. NAM
# --------------------------------------------------------------------------------------------


class NAM(nn.Module):
    """Normalization-based attention (NAM, channel part): BN scale factors as channel weights.

    Paper: Liu, Shao, Wang, Li, "NAM: Normalization-based Attention Module", NeurIPS 2021
    workshop (arXiv 2111.12419). Source of truth: ``Christian-lyc/NAM`` (``MODELS/attention.py``,
    ``Channel_Att`` at its current HEAD, which has no ReLU); names as there (``bn2``).

    ``w = |gamma| / sum |gamma|`` from the BN weight, taken without gradient;
    ``out = sigmoid(bn2(x) * w) * x``.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int):
        super().__init__()
        _check_positive("NAM", "channels", channels)
        self.channels = channels
        self.bn2 = nn.BatchNorm2d(channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("NAM", x, channels=self.channels)
        gamma = self.bn2.weight.detach().abs()
        w = gamma / gamma.sum()
        out = torch.sigmoid(self.bn2(x) * w[None, :, None, None]) * x
        return like_input(out, x)
