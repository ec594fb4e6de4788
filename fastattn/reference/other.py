"""Reference modules, family 6: other attention (MODULES.md rows 25-32).

DCA squeeze-excite, weight excitation, attentional activation, MS-CAM / AFF / iAFF, AW-convolution,
BA^2M, Interflow and CSRA. Modules with official PyTorch code (DCA, MS-CAM, AFF, iAFF, CSRA) match it
exactly, parameter order included; the others follow their papers as each docstring states.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_config, check_feature_map, check_same_shape, check_tensor, like_input

__all__ = [
    "DCASqueezeExcite",
    "WeightExcitedConv2d",
    "AttentionalActivation",
    "MSCAM",
    "AFF",
    "IAFF",
    "AWConv2d",
    "BatchAwareAttention",
    "ba2m_cross_entropy",
    "Interflow",
    "CSRA",
    "MultiHeadCSRA",
]


def _check_bn_batch(module: str, x: torch.Tensor, training: bool, why: str) -> None:
    """A BatchNorm over (B, C', 1, 1) statistics needs more than one sample in training mode."""
    if training and x.shape[0] < 2:
        raise ValueError(
            f"{module}: argument 'x' must have batch size > 1 in training mode ({why}), got {x.shape[0]}"
        )


# ---------------------------------------------------------------------------------------------------------------
# 25. DCA
# ---------------------------------------------------------------------------------------------------------------


class DCASqueezeExcite(nn.Module):
    """SE block with deep connected attention (DCA-SE).

    Paper: Ma et al., "DCANet: Learning Connected Attentions for Convolutional Neural Networks",
    ICME 2021 (arXiv 2007.05099).
    Source of truth: ``13952522076/DCANet`` ``models/resnet/resnet_se_dca.py``, class ``CSELayer``
    (commit 29c0792).

    ``forward(x, prev=None) -> (out, att)``:

    - ``gap = mean_hw(x)``, shape (B, C);
    - ``prev is None``: ``a = sigmoid(fc2(relu(fc1(gap))))`` (plain SE, Linear layers with bias);
    - otherwise ``p = relu(LayerNorm(Linear(prev)))`` when ``in_channels != channels`` (``att_fc``), else
      ``p = prev``; the two vectors are stacked as a (B, 2, 1, C) image, mixed by ``Conv2d(2, 1, 1)``,
      ``LayerNorm(C)`` and ReLU, and the result goes through the same SE MLP;
    - ``out = x * a`` (B, C, H, W) and ``att = gap * a`` (B, C), the attention handed to the next block.

    ``prev`` is the ``att`` of the previous block, shape (B, in_channels). The official module takes and
    returns dicts ``{0: x, 1: prev}``; this one takes and returns plain tensors. Parameters are registered in
    the official order: ``fc``, ``att_fc`` (only when ``in_channels != channels``), ``conv``.
    """

    def __init__(self, in_channels: int, channels: int, reduction: int = 16):
        super().__init__()
        name = type(self).__name__
        check_config(name, "in_channels", in_channels >= 1, "a positive int", in_channels)
        check_config(name, "channels", channels >= 1, "a positive int", channels)
        check_config(name, "reduction", 1 <= reduction <= channels, f"between 1 and channels={channels}", reduction)
        self.in_channels = in_channels
        self.channels = channels
        hidden = channels // reduction
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid()
        )
        if in_channels != channels:
            self.att_fc = nn.Sequential(nn.Linear(in_channels, channels), nn.LayerNorm(channels), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(2, 1, kernel_size=1), nn.LayerNorm(channels), nn.ReLU())

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        check_feature_map(name, x, channels=self.channels)
        b, c = x.shape[:2]
        gap = x.mean(dim=(2, 3))
        if prev is None:
            a = self.fc(gap)
        else:
            check_tensor(name, "prev", prev, dim=2, shape_hint="(B, in_channels)")
            if tuple(prev.shape) != (b, self.in_channels):
                raise ValueError(
                    f"{name}: argument 'prev' must have shape (B, in_channels) = {(b, self.in_channels)}, "
                    f"got {tuple(prev.shape)}"
                )
            p = self.att_fc(prev) if self.in_channels != self.channels else prev
            stacked = torch.stack((gap, p), dim=1).view(b, 2, 1, c)
            a = self.fc(self.conv(stacked).view(b, c))
        return x * a.view(b, c, 1, 1), gap * a


# ---------------------------------------------------------------------------------------------------------------
# 26. Weight excitation
# ---------------------------------------------------------------------------------------------------------------


class WeightExcitedConv2d(nn.Conv2d):
    """Conv2d with weight excitation (location-based LWE and magnitude-based MWE).

    Paper: Quader et al., "Weight Excitation: Built-in Attention Mechanisms in Convolutional Neural
    Networks", ECCV 2020. No official code exists. The paper's full text could not be read from this project's
    sources; the formulas come from the abstract and from a formula-level summary of the paper
    (0809zheng.github.io, "Weight Excitation" post), checked against one unofficial implementation on GitHub.

    Constructor: the ``nn.Conv2d`` arguments (stride, padding, dilation, groups, bias, padding_mode), plus
    ``reduction=16`` (LWE MLP), ``eps_a=0.1`` (MWE margin; the paper asks 0 < eps_A < 0.2), ``lwe=True`` and
    ``mwe=True`` to switch either mechanism off, ``paper_grad=True`` (see MWE below). The conv's own parameters ``weight`` (O, I/g, kh, kw) and ``bias``
    come first, then the LWE MLP (``lwe_fc``). Input (B, C_in, H, W) -> output (B, C_out, H', W'), as
    ``nn.Conv2d``.

    Formulas implemented (output filter o, input slice i of the weight W of shape (O, I', kh, kw), I' = I/g):

    - LWE (paper: one attention sub-network, shared by all output filters, maps the I' x kh x kw weights of a
      filter to I' importance values; the summary describes it as an SE block on the weight):
      ``v[o] = mean_{kh,kw} W[o]``; ``m[o] = sigmoid(fc2(relu(fc1(v[o]))))``, fc1: I' -> max(I'//reduction, 1),
      fc2 back to I' (Linear, with bias); ``W1[o, i] = m[o, i] * W[o, i]``.
    - MWE (paper's activation on the weight): ``M_A = (1 + eps_a) * M``,
      ``W2 = M_A * 0.5 * ln((1 + W1/M_A) / (1 - W1/M_A))`` (= ``M_A * atanh(W1 / M_A)``), with the paper's
      gradient ``dL/dW1 = M_A^2 / (M_A^2 - W1^2) * dL/dW2``: with ``paper_grad=True`` (default) M_A is treated
      as a constant in the backward pass (it is detached), so this gradient holds exactly, the largest weight
      included; it is then not the exact derivative of the forward. ``paper_grad=False`` lets autograd
      differentiate M_A too (the exact derivative; it differs only in the gradient reaching each filter's
      largest-magnitude weight). The forward is the same either way.
    - ``y = conv2d(x, W2, bias)``.

    Interpretation (not fixed by the sources read): M is the largest |W1| of each output filter (the unofficial
    implementation takes it over the whole layer); the SE block pools the kernel by its mean; MWE is applied
    after LWE. ``fold()`` returns a plain ``nn.Conv2d`` holding the excited weight, which gives the same output
    (use it for inference: the paper's mechanisms cost nothing at inference).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        reduction: int = 16,
        eps_a: float = 0.1,
        lwe: bool = True,
        mwe: bool = True,
        paper_grad: bool = True,
        device=None,
        dtype=None,
    ):
        name = type(self).__name__
        check_config(name, "in_channels", in_channels >= 1, "a positive int", in_channels)
        check_config(name, "groups", groups >= 1 and in_channels % groups == 0 and out_channels % groups == 0,
                     f"a positive divisor of in_channels={in_channels} and out_channels={out_channels}", groups)
        check_config(name, "reduction", reduction >= 1, "a positive int", reduction)
        check_config(name, "eps_a", eps_a > 0, "> 0", eps_a)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.eps_a = float(eps_a)
        self.use_lwe = lwe
        self.use_mwe = mwe
        self.paper_grad = bool(paper_grad)
        if lwe:
            per_filter = in_channels // groups
            hidden = max(per_filter // reduction, 1)
            factory = {"device": device, "dtype": dtype}
            self.lwe_fc = nn.Sequential(
                nn.Linear(per_filter, hidden, **factory), nn.ReLU(), nn.Linear(hidden, per_filter, **factory)
            )

    def excited_weight(self) -> torch.Tensor:
        """The weight the convolution actually uses, shape (O, I/g, kh, kw)."""
        w = self.weight
        if self.use_lwe:
            m = torch.sigmoid(self.lwe_fc(w.mean(dim=(2, 3))))
            w = w * m[:, :, None, None]
        if self.use_mwe:
            # The paper's gradient holds M_A constant: detach it (paper_grad=False differentiates it too).
            m_a = (1.0 + self.eps_a) * (w.detach() if self.paper_grad else w).abs().amax(dim=(1, 2, 3), keepdim=True)
            m_a = m_a.clamp_min(torch.finfo(w.dtype).tiny)
            w = m_a * torch.atanh(w / m_a)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(type(self).__name__, x, channels=self.in_channels)
        return like_input(self._conv_forward(x, self.excited_weight(), self.bias), x)

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` (same configuration, device and dtype) holding the excited weight."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode, device=self.weight.device, dtype=self.weight.dtype,
        )
        conv.weight.copy_(self.excited_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv.train(self.training)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, eps_a={self.eps_a}, lwe={self.use_lwe}, mwe={self.use_mwe}, "
                f"paper_grad={self.paper_grad}")


# ---------------------------------------------------------------------------------------------------------------
# 27. Attentional activation
# ---------------------------------------------------------------------------------------------------------------


class AttentionalActivation(nn.Module):
    """Channel-wise attentional activation unit (ATAC), used in place of ReLU.

    Paper: Dai et al., "Attention as Activation", ICPR 2020 (arXiv 2007.07729).
    Source of truth: MXNet ``YimianDai/open-atac`` ``model/activation.py``, class ``ChaATAC``, written here in
    PyTorch.

    ``w = sigmoid(BN(conv2(act(BN(conv1(p))))))`` with ``p = GAP(x)`` when ``use_global`` else ``x``;
    conv1: 1x1 C -> C//reduction, conv2: 1x1 back to C, both without bias; ``act`` is ReLU when
    ``use_relu`` and the identity otherwise. Output ``x * w``, shape (B, C, H, W).

    The MXNet BatchNorm defaults (running-stat decay 0.9, eps 1e-5) equal PyTorch's (momentum 0.1, eps 1e-5).
    The layers live in ``att`` (an ``nn.Sequential``; MXNet calls it ``module``, a name PyTorch code often reads
    as a DataParallel wrapper); positions inside it shift with ``use_global`` / ``use_relu`` as in the official
    block. With ``use_global`` the BNs see one value per channel per sample, so training needs B > 1.
    """

    def __init__(self, channels: int, reduction: int = 4, use_global: bool = False, use_relu: bool = True):
        super().__init__()
        name = type(self).__name__
        check_config(name, "reduction", 1 <= reduction <= channels, f"between 1 and channels={channels}", reduction)
        self.channels = channels
        self.use_global = use_global
        inter = int(channels // reduction)
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if use_global else []
        layers += [nn.Conv2d(channels, inter, 1, bias=False), nn.BatchNorm2d(inter)]
        if use_relu:
            layers.append(nn.ReLU())
        layers += [nn.Conv2d(inter, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.Sigmoid()]
        self.att = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_feature_map(name, x, channels=self.channels)
        if self.use_global:
            _check_bn_batch(name, x, self.training, "use_global=True: BatchNorm over pooled (B, C, 1, 1) values")
        return like_input(x * self.att(x), x)


# ---------------------------------------------------------------------------------------------------------------
# 28. MS-CAM, AFF, iAFF
# ---------------------------------------------------------------------------------------------------------------


def _local_branch(channels: int, inter: int) -> nn.Sequential:
    """MS-CAM point-wise branch: 1x1 (bias) + BN + ReLU + 1x1 (bias) + BN, at full resolution."""
    return nn.Sequential(
        nn.Conv2d(channels, inter, 1), nn.BatchNorm2d(inter), nn.ReLU(),
        nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels),
    )


def _global_branch(channels: int, inter: int) -> nn.Sequential:
    """MS-CAM global branch: GAP, then the same layers as the local branch on (B, C, 1, 1)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), *_local_branch(channels, inter))


def _mscam_config(module: str, channels: int, reduction: int) -> int:
    check_config(module, "channels", channels >= 1, "a positive int", channels)
    check_config(module, "reduction", 1 <= reduction <= channels, f"between 1 and channels={channels}", reduction)
    return int(channels // reduction)


_GLOBAL_BN = "the global branch's BatchNorm sees one value per channel per sample"


class MSCAM(nn.Module):
    """Multi-scale channel attention module (MS-CAM).

    Paper: Dai et al., "Attentional Feature Fusion", WACV 2021 (arXiv 2009.14082).
    Source of truth: ``YimianDai/open-aff`` ``aff_pytorch/aff_net/fusion.py``, class ``MS_CAM`` (commit 0bcfd8a).

    ``w = sigmoid(L(x) + G(x))``, with L = 1x1 C->C/r (bias) + BN + ReLU + 1x1 C/r->C (bias) + BN at full
    resolution and G the same layers after a global average pool; output ``x * w``, shape (B, C, H, W).
    The global branch's BN sees one value per channel per sample, so training needs B > 1.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        inter = _mscam_config(type(self).__name__, channels, reduction)
        self.channels = channels
        self.local_att = _local_branch(channels, inter)
        self.global_att = _global_branch(channels, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_feature_map(name, x, channels=self.channels)
        _check_bn_batch(name, x, self.training, _GLOBAL_BN)
        w = torch.sigmoid(self.local_att(x) + self.global_att(x))
        return like_input(x * w, x)


class _FusionBase(nn.Module):
    """Shared argument checks of AFF and iAFF: forward(x, residual), both (B, C, H, W)."""

    channels: int

    def _check(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        name = type(self).__name__
        check_feature_map(name, x, channels=self.channels)
        check_feature_map(name, residual, channels=self.channels, name="residual")
        check_same_shape(name, "residual", residual, "x", x)
        _check_bn_batch(name, x, self.training, _GLOBAL_BN)


class AFF(_FusionBase):
    """Attentional feature fusion (AFF) of two feature maps.

    Paper: Dai et al., "Attentional Feature Fusion", WACV 2021 (arXiv 2009.14082).
    Source of truth: ``YimianDai/open-aff`` ``aff_pytorch/aff_net/fusion.py``, class ``AFF`` (commit 0bcfd8a).

    ``forward(x, residual)``: ``w = MS-CAM weights of (x + residual)`` (see ``MSCAM``), and
    ``out = 2 * x * w + 2 * residual * (1 - w)`` (the official factor 2), shape (B, C, H, W).
    Training needs B > 1 (the global branch's BN).
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        inter = _mscam_config(type(self).__name__, channels, reduction)
        self.channels = channels
        self.local_att = _local_branch(channels, inter)
        self.global_att = _global_branch(channels, inter)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        self._check(x, residual)
        xa = x + residual
        w = torch.sigmoid(self.local_att(xa) + self.global_att(xa))
        return like_input(2 * x * w + 2 * residual * (1 - w), x)


class IAFF(_FusionBase):
    """Iterative attentional feature fusion (iAFF).

    Paper: Dai et al., "Attentional Feature Fusion", WACV 2021 (arXiv 2009.14082).
    Source of truth: ``YimianDai/open-aff`` ``aff_pytorch/aff_net/fusion.py``, class ``iAFF`` (commit 0bcfd8a).

    ``forward(x, residual)``, both (B, C, H, W):

    - stage one: ``w1 = sigmoid(local_att(x + r) + global_att(x + r))``, ``xi = x * w1 + r * (1 - w1)``;
    - stage two: ``w2 = sigmoid(local_att2(xi) + G2(xi))``, ``out = x * w2 + r * (1 - w2)``;

    with no factor 2 in either stage. ``official_bug=True`` (default) reproduces the official code, whose
    stage two uses ``G2 = global_att`` (the first global branch, run twice, so its BN statistics update
    twice per training forward) while ``global_att2`` stays registered and unused (kept so official
    checkpoints load; it gets no gradient). ``official_bug=False`` uses ``G2 = global_att2`` as the paper
    intends. Training needs B > 1 (the global branches' BN).
    """

    def __init__(self, channels: int, reduction: int = 4, official_bug: bool = True):
        super().__init__()
        inter = _mscam_config(type(self).__name__, channels, reduction)
        self.channels = channels
        self.official_bug = official_bug
        self.local_att = _local_branch(channels, inter)
        self.global_att = _global_branch(channels, inter)
        self.local_att2 = _local_branch(channels, inter)
        self.global_att2 = _global_branch(channels, inter)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        self._check(x, residual)
        xa = x + residual
        w1 = torch.sigmoid(self.local_att(xa) + self.global_att(xa))
        xi = x * w1 + residual * (1 - w1)
        global2 = self.global_att if self.official_bug else self.global_att2
        w2 = torch.sigmoid(self.local_att2(xi) + global2(xi))
        return like_input(x * w2 + residual * (1 - w2), x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, official_bug={self.official_bug}"


# ---------------------------------------------------------------------------------------------------------------
# 29. AW-convolution
# ---------------------------------------------------------------------------------------------------------------


class AWConv2d(nn.Conv2d):
    """AW-convolution: a convolution whose attention map has the shape of its weights.

    Paper: Zhu et al., "An Attention Module for Convolutional Neural Networks", arXiv 2108.08205 (ICANN 2021).
    No official code exists. The paper's full text could not be read from this project's sources; the formulas
    come from its abstract and from formula-level summaries of it (0809zheng.github.io "AW-conv" post, a CSDN
    reading note). What they state: the attention map A has the weight's shape, A in R^{C2 x C1 x h x w}
    (C2 = out_channels, C1 = in_channels, h x w the kernel), which is the point of the paper (one map shared by all
    output channels is its "insufficient capacity problem"); applying A to the input window is rewritten as
    ``Conv(I (x) A, K) = Conv(I, A (x) K)``; A is computed from the input by ``AvgPool2d`` to the kernel size
    (A0), then point-wise conv 1, ReLU, point-wise conv 2.

    Constructor: the ``nn.Conv2d`` arguments plus ``reduction=16``, ``num_maps=None`` (= out_channels) and
    ``residual=True``. Parameters: the conv's ``weight`` (O, I/g, kh, kw) and ``bias``, then ``att`` (two 1x1 convs
    with bias). Input (B, C_in, H, W) -> output (B, C_out, H', W').

    Formulas implemented, per sample b:

    - ``A0 = adaptive_avg_pool2d(x, (kh, kw))``, shape (B, C_in, kh, kw);
    - ``A = pconv2(relu(pconv1(A0)))``, pconv1: C_in -> max(C_in//reduction, 1), pconv2: -> num_maps * C_in;
      viewed as (B, num_maps, C_in, kh, kw), no final activation;
    - output filter o uses map ``o // (O / num_maps)`` restricted to its group's input channels, giving
      ``A_b`` of the weight's shape (O, I/g, kh, kw) (with the default num_maps = O: one map per filter, the
      paper's C2 x C1 x h x w);
    - ``residual=True``: ``y_b = conv2d(x_b, K * (1 + A_b)) + bias``; ``residual=False``:
      ``y_b = conv2d(x_b, K * A_b) + bias`` (the summaries' ``Conv(I, A (x) K)``).

    Interpretation (not fixed by the sources read): the residual form (default; it keeps K when A = 0, so the
    layer starts near a plain convolution), the absence of a sigmoid on A, the hidden width of the point-wise
    convs, and ``num_maps < out_channels`` (filter groups sharing one map, a cheaper variant). The per-sample
    kernels are run as one grouped convolution over the batch.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        reduction: int = 16,
        num_maps: int | None = None,
        residual: bool = True,
        device=None,
        dtype=None,
    ):
        name = type(self).__name__
        check_config(name, "in_channels", in_channels >= 1, "a positive int", in_channels)
        check_config(name, "groups", groups >= 1 and in_channels % groups == 0 and out_channels % groups == 0,
                     f"a positive divisor of in_channels={in_channels} and out_channels={out_channels}", groups)
        check_config(name, "reduction", reduction >= 1, "a positive int", reduction)
        if num_maps is None:
            num_maps = out_channels
        check_config(name, "num_maps", num_maps >= 1 and out_channels % num_maps == 0,
                     f"a positive divisor of out_channels={out_channels}", num_maps)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.reduction = reduction
        self.num_maps = num_maps
        self.residual = bool(residual)
        hidden = max(in_channels // reduction, 1)
        factory = {"device": device, "dtype": dtype}
        self.att = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, **factory), nn.ReLU(),
            nn.Conv2d(hidden, num_maps * in_channels, 1, **factory),
        )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample attention of the weight's shape: (B, C_out, C_in/groups, kh, kw)."""
        b = x.shape[0]
        kh, kw = self.kernel_size
        a = self.att(F.adaptive_avg_pool2d(x, (kh, kw)))
        a = a.reshape(b, self.num_maps, self.groups, self.in_channels // self.groups, kh, kw)
        filters = torch.arange(self.out_channels, device=x.device)
        map_idx = filters // (self.out_channels // self.num_maps)
        group_idx = filters // (self.out_channels // self.groups)
        return a[:, map_idx, group_idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(type(self).__name__, x, channels=self.in_channels)
        b = x.shape[0]
        a = self.attention(x)
        weight = self.weight * (1 + a if self.residual else a)  # (B, O, I/g, kh, kw)
        inp, padding = x, self.padding
        if self.padding_mode != "zeros":
            inp, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        y = F.conv2d(
            inp.reshape(1, b * self.in_channels, *inp.shape[2:]),
            weight.reshape(b * self.out_channels, *weight.shape[2:]),
            None, self.stride, padding, self.dilation, b * self.groups,
        )
        y = y.reshape(b, self.out_channels, *y.shape[2:])
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return like_input(y, x)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, reduction={self.reduction}, num_maps={self.num_maps}, "
                f"residual={self.residual}")


# ---------------------------------------------------------------------------------------------------------------
# 30. BA^2M
# ---------------------------------------------------------------------------------------------------------------


class BatchAwareAttention(nn.Module):
    """Batch aware attention module (BA^2M): one importance weight per sample of the batch.

    Paper: Cheng et al., "BA^2M: A Batch Aware Attention Module for Image Classification", arXiv 2103.15099.
    No official code exists. The paper's full text could not be read from this project's sources; the formulas
    come from its abstract and from a formula-level summary of its method section (0809zheng.github.io "BA^2M"
    post), consistent with one unofficial implementation on GitHub. Those formulas, for sample x_i:

    - channel: ``A_C(x_i) = BN(FC_1(FC_0(GAP(x_i))))``;
    - local spatial: ``A_LS(x_i) = BN(g_2^{1x1}(g_1^{3x3}(g_0^{1x1}(x_i))))``;
    - global spatial: ``A_GS(x_i) = softmax(f(x_i) g(x_i)^T) h(x_i)``;
    - sample-wise attention representation: ``A_i = mean(max(A_C(x_i), A_LS(x_i), A_GS(x_i)))``;
    - weights: ``w_i = exp(A_i) / sum_j exp(A_j)`` (softmax over the batch);
    - loss: ``L = -1/N sum_i log softmax(w_i * f_i)[y_i]`` (``ba2m_cross_entropy``).

    ``forward(x) -> weights`` of shape (B,), for x (B, C, H, W) (the last feature map of the network). As
    implemented, with d = max(C // reduction, 1) and all convs 1x1 with bias unless stated:

    - ``A_C = BN_C(fc1(fc0(GAP(x))))``, fc0: C -> d, fc1: d -> C, shape (B, C, 1, 1);
    - ``A_LS = BN_1(g2(g1(g0(x))))``, g0: C -> d, g1: 3x3 d -> d with ``dilation`` (padding = dilation),
      g2: d -> 1, shape (B, 1, H, W);
    - ``A_GS[p] = sum_p' softmax_p'(f(x)_p . g(x)_p') h(x)_p'``, f, g: C -> d, h: C -> 1, shape (B, 1, H, W)
      (no 1/sqrt(d) scaling, as in the formula);
    - ``A_i = mean_{c,h,w} max(A_C, A_LS, A_GS)`` (element-wise max after broadcasting to (B, C, H, W));
    - ``w = softmax_batch(A)``; with ``scale_by_batch=True`` (not the paper) w is multiplied by B so the weights
      average 1 and a batch of equal samples gives plain cross-entropy.

    Interpretation (not fixed by the sources read): no activation between the FCs/convs of a branch (the formulas
    show none; BAM, which the branches resemble, puts a ReLU there); one output channel for both spatial maps
    (a spatial attention map), so the max broadcasts them against the channel map; the 3x3 dilation (default 4,
    BAM's value); d. BN needs more than one sample in training mode, which a batch weighting needs anyway. The
    weights depend on the whole batch; at inference a positive per-sample scale of the logits changes no
    prediction, so the module is only needed in training.
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4, scale_by_batch: bool = False):
        super().__init__()
        name = type(self).__name__
        check_config(name, "channels", channels >= 1, "a positive int", channels)
        check_config(name, "reduction", reduction >= 1, "a positive int", reduction)
        check_config(name, "dilation", dilation >= 1, "a positive int", dilation)
        self.channels = channels
        self.scale_by_batch = scale_by_batch
        d = max(channels // reduction, 1)
        self.channel_att = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, d, 1), nn.Conv2d(d, channels, 1), nn.BatchNorm2d(channels)
        )
        self.local_att = nn.Sequential(
            nn.Conv2d(channels, d, 1),
            nn.Conv2d(d, d, 3, padding=dilation, dilation=dilation),
            nn.Conv2d(d, 1, 1),
            nn.BatchNorm2d(1),
        )
        self.query = nn.Conv2d(channels, d, 1)
        self.key = nn.Conv2d(channels, d, 1)
        self.value = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_feature_map(name, x, channels=self.channels)
        _check_bn_batch(name, x, self.training, "the channel branch's BatchNorm sees one value per channel")
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # (B, d, N)
        k = self.key(x).flatten(2)
        v = self.value(x).flatten(2)  # (B, 1, N)
        affinity = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N), rows: query positions
        a_g = (v @ affinity.transpose(1, 2)).view(b, 1, h, w)
        att = torch.maximum(torch.maximum(self.channel_att(x), self.local_att(x)), a_g)  # (B, C, H, W)
        sar = att.mean(dim=(1, 2, 3))
        weights = torch.softmax(sar, dim=0)
        return weights * b if self.scale_by_batch else weights


def ba2m_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """BA^2M loss: cross-entropy of per-sample scaled logits.

    ``L = -1/N sum_i log softmax(w_i * f_i)[y_i]`` (``reduction="mean"``; ``"sum"`` drops the 1/N and
    ``"none"`` returns the N terms), with f (N, K) the logits, y (N,) int64 class indices and w (N,) the
    weights of ``BatchAwareAttention``. With all weights 1 it equals ``F.cross_entropy(logits, target)``.
    """
    name = "ba2m_cross_entropy"
    check_tensor(name, "logits", logits, dim=2, shape_hint="(N, num_classes)")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}: argument 'target' must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"{name}: argument 'target' must be an int64 tensor of class indices, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{name}: argument 'target' must have shape (N,) = ({logits.shape[0]},), got {tuple(target.shape)}"
        )
    check_tensor(name, "weights", weights, dim=1, shape_hint="(N,)")
    if weights.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{name}: argument 'weights' must have shape (N,) = ({logits.shape[0]},), got {tuple(weights.shape)}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{name}: argument 'reduction' must be 'mean', 'sum' or 'none', got {reduction!r}")
    return F.cross_entropy(logits * weights.to(logits.dtype)[:, None], target, reduction=reduction)


# ---------------------------------------------------------------------------------------------------------------
# 31. Interflow
# ---------------------------------------------------------------------------------------------------------------


class Interflow(nn.Module):
    """Interflow: attention-weighted aggregation of per-stage predictions.

    Paper: Cai, "Interflow: Aggregating Multi-layer Feature Mappings with Attention Mechanism",
    arXiv 2106.14073. No official code exists. The paper's full text could not be read from this project's
    sources; the method comes from its abstract and from a summary of it (0809zheng.github.io "Interflow" post):
    the CNN is cut into stages; each stage's output map goes through adaptive average pooling and a fully
    connected layer, giving that stage's class confidences (a prediction branch); a "soft attention" learns one
    weight per branch with a 1 x n convolution over the n branches, and the weighted branches are aggregated
    into the output (the "hard attention" alternative fixes the weights as hyper-parameters).

    ``forward(features) -> logits`` (B, num_classes), with ``features`` a list of S maps, the i-th of shape
    (B, stage_channels[i], H_i, W_i). Formulas implemented:

    - stage heads: ``p_i = Linear_i(GAP(features[i]))`` (with bias), shape (B, K);
    - attention: ``attention = Conv2d(1, 1, kernel_size=(1, S))`` (with bias) over the predictions stacked as a
      (B, 1, K, S) map, i.e. ``out[b, k] = sum_i a_i * p_i[b, k] + c`` with ``a = attention.weight`` (S learned
      branch weights, shared by all classes and samples) and ``c = attention.bias``.

    Interpretation (not fixed by the sources read): the conv's bias, the absence of any normalisation of the
    branch weights (no softmax), and GAP for the adaptive pooling (output size 1).
    """

    def __init__(self, stage_channels: Sequence[int], num_classes: int):
        super().__init__()
        name = type(self).__name__
        stage_channels = tuple(int(c) for c in stage_channels)
        check_config(name, "stage_channels", len(stage_channels) >= 1 and min(stage_channels) >= 1,
                     "a non-empty sequence of positive ints", stage_channels)
        check_config(name, "num_classes", num_classes >= 1, "a positive int", num_classes)
        self.stage_channels = stage_channels
        self.num_classes = num_classes
        self.heads = nn.ModuleList(nn.Linear(c, num_classes) for c in stage_channels)
        self.attention = nn.Conv2d(1, 1, kernel_size=(1, len(stage_channels)))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(features, (list, tuple)) or len(features) != len(self.stage_channels):
            given = f"{len(features)} items" if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(
                f"{name}: argument 'features' must be a list of {len(self.stage_channels)} feature maps "
                f"(one per stage), got {given}"
            )
        for i, (f, c) in enumerate(zip(features, self.stage_channels)):
            check_feature_map(name, f, channels=c, name=f"features[{i}]")
            if f.shape[0] != features[0].shape[0] or f.dtype != features[0].dtype:
                raise ValueError(
                    f"{name}: argument 'features[{i}]' must have the batch size and dtype of 'features[0]' "
                    f"({features[0].shape[0]}, {features[0].dtype}), got ({f.shape[0]}, {f.dtype})"
                )
        preds = torch.stack([head(f.mean(dim=(2, 3))) for head, f in zip(self.heads, features)], dim=2)  # (B, K, S)
        return self.attention(preds.unsqueeze(1)).flatten(1)  # (B, 1, K, 1) -> (B, K)


# ---------------------------------------------------------------------------------------------------------------
# 32. CSRA
# ---------------------------------------------------------------------------------------------------------------


class CSRA(nn.Module):
    """Class-specific residual attention (CSRA) head for multi-label classification.

    Paper: Zhu & Wu, "Residual Attention: A Simple but Effective Method for Multi-Label Recognition",
    ICCV 2021 (arXiv 2108.02456).
    Source of truth: ``Kevinz-code/CSRA`` ``pipeline/csra.py``, class ``CSRA`` (commit c8480d1).

    x (B, input_dim, H, W) -> logits (B, num_classes):
    ``s = head(x) / ||head.weight[k]||`` (1x1 conv without bias, each class score divided by the L2 norm of
    that class's weight, gradient included), flattened over H*W; ``base = mean_hw s``;
    ``att = max_hw s`` when ``T == 99`` (the official sentinel), else ``sum_hw s * softmax_hw(T * s)``;
    ``logits = base + lam * att``.
    """

    def __init__(self, input_dim: int, num_classes: int, T: float, lam: float):
        super().__init__()
        name = type(self).__name__
        check_config(name, "input_dim", input_dim >= 1, "a positive int", input_dim)
        check_config(name, "num_classes", num_classes >= 1, "a positive int", num_classes)
        self.input_dim = input_dim
        self.T = T
        self.lam = lam
        self.head = nn.Conv2d(input_dim, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(type(self).__name__, x, channels=self.input_dim)
        norm = torch.norm(self.head.weight, dim=1, keepdim=True).transpose(0, 1)  # (1, K, 1, 1)
        score = (self.head(x) / norm).flatten(2)  # (B, K, H*W)
        base = score.mean(dim=2)
        if self.T == 99:
            att = score.max(dim=2).values
        else:
            att = (score * torch.softmax(score * self.T, dim=2)).sum(dim=2)
        return base + self.lam * att

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, num_classes={self.head.out_channels}, T={self.T}, lam={self.lam}"


class MultiHeadCSRA(nn.Module):
    """Multi-head CSRA: a sum of CSRA heads at fixed temperatures.

    Paper: Zhu & Wu, ICCV 2021 (arXiv 2108.02456).
    Source of truth: ``Kevinz-code/CSRA`` ``pipeline/csra.py``, class ``MHA`` (commit c8480d1).

    x (B, input_dim, H, W) -> logits (B, num_classes) = sum of ``CSRA(input_dim, num_classes, T, lam)`` over
    the temperatures ``TEMPERATURES[num_heads]`` (99 means max pooling); heads live in ``multi_head`` as in
    the official state dict. ``num_heads`` must be one of 1, 2, 4, 6, 8.
    """

    TEMPERATURES = {
        1: (1,),
        2: (1, 99),
        4: (1, 2, 4, 99),
        6: (1, 2, 3, 4, 5, 99),
        8: (1, 2, 3, 4, 5, 6, 7, 99),
    }

    def __init__(self, num_heads: int, lam: float, input_dim: int, num_classes: int):
        super().__init__()
        check_config(type(self).__name__, "num_heads", num_heads in self.TEMPERATURES,
                     f"one of {sorted(self.TEMPERATURES)}", num_heads)
        self.input_dim = input_dim
        self.temperatures = self.TEMPERATURES[num_heads]
        self.multi_head = nn.ModuleList(CSRA(input_dim, num_classes, t, lam) for t in self.temperatures)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(type(self).__name__, x, channels=self.input_dim)
        logits = self.multi_head[0](x)
        for head in self.multi_head[1:]:
            logits = logits + head(x)
        return logits
