"""torch.library custom ops of fastattn (`torch.ops.fastattn.*`): the functional API.

Each op has a schema, a fake implementation (for torch.compile / export), an autograd formula
and per-backend implementations chosen by `fastattn.ops._dispatch` (backend= argument or
`fastattn.set_backend`).
"""
from .bins import bin_mean
from .branch import branch_softmax_scale, branch_softmax_sum
from .coord import coord_pool, coord_scale
from .gate import channel_affine_gate, channel_scale, channel_spatial_gate
from .group import sge_gate
from .pool import channel_mean, channel_pool, dct_pool
from .simam import simam
from .spatial import spatial_pool, spatial_scale, zpool

__all__ = [
    "channel_mean", "channel_pool", "dct_pool", "bin_mean",
    "channel_scale", "channel_spatial_gate", "channel_affine_gate",
    "spatial_pool", "spatial_scale", "zpool",
    "coord_pool", "coord_scale", "simam",
    "sge_gate", "branch_softmax_sum", "branch_softmax_scale",
]
