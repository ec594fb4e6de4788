"""Drop-in fast modules: `fastattn.<Class>` subclasses `fastattn.reference.<Class>` (same
constructor, parameters, buffers and state dict) and runs its memory-bound core through the
fused ops of `fastattn.ops`. The small MLPs and convolutions on pooled tensors stay in PyTorch.

Each module has a `backend` attribute (None: the process default, see `fastattn.set_backend`).
"""
from .channel import ECA, NAM, GatherExcite, SpatialPyramidAttention, SqueezeExcite, TiledSqueezeExcite
from .hybrid import BAM, CBAM, SCSE, ShuffleAttention, TripletAttention

FAST_MODULES = ["SqueezeExcite", "GatherExcite", "ECA", "SpatialPyramidAttention", "TiledSqueezeExcite", "NAM", "SCSE", "BAM", "ShuffleAttention", "TripletAttention", "CBAM"]

__all__ = [*FAST_MODULES, "FAST_MODULES"]
