"""Drop-in fast modules: `fastattn.<Class>` subclasses `fastattn.reference.<Class>` (same
constructor, parameters, buffers and state dict) and runs its memory-bound core through the
fused ops of `fastattn.ops`. The small MLPs and convolutions on pooled tensors stay in PyTorch.

Each module has a `backend` attribute (None: the process default, see `fastattn.set_backend`).
"""
from .channel import (
    ECA, NAM, SRM, GatherExcite, MultiSpectralAttention, SpatialPyramidAttention, SqueezeExcite, TiledSqueezeExcite,
)
from .spatial import SpatialGroupEnhance
from .hybrid import BAM, CBAM, SCSE, CoordinateAttention, ShuffleAttention, SimAM, TripletAttention

FAST_MODULES = [
    # channel attention
    "SqueezeExcite", "GatherExcite", "SRM", "ECA", "SpatialPyramidAttention", "MultiSpectralAttention",
    "TiledSqueezeExcite", "NAM",
    # spatial
    "SpatialGroupEnhance",
    # channel and spatial
    "SCSE", "BAM", "ShuffleAttention", "TripletAttention", "CBAM", "CoordinateAttention", "SimAM",
]

__all__ = [*FAST_MODULES, "FAST_MODULES"]
