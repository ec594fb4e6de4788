"""Cases for fastattn.reference.other: DCASqueezeExcite, WeightExcitedConv2d, AttentionalActivation, MSCAM,
AFF, IAFF, AWConv2d, BatchAwareAttention, Interflow, CSRA, MultiHeadCSRA."""
from __future__ import annotations

import re

import torch

from . import BadInput, Case
from .spatial import _feature_map_bad


def _ctor(cls: str, arg: str, kwargs: dict, given, what: str = "") -> BadInput:
    """A constructor argument the module cannot take; the message ends with repr(given)."""
    match = rf"{cls}: argument '{arg}' must be .*got {re.escape(repr(given))}$"
    return BadInput(what or f"ctor_{arg}", ValueError, match, kwargs=kwargs)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _bn_batch1(cls: str, *shapes) -> BadInput:
    """Modules whose BatchNorm sees (B, C, 1, 1) values cannot train on one sample (build() leaves train mode on)."""
    match = rf"{cls}: argument 'x' must have batch size > 1 in training mode.*got 1"
    return BadInput("batch1_train", ValueError, match, lambda: [_t(*s) for s in shapes])


# --- DCA: two calls per run, as in the golden file: m(x, None) then m(x, prev) ----------------------------------
def _dca_run(m, x, prev):
    return [*m(x, None), *m(x, prev)]


_DCA = "DCASqueezeExcite"
_DCA_BAD = [
    BadInput("rank3", ValueError, rf"{_DCA}: argument 'x' must be 4-D.*got 3-D", lambda: [_t(12, 5, 7), _t(2, 6)]),
    BadInput("int_dtype", TypeError, rf"{_DCA}: argument 'x' must be a floating-point tensor.*got torch.int64",
             lambda: [torch.ones(2, 12, 5, 7, dtype=torch.int64), _t(2, 6)]),
    BadInput("channels", ValueError, rf"{_DCA}: argument 'x' must have 12 channels.*got 13",
             lambda: [_t(2, 13, 5, 7), _t(2, 6)]),
    BadInput("prev_rank", ValueError, rf"{_DCA}: argument 'prev' must be 2-D.*got 4-D",
             lambda: [_t(2, 12, 5, 7), _t(2, 6, 1, 1)]),
    BadInput("prev_int", TypeError, rf"{_DCA}: argument 'prev' must be a floating-point tensor.*got torch.int64",
             lambda: [_t(2, 12, 5, 7), torch.ones(2, 6, dtype=torch.int64)]),
    BadInput("prev_channels", ValueError, rf"{_DCA}: argument 'prev' must have shape \(B, in_channels\).*got \(2, 12\)",
             lambda: [_t(2, 12, 5, 7), _t(2, 12)]),
    BadInput("prev_batch", ValueError, rf"{_DCA}: argument 'prev' must have shape \(B, in_channels\).*got \(3, 6\)",
             lambda: [_t(2, 12, 5, 7), _t(3, 6)]),
    _ctor(_DCA, "reduction", dict(in_channels=6, channels=12, reduction=16), 16),
]


# --- AFF / iAFF: forward(x, residual) --------------------------------------------------------------------------
def _fusion_bad(cls: str) -> list[BadInput]:
    return [
        BadInput("rank3", ValueError, rf"{cls}: argument 'x' must be 4-D.*got 3-D",
                 lambda: [_t(12, 5, 7), _t(12, 5, 7)]),
        BadInput("int_dtype", TypeError, rf"{cls}: argument 'x' must be a floating-point tensor.*got torch.int64",
                 lambda: [torch.ones(2, 12, 5, 7, dtype=torch.int64), _t(2, 12, 5, 7)]),
        BadInput("channels", ValueError, rf"{cls}: argument 'x' must have 12 channels.*got 13",
                 lambda: [_t(2, 13, 5, 7), _t(2, 13, 5, 7)]),
        BadInput("residual_int", TypeError,
                 rf"{cls}: argument 'residual' must be a floating-point tensor.*got torch.int64",
                 lambda: [_t(2, 12, 5, 7), torch.ones(2, 12, 5, 7, dtype=torch.int64)]),
        BadInput("residual_channels", ValueError, rf"{cls}: argument 'residual' must have 12 channels.*got 13",
                 lambda: [_t(2, 12, 5, 7), _t(2, 13, 5, 7)]),
        BadInput("residual_shape", ValueError,
                 rf"{cls}: argument 'residual' must have the shape of 'x' \(2, 12, 5, 7\), got \(2, 12, 5, 6\)",
                 lambda: [_t(2, 12, 5, 7), _t(2, 12, 5, 6)]),
        _bn_batch1(cls, (1, 12, 5, 7), (1, 12, 5, 7)),
        _ctor(cls, "reduction", dict(channels=12, reduction=13), 13),
    ]


# --- Interflow: forward(list of stage maps) ----------------------------------------------------------------------
_IF = "Interflow"
_IF_SHAPES = [(2, 6, 9, 7), (2, 10, 5, 4), (2, 12, 3, 2)]
_IF_BAD = [
    BadInput("not_list", ValueError, rf"{_IF}: argument 'features' must be a list of 3 feature maps.*got Tensor",
             lambda: [_t(2, 6, 9, 7)]),
    BadInput("too_few", ValueError, rf"{_IF}: argument 'features' must be a list of 3 feature maps.*got 2 items",
             lambda: [[_t(*s) for s in _IF_SHAPES[:2]]]),
    BadInput("rank3", ValueError, rf"{_IF}: argument 'features\[2\]' must be 4-D.*got 3-D",
             lambda: [[_t(*_IF_SHAPES[0]), _t(*_IF_SHAPES[1]), _t(12, 3, 2)]]),
    BadInput("channels", ValueError, rf"{_IF}: argument 'features\[1\]' must have 10 channels.*got 11",
             lambda: [[_t(*_IF_SHAPES[0]), _t(2, 11, 5, 4), _t(*_IF_SHAPES[2])]]),
    BadInput("int_dtype", TypeError, rf"{_IF}: argument 'features\[0\]' must be a floating-point tensor.*torch.int64",
             lambda: [[torch.ones(2, 6, 9, 7, dtype=torch.int64), _t(*_IF_SHAPES[1]), _t(*_IF_SHAPES[2])]]),
    BadInput("batch", ValueError, rf"{_IF}: argument 'features\[1\]' must have the batch size and dtype of.*got \(3,",
             lambda: [[_t(*_IF_SHAPES[0]), _t(3, 10, 5, 4), _t(*_IF_SHAPES[2])]]),
    _ctor(_IF, "stage_channels", dict(stage_channels=[], num_classes=5), ()),
    _ctor(_IF, "num_classes", dict(stage_channels=[4], num_classes=0), 0),
]


CASES = [
    # --- 25. DCA ------------------------------------------------------------------------------------------------
    Case(_DCA, dict(in_channels=6, channels=12, reduction=4), [(2, 12, 5, 7), (2, 6)], run=_dca_run,
         gradcheck_shapes=[(1, 12, 2, 3), (1, 6)], bad=_DCA_BAD),
    # in_channels == channels: no att_fc, prev is used as is.
    Case(_DCA, dict(in_channels=12, channels=12, reduction=4), [(2, 12, 5, 7), (2, 12)], run=_dca_run,
         id=f"{_DCA}@same", gradcheck_shapes=[(1, 12, 2, 3), (1, 12)]),
    # --- 26. weight excitation ------------------------------------------------------------------------------------
    Case(
        "WeightExcitedConv2d", dict(in_channels=6, out_channels=10, kernel_size=3, padding=1, reduction=2),
        [(2, 6, 5, 7)], gradcheck_shapes=[(1, 6, 3, 4)],
        skip_gradcheck="paper_grad=True uses the paper's MWE gradient (M_A held constant), not the forward's exact "
                       "derivative; test_weight_excitation_formulas checks it in closed form, and the "
                       "paper_grad=False cases below gradcheck the same forward",
        bad=[
            *_feature_map_bad("WeightExcitedConv2d", (2, 6, 5, 7), 6),
            _ctor("WeightExcitedConv2d", "groups", dict(in_channels=6, out_channels=10, kernel_size=3, groups=4), 4),
            _ctor("WeightExcitedConv2d", "reduction",
                  dict(in_channels=6, out_channels=10, kernel_size=3, reduction=0), 0),
            _ctor("WeightExcitedConv2d", "eps_a", dict(in_channels=6, out_channels=10, kernel_size=3, eps_a=0.0), 0.0),
        ],
    ),
    Case("WeightExcitedConv2d",
         dict(in_channels=6, out_channels=8, kernel_size=(3, 2), stride=2, padding=2, dilation=2, groups=2,
              bias=False, padding_mode="reflect", paper_grad=False),
         [(2, 6, 7, 5)], id="WeightExcitedConv2d@groups", gradcheck_shapes=[(1, 6, 4, 3)]),
    Case("WeightExcitedConv2d", dict(in_channels=5, out_channels=3, kernel_size=1, lwe=False, paper_grad=False),
         [(2, 5, 5, 7)], id="WeightExcitedConv2d@mwe_only", gradcheck_shapes=[(1, 5, 3, 4)]),
    # --- 27. attentional activation --------------------------------------------------------------------------------
    Case(
        "AttentionalActivation", dict(channels=12, reduction=4), [(2, 12, 5, 7)], gradcheck_shapes=[(1, 12, 2, 3)],
        bad=[
            *_feature_map_bad("AttentionalActivation", (2, 12, 5, 7), 12),
            _ctor("AttentionalActivation", "reduction", dict(channels=12, reduction=0), 0),
        ],
    ),
    Case(
        "AttentionalActivation", dict(channels=12, reduction=3, use_global=True, use_relu=False), [(2, 12, 5, 7)],
        id="AttentionalActivation@global_norelu", gradcheck_shapes=[(1, 12, 2, 3)],
        bad=[_bn_batch1("AttentionalActivation", (1, 12, 5, 7))],
    ),
    # --- 28. MS-CAM, AFF, iAFF -----------------------------------------------------------------------------------
    Case(
        "MSCAM", dict(channels=12, reduction=4), [(2, 12, 5, 7)], gradcheck_shapes=[(1, 12, 2, 3)],
        bad=[
            *_feature_map_bad("MSCAM", (2, 12, 5, 7), 12),
            _bn_batch1("MSCAM", (1, 12, 5, 7)),
            _ctor("MSCAM", "reduction", dict(channels=12, reduction=13), 13),
        ],
    ),
    Case("AFF", dict(channels=12, reduction=3), [(2, 12, 5, 7), (2, 12, 5, 7)],
         gradcheck_shapes=[(1, 12, 2, 3), (1, 12, 2, 3)], bad=_fusion_bad("AFF")),
    Case("IAFF", dict(channels=12, reduction=4), [(2, 12, 5, 7), (2, 12, 5, 7)],
         gradcheck_shapes=[(1, 12, 2, 3), (1, 12, 2, 3)], unused_params=("global_att2",), bad=_fusion_bad("IAFF")),
    Case("IAFF", dict(channels=12, reduction=4, official_bug=False), [(2, 12, 5, 7), (2, 12, 5, 7)],
         id="IAFF@fixed", gradcheck_shapes=[(1, 12, 2, 3), (1, 12, 2, 3)]),
    # --- 29. AW-convolution ----------------------------------------------------------------------------------------
    Case(
        "AWConv2d", dict(in_channels=6, out_channels=8, kernel_size=3, padding=1, reduction=2, num_maps=2),
        [(2, 6, 5, 7)], gradcheck_shapes=[(1, 6, 3, 3)],
        bad=[
            *_feature_map_bad("AWConv2d", (2, 6, 5, 7), 6),
            _ctor("AWConv2d", "num_maps", dict(in_channels=6, out_channels=8, kernel_size=3, num_maps=3), 3),
            _ctor("AWConv2d", "groups", dict(in_channels=6, out_channels=8, kernel_size=3, groups=4), 4),
            _ctor("AWConv2d", "reduction", dict(in_channels=6, out_channels=8, kernel_size=3, reduction=0), 0),
        ],
    ),
    Case("AWConv2d",
         dict(in_channels=6, out_channels=8, kernel_size=(3, 2), stride=2, padding=1, groups=2, num_maps=4,
              bias=False, padding_mode="circular"),
         [(2, 6, 7, 5)], id="AWConv2d@groups", gradcheck_shapes=[(1, 6, 4, 3)]),
    # Defaults: one attention map per output filter (num_maps = out_channels); the non-residual form.
    Case("AWConv2d", dict(in_channels=5, out_channels=6, kernel_size=3, padding=1, reduction=2, residual=False),
         [(2, 5, 5, 7)], id="AWConv2d@per_filter_noresidual", gradcheck_shapes=[(1, 5, 3, 3)]),
    # --- 30. BA^2M -------------------------------------------------------------------------------------------------
    Case(
        "BatchAwareAttention", dict(channels=12, reduction=4, dilation=2), [(3, 12, 5, 7)],
        gradcheck_shapes=[(3, 12, 2, 3)], keeps_format=False,
        bad=[
            *_feature_map_bad("BatchAwareAttention", (3, 12, 5, 7), 12),
            _ctor("BatchAwareAttention", "dilation", dict(channels=12, dilation=0), 0),
            _ctor("BatchAwareAttention", "reduction", dict(channels=12, reduction=0), 0),
            _bn_batch1("BatchAwareAttention", (1, 12, 5, 7)),
        ],
    ),
    Case("BatchAwareAttention", dict(channels=5, reduction=16, scale_by_batch=True), [(2, 5, 4, 3)],
         id="BatchAwareAttention@scaled", gradcheck_shapes=[(2, 5, 2, 3)], keeps_format=False),
    # --- 31. Interflow ---------------------------------------------------------------------------------------------
    Case(_IF, dict(stage_channels=[6, 10, 12], num_classes=5), _IF_SHAPES, make_inputs=lambda xs: [list(xs)],
         gradcheck_shapes=[(1, 6, 3, 3), (1, 10, 2, 2), (1, 12, 1, 2)], keeps_format=False, bad=_IF_BAD),
    # --- 32. CSRA --------------------------------------------------------------------------------------------------
    Case(
        "CSRA", dict(input_dim=12, num_classes=5, T=2, lam=0.3), [(2, 12, 5, 7)],
        gradcheck_shapes=[(1, 12, 2, 3)], keeps_format=False,
        bad=[
            *_feature_map_bad("CSRA", (2, 12, 5, 7), 12),
            _ctor("CSRA", "num_classes", dict(input_dim=12, num_classes=0, T=1, lam=0.1), 0),
        ],
    ),
    Case("CSRA", dict(input_dim=12, num_classes=5, T=99, lam=0.5), [(2, 12, 5, 7)], id="CSRA@T99",
         gradcheck_shapes=[(1, 12, 2, 3)], keeps_format=False),
    Case(
        "MultiHeadCSRA", dict(num_heads=4, lam=0.1, input_dim=12, num_classes=5), [(2, 12, 5, 7)],
        gradcheck_shapes=[(1, 12, 2, 3)], keeps_format=False,
        bad=[
            *_feature_map_bad("MultiHeadCSRA", (2, 12, 5, 7), 12),
            _ctor("MultiHeadCSRA", "num_heads", dict(num_heads=3, lam=0.1, input_dim=12, num_classes=5), 3),
        ],
    ),
    Case("MultiHeadCSRA", dict(num_heads=1, lam=0.2, input_dim=7, num_classes=3), [(2, 7, 4, 5)],
         id="MultiHeadCSRA@1", gradcheck_shapes=[(1, 7, 3, 2)], keeps_format=False),
]
