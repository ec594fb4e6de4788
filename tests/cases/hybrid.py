"""Cases for fastattn.reference.hybrid: SCSE, BAM, ShuffleAttention, TripletAttention, CBAM,
SelfCalibratedConv, CoordinateAttention, SimAM."""
from __future__ import annotations

import re

from . import BadInput, Case
from .spatial import _feature_map_bad, _x


def _ctor(cls: str, arg: str, kwargs: dict, given, what: str = "") -> BadInput:
    """A constructor argument the module cannot take; the message ends with repr(given)."""
    match = rf"{cls}: argument '{arg}' must be .*got {re.escape(repr(given))}$"
    return BadInput(what or f"ctor_{arg}", ValueError, match, kwargs=kwargs)


CASES = [
    # --- 3. in parallel ---------------------------------------------------------------
    Case(
        "SCSE", dict(channels=12, reduction=2, combine="max"), [(2, 12, 5, 7)],
        gradcheck_shapes=[(1, 12, 3, 4)],
        bad=[
            *_feature_map_bad("SCSE", (2, 12, 5, 7), 12),
            _ctor("SCSE", "combine", dict(channels=12, combine="mul"), "mul"),
            _ctor("SCSE", "reduction", dict(channels=12, reduction=16), 16),
        ],
    ),
    Case("SCSE", dict(channels=12, reduction=3, combine="add"), [(2, 12, 5, 7)], id="SCSE@add",
         gradcheck_shapes=[(1, 12, 3, 4)]),
    Case(
        "BAM", dict(channels=16, reduction=4), [(2, 16, 5, 7)],
        gradcheck_shapes=[(1, 16, 3, 4)],
        bad=[
            *_feature_map_bad("BAM", (2, 16, 5, 7), 16),
            _ctor("BAM", "combine", dict(channels=24, reduction=4, combine="max"), "max"),
            _ctor("BAM", "reduction", dict(channels=8, reduction=16), 16),
            _ctor("BAM", "dilation", dict(channels=24, reduction=4, dilation=0), 0),
            _ctor("BAM", "num_dilated", dict(channels=24, reduction=4, num_dilated=-1), -1),
        ],
    ),
    Case("BAM", dict(channels=8, reduction=4, dilation=2, num_dilated=1, combine="sum"), [(2, 8, 6, 5)],
         id="BAM@sum", gradcheck_shapes=[(1, 8, 3, 4)]),
    Case(
        "ShuffleAttention", dict(channels=24, groups=3), [(2, 24, 5, 7)],
        gradcheck_shapes=[(1, 24, 3, 4)],
        bad=[
            *_feature_map_bad("ShuffleAttention", (2, 24, 5, 7), 24),
            BadInput("channels_not_divisible", ValueError,
                     r"ShuffleAttention: argument 'channels' must be a positive int divisible by 2\*groups=6, got 21",
                     kwargs=dict(channels=21, groups=3)),
            _ctor("ShuffleAttention", "groups", dict(channels=24, groups=0), 0),
        ],
    ),
    Case(
        "TripletAttention", dict(kernel_size=7), [(2, 12, 5, 7)],
        gradcheck_shapes=[(1, 6, 3, 4)],
        bad=[
            *_feature_map_bad("TripletAttention", (2, 12, 5, 7), None),
            _ctor("TripletAttention", "kernel_size", dict(kernel_size=4), 4),
        ],
    ),
    Case("TripletAttention", dict(kernel_size=3, no_spatial=True), [(2, 12, 5, 7)], id="TripletAttention@no_spatial",
         gradcheck_shapes=[(1, 6, 3, 4)]),
    # --- 4. in series -----------------------------------------------------------------
    Case(
        "CBAM", dict(channels=24, reduction=4), [(2, 24, 5, 7)],
        gradcheck_shapes=[(1, 24, 3, 4)],
        bad=[
            *_feature_map_bad("CBAM", (2, 24, 5, 7), 24),
            _ctor("CBAM", "pool_types", dict(channels=24, reduction=4, pool_types=("avg", "median")),
                  ("avg", "median")),
            _ctor("CBAM", "pool_types", dict(channels=24, reduction=4, pool_types=()), (),
                  what="ctor_pool_types_empty"),
            _ctor("CBAM", "kernel_size", dict(channels=24, reduction=4, kernel_size=6), 6),
            _ctor("CBAM", "reduction", dict(channels=8, reduction=16), 16),
        ],
    ),
    Case("CBAM", dict(channels=24, reduction=4, no_spatial=True), [(2, 24, 5, 7)], id="CBAM@no_spatial",
         gradcheck_shapes=[(1, 24, 3, 4)]),
    Case("CBAM", dict(channels=12, reduction=3, pool_types=["avg", "max", "lp", "lse"], kernel_size=3),
         [(2, 12, 6, 5)], id="CBAM@all_pools", gradcheck_shapes=[(1, 12, 3, 4)]),
    # --- 5. fused ---------------------------------------------------------------------
    Case(
        "SelfCalibratedConv", dict(channels=6, stride=1, pooling_r=4), [(2, 6, 10, 9)],
        gradcheck_shapes=[(1, 6, 5, 4)],
        bad=[
            *_feature_map_bad("SelfCalibratedConv", (2, 6, 10, 9), 6),
            BadInput("smaller_than_pool", ValueError,
                     r"SelfCalibratedConv: argument 'x' must have H and W >= pooling_r=4, got H=3, W=9",
                     _x(2, 6, 3, 9)),
            _ctor("SelfCalibratedConv", "stride", dict(channels=6, stride=0), 0),
            _ctor("SelfCalibratedConv", "pooling_r", dict(channels=6, pooling_r=0), 0),
        ],
    ),
    Case("SelfCalibratedConv", dict(channels=4, stride=2, pooling_r=2), [(2, 4, 9, 7)],
         id="SelfCalibratedConv@stride2", gradcheck_shapes=[(1, 4, 5, 4)]),
    Case(
        "CoordinateAttention", dict(channels=20, reduction=2), [(2, 20, 5, 7)],  # mip = 10
        gradcheck_shapes=[(1, 20, 3, 4)],
        bad=[
            *_feature_map_bad("CoordinateAttention", (2, 20, 5, 7), 20),
            _ctor("CoordinateAttention", "out_channels", dict(channels=20, out_channels=16), 16),
            _ctor("CoordinateAttention", "reduction", dict(channels=20, reduction=0), 0),
        ],
    ),
    Case("CoordinateAttention", dict(channels=12, out_channels=12), [(2, 12, 6, 5)], id="CoordinateAttention@mip8",
         gradcheck_shapes=[(1, 12, 3, 4)]),
    Case(
        "SimAM", dict(), [(2, 12, 5, 7)],
        gradcheck_shapes=[(1, 3, 3, 4)],
        bad=[
            *_feature_map_bad("SimAM", (2, 12, 5, 7), None),
            BadInput("spatial_1x1", ValueError,
                     r"SimAM: argument 'x' must have at least 2 spatial positions.*H=1, W=1", _x(2, 12, 1, 1)),
            _ctor("SimAM", "e_lambda", dict(e_lambda=-1.0), -1.0),
        ],
    ),
    Case("SimAM", dict(e_lambda=0.1), [(2, 12, 5, 5)], id="SimAM@lambda0.1", gradcheck_shapes=[(1, 3, 3, 4)]),
]
