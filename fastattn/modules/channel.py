"""Fast channel attention modules: pool once, gate once."""
from __future__ import annotations

import torch

from .. import reference
from ..ops.gate import channel_affine_gate, channel_scale
from ..ops.pool import channel_mean
from ..reference._checks import check_feature_map, check_same_shape, check_tensor


class SqueezeExcite(reference.SqueezeExcite):
    """`fastattn.reference.SqueezeExcite` with a fused pool and gate (+ residual add).

    Two passes over x: the channel mean, then ``x * g (+ residual)`` in one pass.
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        check_feature_map("SqueezeExcite", x, channels=self.channels)
        if residual is not None:
            check_tensor("SqueezeExcite", "residual", residual, dim=4, shape_hint="(B, C, H, W)")
            check_same_shape("SqueezeExcite", "residual", residual, "x", x)
        s = channel_mean(x)[:, :, None, None]
        g = self.gate(self.fc2(self.act(self.fc1(s)))).flatten(1)
        return channel_scale(x, g, residual, backend=self.backend)


class ECA(reference.ECA):
    """`fastattn.reference.ECA` with a fused pool and gate."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("ECA", x, channels=self.channels)
        y = self.conv(channel_mean(x).unsqueeze(1)).squeeze(1)
        return channel_scale(x, torch.sigmoid(y), backend=self.backend)


class NAM(reference.NAM):
    """`fastattn.reference.NAM` as one gate pass: the BatchNorm and the channel weights fold into
    a per-channel affine map inside the sigmoid, ``x * sigmoid(alpha_c x + beta_c)``.

    Train mode reads x once more for the batch statistics (torch.var_mean) and updates the
    running statistics as nn.BatchNorm2d does.
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("NAM", x, channels=self.channels)
        bn = self.bn2
        gamma = bn.weight.detach().abs()
        w = gamma / gamma.sum()
        mean, var = _batch_norm_stats(bn, x)
        scale = bn.weight * torch.rsqrt(var + bn.eps)
        alpha = (w * scale).expand(x.shape[0], -1)
        beta = (w * (bn.bias - mean * scale)).expand(x.shape[0], -1)
        return channel_affine_gate(x, alpha, beta, backend=self.backend)


def _batch_norm_stats(bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) that bn would normalise x with, updating its running statistics in train mode
    exactly as nn.BatchNorm2d does (momentum, or a cumulative average when momentum is None)."""
    use_batch = bn.training or bn.running_mean is None
    if not use_batch:
        return bn.running_mean, bn.running_var
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), unbiased=False)
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            n = x.numel() // x.shape[1]
            bn.running_mean.mul_(1 - m).add_(mean.detach().to(bn.running_mean.dtype), alpha=m)
            unbiased = var.detach() * (n / max(n - 1, 1))
            bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
    return mean, var
