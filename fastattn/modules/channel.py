"""Fast channel attention modules: pool once, gate once."""
from __future__ import annotations

import torch

from .. import reference
from ..ops.gate import channel_scale
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
