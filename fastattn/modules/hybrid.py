"""Fast channel-and-spatial attention modules: the combine of both gates is one pass over x."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.gate import channel_spatial_gate
from ..ops.pool import channel_mean
from ..reference._checks import check_feature_map


class SCSE(reference.SCSE):
    """`fastattn.reference.SCSE` with one fused combine: max(x * a, x * s) (or x * a + x * s).

    The channel gate reads x once (mean), the spatial gate once (1x1 conv), the combine once.
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SCSE", x, channels=self.channels)
        cse, sse = self.cSE, self.sSE
        a = torch.sigmoid(cse.fc2(F.relu(cse.fc1(channel_mean(x)))))
        s = torch.sigmoid(sse.conv(x))
        return channel_spatial_gate(x, a, s, self.combine, backend=self.backend)


class BAM(reference.BAM):
    """`fastattn.reference.BAM` with the final ``x * (1 + sigmoid(Mc * Ms))`` fused in one pass
    (the spatial branch's convolutions stay with PyTorch)."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("BAM", x, channels=self.channels)
        if self.training and x.shape[0] < 2:
            raise ValueError(
                "BAM: argument 'x' must have batch size > 1 in training mode "
                f"(the channel branch has a BatchNorm1d), got {x.shape[0]}"
            )
        mc = self.channel_att.gate_c(channel_mean(x))
        ms = self.spatial_att(x)
        mode = "bam" if self.combine == "product" else "bam_sum"
        return channel_spatial_gate(x, mc, ms, mode, backend=self.backend)
