"""Cases for the channel attention family (fastattn/reference/channel.py)."""
from __future__ import annotations

import torch

from . import BadInput, Case

B, H, W = 2, 5, 7          # odd, non-square spatial size; batch 2 so train-mode BN works
GC = (1, 3, 4)             # batch and spatial size for float64 gradcheck


def _x(c, b=B, h=H, w=W, dtype=torch.float32):
    return torch.randn(b, c, h, w, dtype=dtype)


def _common_bad(cls: str, c: int, name: str = "x", extra=()) -> list[BadInput]:
    """Wrong rank, wrong channel count, integer dtype, for a module whose first argument is
    a (B, c, H, W) feature map; `extra` are further positional arguments of the call."""
    return [
        BadInput("rank3", ValueError, rf"{cls}: argument '{name}' must be 4-D.*got 3-D",
                 inputs=lambda: [torch.randn(B, c, H), *extra]),
        BadInput("channels", ValueError, rf"{cls}: argument '{name}' must have {c} channels.*got {c + 1}",
                 inputs=lambda: [_x(c + 1), *extra]),
        BadInput("int_dtype", TypeError, rf"{cls}: argument '{name}' must be a floating-point tensor.*int64",
                 inputs=lambda: [torch.ones(B, c, H, W, dtype=torch.int64), *extra]),
        BadInput("not_tensor", TypeError, rf"{cls}: argument '{name}' must be a torch.Tensor",
                 inputs=lambda: [[1.0, 2.0], *extra]),
    ]


def _bad_reduction(cls: str, kwargs: dict, channels_key: str = "channels") -> BadInput:
    """A reduction larger than the channel count leaves an empty bottleneck."""
    return BadInput("reduction_too_large", ValueError, rf"{cls}: argument 'reduction' must be at most",
                    kwargs={**kwargs, "reduction": kwargs[channels_key] + 1})


# ---------------------------------------------------------------------------------------------

_SE = dict(channels=12, reduction=4)
_CSE = dict(channels=12, reduction=4)
_GE = dict(channels=12, reduction=4)
_SK = dict(channels=12, branches=2, groups=4, reduction=4, min_dim=4)
_MSA = dict(channels=16, dct_h=7, dct_w=7, reduction=4, freq_sel_method="top16")
_PSA = dict(inplanes=4, planes=32, conv_kernels=(3, 5), conv_groups=(1, 2))

CASES: list[Case] = [
    # 1. SqueezeExcite
    Case("SqueezeExcite", _SE, [(B, 12, H, W)], gradcheck_shapes=[(1, 12, 3, 4)],
         bad=[*_common_bad("SqueezeExcite", 12), _bad_reduction("SqueezeExcite", _SE),
              BadInput("channels_not_int", ValueError, r"SqueezeExcite: argument 'channels' must be a positive integer",
                       kwargs=dict(channels=0))]),
    Case("SqueezeExcite", dict(channels=12, reduction=4, bias=False), [(B, 12, H, W), (B, 12, H, W)],
         id="SqueezeExcite@residual_nobias", gradcheck_shapes=[(1, 12, 3, 4), (1, 12, 3, 4)],
         bad=[BadInput("residual_shape", ValueError,
                       r"SqueezeExcite: argument 'residual' must have the shape of 'x'.*got \(2, 12, 5, 6\)",
                       inputs=lambda: [_x(12), _x(12, w=6)]),
              BadInput("residual_int", TypeError, r"SqueezeExcite: argument 'residual' must be a floating-point",
                       inputs=lambda: [_x(12), torch.ones(B, 12, H, W, dtype=torch.int32)])]),
    # 2. CompetitiveSE
    Case("CompetitiveSE", _CSE, [(B, 12, H, W), (B, 12, H, W)], id="CompetitiveSE@double_fc",
         gradcheck_shapes=[(1, 12, 3, 4), (1, 12, 3, 4)],
         bad=[*_common_bad("CompetitiveSE", 12, name="residual_branch", extra=[_x(12)]),
              BadInput("identity_shape", ValueError,
                       r"CompetitiveSE: argument 'identity' must have the shape of 'residual_branch'",
                       inputs=lambda: [_x(12), _x(12, h=4)]),
              BadInput("identity_rank", ValueError, r"CompetitiveSE: argument 'identity' must be 4-D",
                       inputs=lambda: [_x(12), torch.randn(B, 12)]),
              BadInput("mode", ValueError, r"CompetitiveSE: argument 'mode' must be one of",
                       kwargs={**_CSE, "mode": "conv3x3"}),
              _bad_reduction("CompetitiveSE", _CSE)]),
    Case("CompetitiveSE", dict(channels=40, reduction=4, mode="pair_view"), [(B, 40, H, W), (B, 40, H, W)],
         id="CompetitiveSE@pair_view", gradcheck_shapes=[(1, 40, 3, 4), (1, 40, 3, 4)]),
    Case("CompetitiveSE", dict(channels=12, reduction=4, mode="pair_view_1x1"), [(B, 12, H, W), (B, 12, H, W)],
         id="CompetitiveSE@pair_view_1x1", gradcheck_shapes=[(1, 12, 3, 4), (1, 12, 3, 4)]),
    # 3. GatherExcite
    Case("GatherExcite", _GE, [(B, 12, H, W)], id="GatherExcite@global", gradcheck_shapes=[(1, 12, 3, 4)],
         bad=[*_common_bad("GatherExcite", 12), _bad_reduction("GatherExcite", _GE),
              BadInput("feat_size_missing", ValueError, r"GatherExcite: argument 'feat_size' must be",
                       kwargs=dict(channels=12, extent=0, extra_params=True)),
              BadInput("extent_not_pow2", ValueError, r"GatherExcite: argument 'extent' must be a power of two",
                       kwargs=dict(channels=12, extent=3, extra_params=True)),
              BadInput("extent_negative", ValueError, r"GatherExcite: argument 'extent' must be a non-negative",
                       kwargs=dict(channels=12, extent=-1))]),
    Case("GatherExcite", dict(channels=12, extent=0, use_mlp=False), [(B, 12, H, W)],
         id="GatherExcite@global_nomlp", gradcheck_shapes=[(1, 12, 3, 4)]),
    Case("GatherExcite", dict(channels=12, extent=2, reduction=4), [(B, 12, H, W)], id="GatherExcite@e2",
         gradcheck_shapes=[(1, 12, 3, 4)]),
    Case("GatherExcite", dict(channels=12, extent=4, extra_params=True, reduction=4), [(B, 12, H, W)],
         id="GatherExcite@e4_params", gradcheck_shapes=[(1, 12, 3, 4)]),
    Case("GatherExcite", dict(channels=12, extent=2, extra_params=True, use_mlp=False), [(B, 12, H, W)],
         id="GatherExcite@e2_params_nomlp", gradcheck_shapes=[(1, 12, 3, 4)]),
    Case("GatherExcite", dict(channels=12, extent=0, extra_params=True, reduction=4, feat_size=(3, 4)),
         [(B, 12, 3, 4)], id="GatherExcite@global_params", gradcheck_shapes=[(1, 12, 3, 4)],
         bad=[BadInput("feat_size_mismatch", ValueError,
                       r"GatherExcite: argument 'x' must have spatial size feat_size=\(3, 4\).*got \(5, 7\)",
                       inputs=lambda: [_x(12)])]),
    # 4. GSoP
    Case("GSoP", dict(channels=12, att_dim=4, reduce_stride=2), [(B, 12, H, W)], id="GSoP@stride2",
         gradcheck_shapes=[(1, 12, 3, 4)],
         bad=[*_common_bad("GSoP", 12),
              BadInput("att_dim", ValueError, r"GSoP: argument 'att_dim' must be a positive integer",
                       kwargs=dict(channels=12, att_dim=0))]),
    Case("GSoP", dict(channels=20, att_dim=3, reduce_stride=1), [(B, 20, H, W)], id="GSoP@stride1",
         gradcheck_shapes=[(1, 20, 3, 4)]),
    # 5. SRM
    Case("SRM", dict(channels=12), [(B, 12, H, W)], gradcheck_shapes=[(1, 12, 3, 4)],
         bad=[*_common_bad("SRM", 12),
              BadInput("one_position", ValueError, r"SRM: argument 'x' must have at least 2 spatial positions.*1 x 1",
                       inputs=lambda: [_x(12, h=1, w=1)])]),
    # 6. SelectiveKernel
    Case("SelectiveKernel", _SK, [(B, 12, H, W)], gradcheck_shapes=[(1, 12, 3, 4)],
         bad=[*_common_bad("SelectiveKernel", 12),
              BadInput("groups", ValueError, r"SelectiveKernel: argument 'channels' must be divisible by groups=32",
                       kwargs=dict(channels=48))]),
    Case("SelectiveKernel", dict(channels=8, branches=3, groups=2, reduction=2, min_dim=2, stride=2),
         [(B, 8, H, W)], id="SelectiveKernel@3branches_stride2", gradcheck_shapes=[(1, 8, 3, 4)]),
    # 7. DIACell
    Case("DIACell", dict(channels=12, reduction=4), [(B, 12, H, W)], id="DIACell@first",
         gradcheck_shapes=[(1, 12, 3, 4)],
         bad=[*_common_bad("DIACell", 12),
              BadInput("state_shape", ValueError, r"DIACell: argument 'state\[1\]' must have shape \(B, C\)",
                       inputs=lambda: [_x(12), (torch.randn(B, 12), torch.randn(B, 11))]),
              BadInput("state_rank", ValueError, r"DIACell: argument 'state\[0\]' must be 2-D",
                       inputs=lambda: [_x(12), (torch.randn(1, B, 12), torch.randn(B, 12))]),
              BadInput("state_type", TypeError, r"DIACell: argument 'state' must be None or a pair",
                       inputs=lambda: [_x(12), torch.randn(B, 12)]),
              _bad_reduction("DIACell", dict(channels=12, reduction=4))]),
    Case("DIACell", dict(channels=12, reduction=4), [(B, 12, H, W), (B, 12), (B, 12)], id="DIACell@state",
         make_inputs=lambda xs: [xs[0], (xs[1], xs[2])], gradcheck_shapes=[(1, 12, 3, 4), (1, 12), (1, 12)]),
    # 8. ECA
    Case("ECA", dict(channels=12, k_size=3), [(B, 12, H, W)], gradcheck_shapes=[(1, 12, 3, 4)],
         bad=[*_common_bad("ECA", 12),
              BadInput("adaptive_no_channels", ValueError,
                       r"ECA: argument 'channels' must be a positive integer when adaptive",
                       kwargs=dict(adaptive=True)),
              BadInput("even_k", ValueError, r"ECA: argument 'k_size' must be a positive odd integer, got 4",
                       kwargs=dict(channels=12, k_size=4))]),
    Case("ECA", dict(k_size=5), [(B, 10, H, W)], id="ECA@no_channels_k5", gradcheck_shapes=[(1, 10, 3, 4)]),
    Case("ECA", dict(channels=256, adaptive=True), [(B, 256, 3, 2)], id="ECA@adaptive",
         gradcheck_shapes=[(1, 256, 1, 2)]),
    # 9. SpatialPyramidAttention
    Case("SpatialPyramidAttention", dict(channels=12, reduction=4), [(B, 12, H, W)],
         gradcheck_shapes=[(1, 12, 3, 4)],
         bad=[*_common_bad("SpatialPyramidAttention", 12),
              _bad_reduction("SpatialPyramidAttention", dict(channels=12, reduction=4))]),
    # 10. MultiSpectralAttention
    Case("MultiSpectralAttention", _MSA, [(B, 16, 7, 7)], id="MultiSpectralAttention@7x7",
         gradcheck_shapes=[(1, 16, 7, 7)],
         bad=[*_common_bad("MultiSpectralAttention", 16),
              BadInput("channels_not_divisible", ValueError,
                       r"MultiSpectralAttention: argument 'channels' must be divisible by the number of "
                       r"frequencies \(16",
                       kwargs={**_MSA, "channels": 24}),
              BadInput("freq_method", ValueError, r"MultiSpectralAttention: argument 'freq_sel_method' must be one of",
                       kwargs={**_MSA, "freq_sel_method": "top3"}),
              BadInput("dct_small", ValueError, r"MultiSpectralAttention: argument 'dct_w' must be an integer >= 7",
                       kwargs={**_MSA, "dct_w": 4}),
              _bad_reduction("MultiSpectralAttention", _MSA)]),
    Case("MultiSpectralAttention", dict(channels=8, dct_h=14, dct_w=7, reduction=4, freq_sel_method="low4"),
         [(B, 8, H, W)], id="MultiSpectralAttention@pool_low4", gradcheck_shapes=[(1, 8, 3, 4)]),
    Case("MultiSpectralAttention", dict(channels=12, dct_h=7, dct_w=7, reduction=4, freq_sel_method="bot2"),
         [(B, 12, 9, 10)], id="MultiSpectralAttention@bot2_pool", gradcheck_shapes=[(1, 12, 3, 4)]),
    # 11. PyramidSplitAttention
    Case("PyramidSplitAttention", _PSA, [(B, 4, H, W)], id="PyramidSplitAttention@2branches",
         gradcheck_shapes=[(1, 4, 3, 4)],
         bad=[*_common_bad("PyramidSplitAttention", 4),
              BadInput("planes_small", ValueError, r"PyramidSplitAttention: argument 'planes' must be at least 16",
                       kwargs=dict(inplanes=16, planes=32)),
              BadInput("planes_split", ValueError, r"PyramidSplitAttention: argument 'planes' must be divisible",
                       kwargs=dict(inplanes=16, planes=66)),
              BadInput("groups", ValueError, r"PyramidSplitAttention: argument 'conv_groups' must be groups dividing",
                       kwargs=dict(inplanes=8, planes=64)),
              BadInput("groups_len", ValueError, r"PyramidSplitAttention: argument 'conv_groups' must be a sequence",
                       kwargs=dict(inplanes=16, planes=64, conv_groups=(1, 4)))]),
    Case("PyramidSplitAttention", dict(inplanes=4, planes=32, conv_kernels=(3, 5), conv_groups=(2, 4), stride=2),
         [(B, 4, H, W)], id="PyramidSplitAttention@stride2", gradcheck_shapes=[(1, 4, 3, 4)]),
    # 12. TiledSqueezeExcite
    Case("TiledSqueezeExcite", dict(channels=12, reduction=4, pool_kernel=3), [(B, 12, H, W)],
         id="TiledSqueezeExcite@k3", gradcheck_shapes=[(1, 12, 4, 5)],
         bad=[*_common_bad("TiledSqueezeExcite", 12),
              BadInput("pool_kernel", ValueError,
                       r"TiledSqueezeExcite: argument 'pool_kernel' must be a positive integer",
                       kwargs=dict(channels=12, reduction=4, pool_kernel=0)),
              _bad_reduction("TiledSqueezeExcite", dict(channels=12, reduction=4))]),
    Case("TiledSqueezeExcite", dict(channels=12, reduction=4), [(B, 12, 9, 15)], id="TiledSqueezeExcite@k7",
         gradcheck_shapes=[(1, 12, 3, 4)]),
    # H and W multiples of the tile: the fast module's row-broadcast path
    Case("TiledSqueezeExcite", dict(channels=12, reduction=4, pool_kernel=3), [(B, 12, 6, 9)],
         id="TiledSqueezeExcite@k3_whole_tiles", gradcheck_shapes=[(1, 12, 3, 6)]),
    # one (cropped) tile: the fast module's channel_scale path
    Case("TiledSqueezeExcite", dict(channels=12, reduction=4, pool_kernel=7), [(B, 12, 7, 5)],
         id="TiledSqueezeExcite@one_tile", gradcheck_shapes=[(1, 12, 3, 2)]),
    # 13. NAM
    Case("NAM", dict(channels=12), [(B, 12, H, W)], gradcheck_shapes=[(1, 12, 3, 4)],
         skip_gradcheck="NAM's channel weights use bn2.weight without gradient (the official .data), so a "
                        "numerical gradient w.r.t. bn2.weight differs from autograd by design; "
                        "test_reference_channel.py gradchecks NAM w.r.t. the input and bn2.bias",
         bad=[*_common_bad("NAM", 12)]),
]
