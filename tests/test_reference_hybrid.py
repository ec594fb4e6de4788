"""Closed-form and variant tests for the channel+spatial reference modules (fastattn.reference.hybrid),
plus the few spatial-family checks (ResidualAttention, SpatialGroupEnhance) that need more than the
generic cases. Parity with the official code is in test_golden.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn.reference as ref
from cases import randomise


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# ------------------------------------------------------------------------------- SimAM


def test_simam_hand_computed():
    # One 2x2 map: x = [1, 1, 1, 5]. mean = 2, d = (x - mean)^2 = [1, 1, 1, 9], n = HW - 1 = 3,
    # sum(d) / n = 12 / 3 = 4; with lambda = 0.5 the denominator is 4 * (4 + 0.5) = 18, so
    # y = d / 18 + 0.5 = [10/18, 10/18, 10/18, 1] and out = x * sigmoid(y).
    x = torch.tensor([[[[1.0, 1.0], [1.0, 5.0]]]], dtype=torch.float64)
    want = torch.tensor([[[[_sigmoid(10 / 18), _sigmoid(10 / 18)], [_sigmoid(10 / 18), 5 * _sigmoid(1.0)]]]],
                        dtype=torch.float64)
    torch.testing.assert_close(ref.SimAM(e_lambda=0.5)(x), want, rtol=1e-12, atol=1e-12)


def test_simam_default_lambda_two_channels():
    # Channel 0: x = [0, 2, 4, 6]: mean 3, d = [9, 1, 1, 9], sum/n = 20/3.
    # Channel 1: constant 7: d = 0 everywhere, y = 0.5, out = 7 * sigmoid(0.5).
    lam = 1e-4
    x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]], [[7.0, 7.0], [7.0, 7.0]]]], dtype=torch.float64)
    denom = 4 * (20 / 3 + lam)
    c0 = [v * _sigmoid(d / denom + 0.5) for v, d in zip([0.0, 2.0, 4.0, 6.0], [9.0, 1.0, 1.0, 9.0])]
    want = torch.tensor([[[c0[:2], c0[2:]], [[7 * _sigmoid(0.5)] * 2] * 2]], dtype=torch.float64)
    torch.testing.assert_close(ref.SimAM()(x), want, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------- SCSE


def test_scse_add_and_max_from_parts():
    torch.manual_seed(0)
    m_max = randomise(ref.SCSE(12, reduction=3, combine="max")).double().eval()
    m_add = ref.SCSE(12, reduction=3, combine="add").double().eval()
    m_add.load_state_dict(m_max.state_dict())
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)

    # cSE and sSE written out from the module's parameters.
    cse, sse = m_add.cSE, m_add.sSE
    g = torch.sigmoid(F.linear(F.relu(F.linear(x.mean(dim=(2, 3)), cse.fc1.weight, cse.fc1.bias)),
                               cse.fc2.weight, cse.fc2.bias))
    c = x * g[:, :, None, None]
    s = x * torch.sigmoid(torch.einsum("bchw,c->bhw", x, sse.conv.weight.flatten())[:, None] + sse.conv.bias)
    torch.testing.assert_close(cse(x), c)
    torch.testing.assert_close(sse(x), s)

    out_add, out_max = m_add(x), m_max(x)
    torch.testing.assert_close(out_add, c + s)
    torch.testing.assert_close(out_max, torch.maximum(c, s))
    assert not torch.allclose(out_add, out_max)


# --------------------------------------------------------------------------------- BAM


def test_bam_sum_and_product_variants():
    torch.manual_seed(0)
    prod = randomise(ref.BAM(16, reduction=4)).double().eval()
    summ = ref.BAM(16, reduction=4, combine="sum").double().eval()
    summ.load_state_dict(prod.state_dict())
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)  # non-square works (true global mean)
    mc, ms = prod.channel_att(x), prod.spatial_att(x)
    assert mc.shape == (2, 16, 1, 1) and ms.shape == (2, 1, 5, 7)
    torch.testing.assert_close(summ(x), x * (1 + torch.sigmoid(mc + ms)))
    torch.testing.assert_close(prod(x), x * (1 + torch.sigmoid(mc * ms)))
    assert not torch.allclose(summ(x), prod(x))


def test_bam_channel_pool_is_official_pool_on_square_maps():
    # The official code pools with avg_pool2d(kernel=H, stride=H): the global mean on square maps.
    torch.manual_seed(0)
    m = randomise(ref.BAM(16, reduction=4)).double().eval()
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    official_pool = F.avg_pool2d(x, x.size(2), stride=x.size(2)).flatten(1)
    torch.testing.assert_close(m.channel_att(x).flatten(1), m.channel_att.gate_c(official_pool))


def test_bam_train_needs_batch_above_one():
    m = ref.BAM(16, reduction=4).train()
    with pytest.raises(ValueError, match=r"BAM: argument 'x' must have batch size > 1 in training mode.*got 1"):
        m(torch.randn(1, 16, 5, 5))
    m.eval()(torch.randn(1, 16, 5, 5))  # fine in eval mode


# ----------------------------------------------------------------- CoordinateAttention


@pytest.mark.parametrize("channels,reduction,mip", [(64, 32, 8), (256, 32, 8), (512, 32, 16), (64, 8, 8),
                                                    (20, 2, 10), (12, 32, 8)])
def test_coordinate_attention_mip(channels, reduction, mip):
    m = ref.CoordinateAttention(channels, reduction=reduction)
    assert m.conv1.weight.shape == (mip, channels, 1, 1)
    assert m.bn1.weight.shape == (mip,)
    assert m.conv_h.weight.shape == (channels, mip, 1, 1)
    assert m.conv_w.weight.shape == (channels, mip, 1, 1)
    x = torch.randn(2, channels, 3, 5)
    assert m(x).shape == x.shape


def test_coordinate_attention_out_channels_must_match():
    assert ref.CoordinateAttention(16, out_channels=16).conv_h.out_channels == 16
    with pytest.raises(ValueError, match=r"CoordinateAttention: argument 'out_channels' must be .*got 8"):
        ref.CoordinateAttention(16, out_channels=8)


# ------------------------------------------------------ group divisibility (SA-Net, SGE)


def test_shuffle_attention_channels_not_divisible_by_2_groups():
    ref.ShuffleAttention(32, groups=8)  # 32 = 2 * 8 * 2
    with pytest.raises(ValueError, match=r"ShuffleAttention: argument 'channels' .*2\*groups=16, got 24"):
        ref.ShuffleAttention(24, groups=8)  # divisible by groups, not by 2 * groups


def test_spatial_group_enhance_channels_not_divisible_by_groups():
    m = ref.SpatialGroupEnhance(groups=8)
    m(torch.randn(2, 64, 5, 4))
    with pytest.raises(ValueError,
                       match=r"^SpatialGroupEnhance: argument 'x' must have channels divisible by groups=8, got 60$"):
        m(torch.randn(2, 60, 5, 4))


# ------------------------------------------------------------------------ TripletAttention


def _official_triplet(m: ref.TripletAttention, x: torch.Tensor) -> torch.Tensor:
    """The official forward: gates on permuted copies of x, permuted back, averaged."""
    def gate(g, t):
        pooled = torch.cat((t.max(dim=1, keepdim=True)[0], t.mean(dim=1, keepdim=True)), dim=1)
        return t * g(pooled)

    out_cw = gate(m.cw, x.permute(0, 2, 1, 3).contiguous()).permute(0, 2, 1, 3)
    out_hc = gate(m.hc, x.permute(0, 3, 2, 1).contiguous()).permute(0, 3, 2, 1)
    if m.no_spatial:
        return 1 / 2 * (out_cw + out_hc)
    return 1 / 3 * (gate(m.hw, x) + out_cw + out_hc)


@pytest.mark.parametrize("no_spatial", [False, True])
def test_triplet_attention_branches(no_spatial):
    torch.manual_seed(0)
    m = randomise(ref.TripletAttention(kernel_size=5, no_spatial=no_spatial)).double().eval()
    keys = list(m.state_dict())
    assert any(k.startswith("hw.") for k in keys) != no_spatial
    assert hasattr(m, "hw") != no_spatial
    assert len(keys) == (12 if no_spatial else 18)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), _official_triplet(m, x))


# ------------------------------------------------------------------------------------ CBAM


def test_cbam_extra_pool_types_match_official_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 5, 4, dtype=torch.float64)
    pool = ref.hybrid._CBAMChannelGate._pool
    # "lp": lp_pool2d with norm 2 over the whole map; "lse": max + log(sum(exp(x - max))).
    lp = F.lp_pool2d(x, 2, (5, 4), stride=(5, 4)).flatten(1)
    flat = x.flatten(2)
    s = flat.max(dim=2, keepdim=True)[0]
    lse = (s + (flat - s).exp().sum(dim=2, keepdim=True).log()).squeeze(2)
    torch.testing.assert_close(pool(x, "lp"), lp)
    torch.testing.assert_close(pool(x, "lse"), lse)


def test_cbam_no_spatial_has_channel_gate_only():
    m = ref.CBAM(24, reduction=4, no_spatial=True)
    assert [k for k in m.state_dict()] == ["ChannelGate.mlp.1.weight", "ChannelGate.mlp.1.bias",
                                          "ChannelGate.mlp.3.weight", "ChannelGate.mlp.3.bias"]


# ------------------------------------------------------------------------ ResidualAttention


@pytest.mark.parametrize("depth,shape", [(1, (2, 4, 5, 6)), (2, (2, 8, 9, 7)), (3, (2, 4, 7, 5)), (3, (2, 4, 2, 3))])
def test_residual_attention_is_one_plus_mask_times_trunk(depth, shape):
    torch.manual_seed(0)
    m = randomise(ref.ResidualAttention(shape[1], depth=depth)).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    mask, trunk = m.mask(x), m.trunk(x)
    assert mask.shape == x.shape and bool(((mask > 0) & (mask < 1)).all())
    torch.testing.assert_close(m(x), (1 + mask) * trunk)
    assert len(m.levels) == depth and len(m.up) == depth - 1
    assert m.levels[-1].skip is None and len(m.levels[-1].down) == 2
