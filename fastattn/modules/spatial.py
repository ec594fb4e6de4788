"""Fast spatial attention modules."""
from __future__ import annotations

import torch

from .. import reference
from ..ops.group import sge_gate
from ..reference._checks import check_feature_map


class SpatialGroupEnhance(reference.SpatialGroupEnhance):
    """`fastattn.reference.SpatialGroupEnhance` as one fused op (group statistics and gate);
    backward recomputes from x and small per-group statistics."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SpatialGroupEnhance", x)
        b, c, h, w = x.shape
        if c % self.groups:
            raise ValueError(
                f"SpatialGroupEnhance: argument 'x' must have channels divisible by groups={self.groups}, got {c}"
            )
        if h * w < 2:
            raise ValueError(
                "SpatialGroupEnhance: argument 'x' must have at least 2 spatial positions "
                f"(H*W >= 2, for the unbiased std), got H={h}, W={w}"
            )
        return sge_gate(x, self.weight, self.bias, self.groups, 1e-5, backend=self.backend)
