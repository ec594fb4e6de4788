"""Cases for fastattn.reference.spatial: ResidualAttention, SpatialGroupEnhance, ULSAM."""
from __future__ import annotations

import torch

from . import BadInput, Case


def _x(*shape, dtype=torch.float32):
    return lambda: [torch.randn(*shape).to(dtype)]


def _feature_map_bad(cls: str, shape: tuple, channels: int | None) -> list[BadInput]:
    """Wrong rank, non-tensor, integer dtype and (when the module fixes it) wrong channel count."""
    b, c, h, w = shape
    bad = [
        BadInput("rank3", ValueError, rf"{cls}: argument 'x' must be 4-D.*got 3-D", _x(c, h, w)),
        BadInput("rank5", ValueError, rf"{cls}: argument 'x' must be 4-D.*got 5-D", _x(b, c, h, w, 2)),
        BadInput("not_tensor", TypeError, rf"{cls}: argument 'x' must be a torch.Tensor, got list",
                 lambda: [[[1.0]]]),
        BadInput("int_dtype", TypeError, rf"{cls}: argument 'x' must be a floating-point tensor.*got torch.int64",
                 lambda: [torch.ones(b, c, h, w, dtype=torch.int64)]),
    ]
    if channels is not None:
        bad.append(BadInput("channels", ValueError, rf"{cls}: argument 'x' must have {channels} channels.*got {c + 1}",
                            _x(b, c + 1, h, w)))
    return bad


CASES = [
    Case(
        "ResidualAttention", dict(channels=8, depth=2), [(2, 8, 9, 7)],
        gradcheck_shapes=[(1, 8, 5, 4)],
        bad=[
            *_feature_map_bad("ResidualAttention", (2, 8, 9, 7), 8),
            BadInput("channels_small", ValueError, r"ResidualAttention: argument 'channels' must be an int >= 4.*got 3",
                     kwargs=dict(channels=3)),
            BadInput("depth0", ValueError, r"ResidualAttention: argument 'depth' must be an int >= 1.*got 0",
                     kwargs=dict(channels=8, depth=0)),
        ],
    ),
    Case("ResidualAttention", dict(channels=4, depth=1), [(2, 4, 5, 6)], id="ResidualAttention@depth1",
         gradcheck_shapes=[(1, 4, 4, 3)]),
    # depth 3 on a map that pools down to 1x1 at the deepest level.
    Case("ResidualAttention", dict(channels=4, depth=3), [(2, 4, 7, 5)], id="ResidualAttention@depth3",
         gradcheck_shapes=[(1, 4, 4, 4)]),
    Case(
        "SpatialGroupEnhance", dict(groups=4), [(2, 12, 5, 7)],
        gradcheck_shapes=[(1, 12, 3, 4)],
        bad=[
            *_feature_map_bad("SpatialGroupEnhance", (2, 12, 5, 7), None),
            BadInput("channels_not_divisible", ValueError,
                     r"SpatialGroupEnhance: argument 'x' must have channels divisible by groups=4, got 10",
                     _x(2, 10, 5, 7)),
            BadInput("spatial_1x1", ValueError,
                     r"SpatialGroupEnhance: argument 'x' must have at least 2 spatial positions.*H=1, W=1",
                     _x(2, 12, 1, 1)),
            BadInput("groups0", ValueError, r"SpatialGroupEnhance: argument 'groups' must be a positive int, got 0",
                     kwargs=dict(groups=0)),
        ],
    ),
    Case(
        "ULSAM", dict(channels=12, num_splits=3), [(2, 12, 5, 7)],
        gradcheck_shapes=[(1, 12, 3, 4)],
        bad=[
            *_feature_map_bad("ULSAM", (2, 12, 5, 7), 12),
            BadInput("channels_not_divisible", ValueError,
                     r"ULSAM: argument 'channels' must be a positive int divisible by num_splits=4, got 10",
                     kwargs=dict(channels=10, num_splits=4)),
            BadInput("num_splits0", ValueError, r"ULSAM: argument 'num_splits' must be a positive int, got 0",
                     kwargs=dict(channels=12, num_splits=0)),
        ],
    ),
]
