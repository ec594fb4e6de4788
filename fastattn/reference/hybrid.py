"""Channel and spatial attention together (MODULES.md sections 3-5).

In parallel: SCSE, BAM, ShuffleAttention, TripletAttention. In series: CBAM.
Fused: SelfCalibratedConv, CoordinateAttention, SimAM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_config, check_feature_map, like_input

__all__ = [
    "SCSE",
    "BAM",
    "ShuffleAttention",
    "TripletAttention",
    "CBAM",
    "SelfCalibratedConv",
    "CoordinateAttention",
    "SimAM",
]


def _check_reduction(module: str, channels, reduction) -> None:
    check_config(module, "channels", isinstance(channels, int) and channels >= 1, "a positive int", channels)
    check_config(module, "reduction", isinstance(reduction, int) and 1 <= reduction <= channels,
                 f"an int in [1, channels={channels}] (channels // reduction hidden units)", reduction)


def _check_kernel(module: str, kernel_size) -> None:
    check_config(module, "kernel_size", isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1,
                 "a positive odd int (the conv keeps the size with padding (k - 1) // 2)", kernel_size)


class _ConvBN(nn.Module):
    """k x k conv 2 -> 1 without bias, then BatchNorm(eps 1e-5, momentum 0.01): the spatial
    gate's layer in CBAM and Triplet attention (their ``BasicConv`` with ``relu=False``)."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _max_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Z-pool / CBAM channel pool: [max, mean] over `dim`, stacked as 2 channels at dim 1. The max
    is the official ``torch.max(x, dim)[0]``: on a tie (a ReLU's zeros) its gradient goes to the
    first maximum, where ``amax`` would split it."""
    return torch.stack((x.max(dim=dim).values, x.mean(dim=dim)), dim=1)


# --------------------------------------------------------------------------------------
# 3. Channel and spatial, in parallel
# --------------------------------------------------------------------------------------


class _ChannelSE(nn.Module):
    """cSE: global mean -> Linear(C, C/r) -> ReLU -> Linear(C/r, C) -> sigmoid -> x * g."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * g[:, :, None, None]


class _SpatialSE(nn.Module):
    """sSE: 1x1 conv C -> 1 (bias) -> sigmoid -> x * s."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (scSE).

    Paper: Roy, Navab, Wachinger, "Concurrent Spatial and Channel 'Squeeze & Excitation' in
    Fully Convolutional Networks", MICCAI 2018 (arXiv 1803.02579). Source of truth:
    ``ai-med/squeeze_and_excitation`` ``squeeze_and_excitation/squeeze_and_excitation.py``
    (``ChannelSpatialSELayer``).

    ``cSE(x) = x * sigmoid(fc2(relu(fc1(mean_hw(x)))))`` (Linear layers with bias, C -> C/r -> C);
    ``sSE(x) = x * sigmoid(conv1x1(x))`` (C -> 1, bias). The submodules ``cSE`` and ``sSE`` can
    be called on their own.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.

    Variants (keyword ``combine``): ``"max"`` (default) takes the element-wise maximum of the
    two, as the official code does; ``"add"`` takes their sum, as the paper describes.
    """

    def __init__(self, channels: int, reduction: int = 2, combine: str = "max"):
        super().__init__()
        _check_reduction("SCSE", channels, reduction)
        check_config("SCSE", "combine", combine in ("max", "add"), "'max' or 'add'", combine)
        self.channels = channels
        self.combine = combine
        self.cSE = _ChannelSE(channels, reduction)
        self.sSE = _SpatialSE(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SCSE", x, channels=self.channels)
        c, s = self.cSE(x), self.sSE(x)
        return like_input(torch.maximum(c, s) if self.combine == "max" else c + s, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, combine={self.combine!r}"


class _BAMChannelGate(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(channels, hidden))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(hidden))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A true global mean: the official avg_pool2d(kernel=H) equals it on square maps only.
        return self.gate_c(x.mean(dim=(2, 3)))[:, :, None, None]


class _BAMSpatialGate(nn.Module):
    def __init__(self, channels: int, hidden: int, dilation: int, num_dilated: int):
        super().__init__()
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, 1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(num_dilated):
            self.gate_s.add_module(f"gate_s_conv_di_{i}",
                                   nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation))
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_s(x)


class BAM(nn.Module):
    """Bottleneck Attention Module.

    Paper: Park, Woo, Lee, Kweon, "BAM: Bottleneck Attention Module", BMVC 2018
    (arXiv 1807.06514). Source of truth: ``Jongchan/attention-module`` ``MODELS/bam.py``.

    Channel branch ``Mc`` (B, C, 1, 1): global average pool -> Linear(C, C/r) -> BatchNorm1d
    -> ReLU -> Linear(C/r, C). Spatial branch ``Ms`` (B, 1, H, W): 1x1 conv C -> C/r + BN +
    ReLU, ``num_dilated`` x (3x3 conv, dilation ``dilation``, padding ``dilation``, + BN +
    ReLU), 1x1 conv C/r -> 1; every conv has a bias. ``out = x * (1 + sigmoid(Mc (*) Ms))``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; in training mode ``B > 1`` (BatchNorm1d).

    Deviations and variants:

    - Channel pooling: the official code pools with ``avg_pool2d(kernel_size=H)``, which is
      the global mean only on square maps (non-square maps break its flatten). This module
      takes a true global mean over ``H x W``: identical on square maps, and any ``H x W``
      works.
    - ``combine="product"`` (default) multiplies the branches, ``Mc * Ms``, as the official
      code does; ``combine="sum"`` adds them, ``Mc + Ms``, as the paper describes.
    - ``reduction``, ``dilation`` and ``num_dilated`` are fixed at 16, 4 and 2 in the official
      ``BAM`` class; here they are arguments with those defaults.
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4, num_dilated: int = 2,
                 combine: str = "product"):
        super().__init__()
        _check_reduction("BAM", channels, reduction)
        check_config("BAM", "dilation", isinstance(dilation, int) and dilation >= 1, "a positive int", dilation)
        check_config("BAM", "num_dilated", isinstance(num_dilated, int) and num_dilated >= 0,
                     "a non-negative int", num_dilated)
        check_config("BAM", "combine", combine in ("product", "sum"), "'product' or 'sum'", combine)
        self.channels = channels
        self.combine = combine
        hidden = channels // reduction
        self.channel_att = _BAMChannelGate(channels, hidden)
        self.spatial_att = _BAMSpatialGate(channels, hidden, dilation, num_dilated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("BAM", x, channels=self.channels)
        if self.training and x.shape[0] < 2:
            raise ValueError(
                "BAM: argument 'x' must have batch size > 1 in training mode "
                f"(the channel branch has a BatchNorm1d), got {x.shape[0]}"
            )
        mc, ms = self.channel_att(x), self.spatial_att(x)
        att = mc * ms if self.combine == "product" else mc + ms
        return like_input((1 + torch.sigmoid(att)) * x, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, combine={self.combine!r}"


class ShuffleAttention(nn.Module):
    """Shuffle attention (SA-Net).

    Paper: Zhang, Yang, "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks",
    ICASSP 2021 (arXiv 2102.00240). Source of truth: ``wofmanaf/SA-Net``
    ``models/sa_resnet.py`` (``sa_layer``).

    The channels are viewed as ``groups`` groups, each split into two halves of ``C / (2G)``
    channels. Channel half: ``x0 * sigmoid(cweight * mean_hw(x0) + cbias)``. Spatial half:
    ``x1 * sigmoid(sweight * GroupNorm(x1) + sbias)``, with a GroupNorm of ``C / (2G)`` groups
    over ``C / (2G)`` channels (one channel per group). The parameters are ``(1, C/2G, 1, 1)``
    (cweight 0, cbias 1, sweight 0, sbias 1 at init), shared by all groups. The halves are
    concatenated, reshaped back to ``(B, C, H, W)`` and channel-shuffled with 2 groups.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)`` with ``C % (2 * groups) == 0``.
    No deviation from the official code (whose ``sa_layer`` is ``(channel, groups)``).
    """

    def __init__(self, channels: int, groups: int = 64):
        super().__init__()
        check_config("ShuffleAttention", "groups", isinstance(groups, int) and groups >= 1, "a positive int", groups)
        check_config("ShuffleAttention", "channels",
                     isinstance(channels, int) and channels >= 1 and channels % (2 * groups) == 0,
                     f"a positive int divisible by 2*groups={2 * groups}", channels)
        self.channels = channels
        self.groups = groups
        half = channels // (2 * groups)
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("ShuffleAttention", x, channels=self.channels)
        b, c, h, w = x.shape
        x0, x1 = x.reshape(b * self.groups, c // self.groups, h, w).chunk(2, dim=1)
        xn = x0 * torch.sigmoid(self.cweight * x0.mean(dim=(2, 3), keepdim=True) + self.cbias)
        xs = x1 * torch.sigmoid(self.sweight * self.gn(x1) + self.sbias)
        out = torch.cat([xn, xs], dim=1).reshape(b, c, h, w)
        # Channel shuffle with 2 groups: channel k of half j goes to position 2k + j.
        out = out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return like_input(out, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"


class _ZPoolGate(nn.Module):
    """Triplet attention gate: Z-pool ([max, mean]) -> conv k x k -> BN -> sigmoid."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.conv = _ConvBN(kernel_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(pooled))


class TripletAttention(nn.Module):
    """Triplet attention: three rotated Z-pool gates, averaged.

    Paper: Misra, Nalamada, Arasanipalai, Hou, "Rotate to Attend: Convolutional Triplet
    Attention Module", WACV 2021 (arXiv 2010.03045). Source of truth:
    ``landskape-ai/triplet-attention`` ``triplet_attention.py``.

    Each gate pools one axis of ``x`` with the Z-pool (``[max, mean]``, in that order), runs a
    k x k conv 2 -> 1 (no bias) + BN (eps 1e-5, momentum 0.01) + sigmoid on the two other
    axes, and multiplies ``x`` by the result:

    - ``cw``: pools over H, gate over (C, W) (the official ``x.permute(0, 2, 1, 3)`` branch);
    - ``hc``: pools over W, gate over (H, C) (the official ``x.permute(0, 3, 2, 1)`` branch);
    - ``hw``: pools over C, gate over (H, W) (absent when ``no_spatial=True``).

    ``out = (hw + cw + hc) / 3``, or ``(cw + hc) / 2`` with ``no_spatial=True``.
    The gates are computed on the pooled maps directly, which is the official computation
    without materialising the permuted copies of ``x``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. ``kernel_size`` is fixed at 7 in the official
    code; here it is an argument (odd) with that default.
    """

    def __init__(self, kernel_size: int = 7, no_spatial: bool = False):
        super().__init__()
        _check_kernel("TripletAttention", kernel_size)
        self.kernel_size = kernel_size
        self.no_spatial = bool(no_spatial)
        self.cw = _ZPoolGate(kernel_size)
        self.hc = _ZPoolGate(kernel_size)
        if not self.no_spatial:
            self.hw = _ZPoolGate(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("TripletAttention", x)
        # cw gate: pooled over H -> (B, 2, C, W) -> gate (B, 1, C, W) -> (B, C, 1, W).
        out_cw = x * self.cw(_max_mean(x, dim=2)).permute(0, 2, 1, 3)
        # hc gate: pooled over W -> (B, 2, C, H) -> transpose to (B, 2, H, C) -> gate -> (B, C, H, 1).
        out_hc = x * self.hc(_max_mean(x, dim=3).transpose(2, 3)).permute(0, 3, 2, 1)
        if self.no_spatial:
            out = 1 / 2 * (out_cw + out_hc)
        else:
            out_hw = x * self.hw(_max_mean(x, dim=1))
            out = 1 / 3 * (out_hw + out_cw + out_hc)
        return like_input(out, x)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, no_spatial={self.no_spatial}"


# --------------------------------------------------------------------------------------
# 4. Channel then spatial, in series
# --------------------------------------------------------------------------------------


_CBAM_POOLS = ("avg", "max", "lp", "lse")


class _CBAMChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int, pool_types: tuple):
        super().__init__()
        self.pool_types = pool_types
        # Index 0 is the official Flatten, 2 the ReLU: the Linear layers keep keys mlp.1 and mlp.3.
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
        )

    @staticmethod
    def _pool(x: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "avg":
            return x.mean(dim=(2, 3))
        if kind == "max":  # the official max_pool2d over the plane: a tie's gradient to its first maximum
            return x.flatten(2).max(dim=2).values
        if kind == "lp":  # power-2 norm over H x W
            return x.square().sum(dim=(2, 3)).sqrt()
        return torch.logsumexp(x.flatten(2), dim=2)  # "lse"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = None
        for kind in self.pool_types:
            raw = self.mlp(self._pool(x, kind))
            att = raw if att is None else att + raw
        return x * torch.sigmoid(att)[:, :, None, None]


class _CBAMSpatialGate(nn.Module):
    def __init__(self, kernel_size: int):
        super().__init__()
        self.spatial = _ConvBN(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.spatial(_max_mean(x, dim=1)))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel gate, then spatial gate.

    Paper: Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018
    (arXiv 1807.06521). Source of truth: ``Jongchan/attention-module`` ``MODELS/cbam.py``.

    Channel gate: each pool in ``pool_types`` reduces ``x`` over ``H x W``; ONE shared MLP
    (Linear C -> C/r with bias, ReLU, Linear C/r -> C with bias) maps each pooled vector; the
    results are summed, ``Mc = sigmoid(sum)``, ``x' = x * Mc``. Spatial gate: ``[max, mean]``
    over the channels of ``x'`` (max first, as the official code; timm orders [mean, max]) ->
    k x k conv 2 -> 1 (no bias) -> BN (eps 1e-5, momentum 0.01) -> sigmoid -> ``x' * Ms``.

    ``pool_types`` entries: ``"avg"``, ``"max"``, ``"lp"`` (the 2-norm over H x W, the
    official ``lp_pool2d(norm_type=2)``), ``"lse"`` (log-sum-exp over H x W).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. ``no_spatial=True`` drops the spatial gate (and
    its parameters). ``kernel_size`` is fixed at 7 in the official code; here it is an
    argument (odd) with that default.
    """

    def __init__(self, channels: int, reduction: int = 16, pool_types=("avg", "max"), no_spatial: bool = False,
                 kernel_size: int = 7):
        super().__init__()
        _check_reduction("CBAM", channels, reduction)
        pool_types = tuple(pool_types) if isinstance(pool_types, (list, tuple)) else pool_types
        ok = isinstance(pool_types, tuple) and len(pool_types) > 0 and all(p in _CBAM_POOLS for p in pool_types)
        check_config("CBAM", "pool_types", ok, f"a non-empty sequence of {_CBAM_POOLS}", pool_types)
        _check_kernel("CBAM", kernel_size)
        self.channels = channels
        self.no_spatial = bool(no_spatial)
        self.ChannelGate = _CBAMChannelGate(channels, reduction, pool_types)
        if not self.no_spatial:
            self.SpatialGate = _CBAMSpatialGate(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("CBAM", x, channels=self.channels)
        out = self.ChannelGate(x)
        if not self.no_spatial:
            out = self.SpatialGate(out)
        return like_input(out, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, pool_types={self.ChannelGate.pool_types}, no_spatial={self.no_spatial}"


# --------------------------------------------------------------------------------------
# 5. Channel and spatial, fused
# --------------------------------------------------------------------------------------


def _conv3x3_bn(channels: int, stride: int = 1, pool: int | None = None) -> nn.Sequential:
    layers = [nn.AvgPool2d(kernel_size=pool, stride=pool)] if pool else []
    layers += [nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(channels)]
    return nn.Sequential(*layers)


class SelfCalibratedConv(nn.Module):
    """Self-calibrated convolution (the SC-Conv of SCNet).

    Paper: Liu, Hou, Cheng, Wang, Feng, "Improving Convolutional Networks with
    Self-Calibrated Convolutions", CVPR 2020. Source of truth: ``MCG-NKU/SCNet`` ``scnet.py``
    (``SCConv``, at the commit with the ``norm_layer`` argument).

    ``k2 = AvgPool(r, r) -> 3x3 conv -> BN``; ``k3 = 3x3 conv -> BN``;
    ``k4 = 3x3 conv (stride) -> BN`` (all convs without bias, padding 1);
    ``out = k4(k3(x) * sigmoid(x + nearest_upsample(k2(x), (H, W))))``.

    Shapes: ``(B, C, H, W) -> (B, C, H', W')`` with ``H' = (H - 1) // stride + 1`` (same for
    W); ``H, W >= pooling_r``. There is no trailing ReLU (the surrounding bottleneck applies
    it), as in the official code; the official ``groups``/``dilation``/``padding`` arguments
    are fixed at 1/1/1 and ``inplanes == planes == channels``.
    """

    def __init__(self, channels: int, stride: int = 1, pooling_r: int = 4):
        super().__init__()
        check_config("SelfCalibratedConv", "channels", isinstance(channels, int) and channels >= 1,
                     "a positive int", channels)
        check_config("SelfCalibratedConv", "stride", isinstance(stride, int) and stride >= 1, "a positive int", stride)
        check_config("SelfCalibratedConv", "pooling_r", isinstance(pooling_r, int) and pooling_r >= 1,
                     "a positive int", pooling_r)
        self.channels = channels
        self.stride = stride
        self.pooling_r = pooling_r
        self.k2 = _conv3x3_bn(channels, pool=pooling_r)
        self.k3 = _conv3x3_bn(channels)
        self.k4 = _conv3x3_bn(channels, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SelfCalibratedConv", x, channels=self.channels)
        h, w = x.shape[-2:]
        if h < self.pooling_r or w < self.pooling_r:
            raise ValueError(
                f"SelfCalibratedConv: argument 'x' must have H and W >= pooling_r={self.pooling_r}, "
                f"got H={h}, W={w}"
            )
        calib = torch.sigmoid(x + F.interpolate(self.k2(x), size=(h, w), mode="nearest"))
        return like_input(self.k4(self.k3(x) * calib), x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}, pooling_r={self.pooling_r}"


class CoordinateAttention(nn.Module):
    """Coordinate attention.

    Paper: Hou, Zhou, Feng, "Coordinate Attention for Efficient Mobile Network Design",
    CVPR 2021 (arXiv 2103.02907). Source of truth: ``houqb/CoordAttention`` ``coordatt.py``
    (``CoordAtt``).

    ``mip = max(8, channels // reduction)``. Pool along each axis: ``x_h = mean_w(x)``
    (B, C, H, 1), ``x_w = mean_h(x)`` (B, C, W, 1 after transposition); concatenate along the
    spatial axis -> 1x1 conv C -> mip (bias) -> BN -> h-swish (``y * relu6(y + 3) / 6``) ->
    split back -> ``a_h = sigmoid(conv_h(.))`` (B, C, H, 1), ``a_w = sigmoid(conv_w(.))``
    (B, C, 1, W), both 1x1 convs mip -> out_channels with bias -> ``x * a_w * a_h``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. ``out_channels`` (the official ``oup``) defaults
    to ``channels``; the gates multiply ``x``, so it must equal ``channels``.
    """

    def __init__(self, channels: int, out_channels: int | None = None, reduction: int = 32):
        super().__init__()
        check_config("CoordinateAttention", "channels", isinstance(channels, int) and channels >= 1,
                     "a positive int", channels)
        check_config("CoordinateAttention", "reduction", isinstance(reduction, int) and reduction >= 1,
                     "a positive int", reduction)
        if out_channels is None:
            out_channels = channels
        check_config("CoordinateAttention", "out_channels", out_channels == channels,
                     f"None or equal to channels={channels} (the gates multiply x)", out_channels)
        self.channels = channels
        mip = max(8, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.conv_h = nn.Conv2d(mip, out_channels, 1)
        self.conv_w = nn.Conv2d(mip, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("CoordinateAttention", x, channels=self.channels)
        h, w = x.shape[-2:]
        x_h = x.mean(dim=3, keepdim=True)                    # (B, C, H, 1)
        x_w = x.mean(dim=2, keepdim=True).transpose(2, 3)    # (B, C, W, 1)
        y = self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2)))
        y = y * (F.relu6(y + 3) / 6)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))                 # (B, C, H, 1)
        a_w = torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))  # (B, C, 1, W)
        return like_input(x * a_w * a_h, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mip={self.conv1.out_channels}"


class SimAM(nn.Module):
    """SimAM: a parameter-free attention from an energy function.

    Paper: Yang, Zhang, Li, Xie, "SimAM: A Simple, Parameter-Free Attention Module for
    Convolutional Neural Networks", ICML 2021. Source of truth: ``ZjjConan/SimAM``
    ``networks/attentions/simam_module.py`` (``simam_module``).

    Per channel, with ``n = H * W - 1``: ``d = (x - mean_hw(x))^2``,
    ``y = d / (4 * (sum_hw(d) / n + e_lambda)) + 0.5``, ``out = x * sigmoid(y)``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)`` with ``H * W >= 2``. No parameters. The default
    ``e_lambda=1e-4`` is the official default; the authors' ImageNet models used 0.1.
    """

    def __init__(self, e_lambda: float = 1e-4):
        super().__init__()
        check_config("SimAM", "e_lambda", isinstance(e_lambda, (int, float)) and e_lambda > 0,
                     "a positive float", e_lambda)
        self.e_lambda = float(e_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SimAM", x)
        h, w = x.shape[-2:]
        if h * w < 2:
            raise ValueError(
                f"SimAM: argument 'x' must have at least 2 spatial positions (H*W >= 2, n = H*W - 1), got H={h}, W={w}"
            )
        n = h * w - 1
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        y = d / (4 * (d.sum(dim=(2, 3), keepdim=True) / n + self.e_lambda)) + 0.5
        return like_input(x * torch.sigmoid(y), x)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"
