"""Closed-form and special checks of the channel attention reference modules.

The generic checks (layouts, dtypes, gradients, bad input) live in test_reference.py and the
parity with the authors' code in test_golden.py; these tests pin down formulas and calling
conventions that neither covers.
"""
from __future__ import annotations

import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

import fastattn.reference as ref
from cases import randomise
from fastattn.reference.channel import FREQ_SEL_METHODS, freq_indices

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden"


# ---------------------------------------------------------------------------------------------
# MultiSpectralAttention (FcaNet)
# ---------------------------------------------------------------------------------------------


def _basis(freq: int, size: int) -> torch.Tensor:
    """cos(pi f (pos + 0.5) / P) / sqrt(P), times sqrt(2) if f != 0, for pos = 0..P-1."""
    pos = torch.arange(size, dtype=torch.float64)
    b = torch.cos(math.pi * freq * (pos + 0.5) / size) / math.sqrt(size)
    return b * math.sqrt(2) if freq != 0 else b


@pytest.mark.parametrize(
    "channels,dct_h,dct_w,method",
    [(32, 14, 7, "top16"), (64, 7, 7, "low32"), (16, 7, 14, "bot8"), (56, 28, 28, "top2"), (9, 7, 7, "low1")],
)
def test_dct_filter_matches_closed_formula(channels, dct_h, dct_w, method):
    m = ref.MultiSpectralAttention(channels, dct_h, dct_w, reduction=1, freq_sel_method=method)
    filt = m.dct_layer.weight
    assert filt.shape == (channels, dct_h, dct_w)
    assert filt.dtype == torch.get_default_dtype()
    xs, ys = freq_indices(method)
    part = channels // len(xs)
    for i in sorted({0, min(1, len(xs) - 1), len(xs) // 2, len(xs) - 1}):
        u, v = xs[i] * (dct_h // 7), ys[i] * (dct_w // 7)
        want = _basis(u, dct_h)[:, None] * _basis(v, dct_w)[None, :]
        for c in (i * part, (i + 1) * part - 1):
            # the buffer is stored in fp32, as the official one: compare at fp32 rounding
            torch.testing.assert_close(filt[c].double(), want, rtol=0, atol=1e-7)


def test_dct_basis_is_orthonormal():
    """The basis vectors of one axis are orthonormal (a sanity check of the formula itself)."""
    basis = torch.stack([_basis(f, 7) for f in range(7)])
    torch.testing.assert_close(basis @ basis.T, torch.eye(7, dtype=torch.float64))


def test_dct_filter_equals_official_fp32_buffer():
    """Built in float64 and rounded to fp32 once, the buffer equals the official fp32 one."""
    for name in ("MultiSpectralAttention.pt", "MultiSpectralAttention__pool.pt"):
        g = torch.load(GOLDEN / name, weights_only=True)
        m = ref.MultiSpectralAttention(**g["fastattn_kwargs"])
        key, official = g["state"][0]
        assert key == "dct_layer.weight"
        assert torch.equal(m.dct_layer.weight.double(), official)


def test_freq_tables_complete():
    for method in FREQ_SEL_METHODS:
        xs, ys = freq_indices(method)
        assert len(xs) == len(ys) == int(method[3:])
        assert all(0 <= u < 7 for u in xs + ys)
    # the first pairs of each ranking, from the paper's Fig. 4 / the official tables
    assert freq_indices("top4") == ([0, 0, 6, 0], [0, 1, 0, 5])
    assert freq_indices("low4") == ([0, 0, 1, 1], [0, 1, 0, 1])
    assert freq_indices("bot1") == ([6], [6])
    assert len(set(zip(*freq_indices("top32")))) == 32


def test_multispectral_channels_not_divisible_raises():
    with pytest.raises(ValueError, match=r"MultiSpectralAttention: argument 'channels'.*16.*got 24"):
        ref.MultiSpectralAttention(24, 7, 7, reduction=4, freq_sel_method="top16")
    with pytest.raises(ValueError, match=r"MultiSpectralAttention: argument 'channels'"):
        ref.MultiSpectralAttention(30, 14, 14, reduction=2, freq_sel_method="low4")


def test_multispectral_dc_only_is_scaled_mean():
    """With the (0, 0) frequency only, the DCT pool is sqrt(H W) times the global mean."""
    m = randomise(ref.MultiSpectralAttention(8, 7, 7, reduction=2, freq_sel_method="top1")).double().eval()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    want = x * m.fc(x.mean(dim=(2, 3)) * 7)[:, :, None, None]
    torch.testing.assert_close(m(x), want)


# ---------------------------------------------------------------------------------------------
# ECA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,k", [(64, 3), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_adaptive_kernel_size(channels, k):
    m = ref.ECA(channels, adaptive=True)
    assert m.k_size == k
    assert m.conv.kernel_size == (k,) and m.conv.padding == ((k - 1) // 2,)


def test_eca_adaptive_ignores_k_size_and_fixed_uses_it():
    assert ref.ECA(2048, k_size=3, adaptive=True).k_size == 7
    assert ref.ECA(2048, k_size=3).k_size == 3
    assert ref.ECA(k_size=9).k_size == 9


def test_eca_adaptive_without_channels_raises():
    with pytest.raises(ValueError, match=r"ECA: argument 'channels'"):
        ref.ECA(adaptive=True)


def test_eca_is_conv_across_channels():
    m = randomise(ref.ECA(10, k_size=5)).double()
    x = torch.randn(2, 10, 3, 4, dtype=torch.float64)
    y = F.pad(x.mean(dim=(2, 3)), (2, 2))
    w = m.conv.weight.view(5)
    conv = torch.stack([(y[:, c:c + 5] * w).sum(1) for c in range(10)], dim=1)
    torch.testing.assert_close(m(x), x * torch.sigmoid(conv)[:, :, None, None])


# ---------------------------------------------------------------------------------------------
# SqueezeExcite, CompetitiveSE, GatherExcite
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_se_residual_equals_gate_plus_residual(channels_last):
    m = randomise(ref.SqueezeExcite(24, reduction=4)).double()
    x = torch.randn(2, 24, 5, 7, dtype=torch.float64)
    r = torch.randn(2, 24, 5, 7, dtype=torch.float64)
    if channels_last:
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    g = torch.sigmoid(m.fc2(F.relu(m.fc1(x.mean(dim=(2, 3), keepdim=True)))))
    torch.testing.assert_close(m(x, r), x * g + r)
    torch.testing.assert_close(m(x, r), m(x) + r)
    torch.testing.assert_close(m(x, None), x * g)


def test_se_layout_matches_timm():
    sd = ref.SqueezeExcite(64, reduction=16).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [
        ("fc1.weight", (4, 64, 1, 1)), ("fc1.bias", (4,)), ("fc2.weight", (64, 4, 1, 1)), ("fc2.bias", (64,))]
    assert list(ref.SqueezeExcite(64, bias=False).state_dict()) == ["fc1.weight", "fc2.weight"]


def test_competitive_se_double_fc_formula():
    m = randomise(ref.CompetitiveSE(16, reduction=4)).double()
    res, idt = torch.randn(2, 16, 3, 5, dtype=torch.float64), torch.randn(2, 16, 3, 5, dtype=torch.float64)
    u, v = res.mean(dim=(2, 3)), idt.mean(dim=(2, 3))
    wr, wi, we = (t.weight.flatten(1) for t in (m.fc_residual, m.fc_identity, m.fc_excite))
    z = torch.cat([F.relu(u @ wr.T), F.relu(v @ wi.T)], dim=1)
    g = torch.sigmoid(z @ we.T)
    torch.testing.assert_close(m(res, idt), res * g[:, :, None, None] + idt)


@pytest.mark.parametrize("mode", ["pair_view", "pair_view_1x1"])
def test_competitive_se_pair_view_formula(mode):
    m = randomise(ref.CompetitiveSE(32, reduction=4, mode=mode)).double().eval()
    assert m.pair_conv.out_channels == 2  # 32 // (4 * 4) maps
    res, idt = torch.randn(2, 32, 3, 5, dtype=torch.float64), torch.randn(2, 32, 3, 5, dtype=torch.float64)
    u, v = res.mean(dim=(2, 3)), idt.mean(dim=(2, 3))
    bn = m.pair_bn
    w = m.pair_conv.weight  # (maps, 1, 1, kw)
    maps = []
    for j in range(w.shape[0]):
        if mode == "pair_view":
            mj = u * w[j, 0, 0, 0] + v * w[j, 0, 0, 1]                      # (B, C)
        else:
            mj = torch.stack([u, v], dim=-1).flatten(1) * w[j, 0, 0, 0]     # (B, 2C): u0, v0, u1, v1, ...
        maps.append((mj - bn.running_mean[j]) / torch.sqrt(bn.running_var[j] + bn.eps) * bn.weight[j] + bn.bias[j])
    one = torch.stack(maps).mean(0)
    g = torch.sigmoid(m.fc2(F.relu(m.fc1(one))))
    torch.testing.assert_close(m(res, idt), res * g[:, :, None, None] + idt)


def test_gather_excite_global_without_params_is_se_like():
    m = ref.GatherExcite(12, extent=0, use_mlp=False)
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x), x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True)))


def test_gather_excite_extent_pool_and_nearest_upsample():
    """extent=2: each output position is gated by the mean of the 3x3 window (stride 2) that its
    nearest-upsampled cell came from, borders excluded from the count."""
    e = 2
    m = ref.GatherExcite(4, extent=e, use_mlp=False)
    x = torch.randn(1, 4, 5, 7, dtype=torch.float64)
    out = m(x)
    hg, wg = math.ceil(5 / e), math.ceil(7 / e)
    for i in range(5):
        for j in range(7):
            a, b = i * hg // 5, j * wg // 7           # nearest source cell
            r0, c0 = a * e - (e - 1), b * e - (e - 1)  # window start, padding e-1
            win = x[:, :, max(r0, 0):r0 + 2 * e - 1, max(c0, 0):c0 + 2 * e - 1]
            torch.testing.assert_close(out[:, :, i, j], x[:, :, i, j] * torch.sigmoid(win.mean(dim=(2, 3))))


def test_gather_excite_global_params_gathers_to_one_value():
    m = randomise(ref.GatherExcite(6, extent=0, extra_params=True, use_mlp=False, feat_size=(3, 4))).double().eval()
    assert m.gather.conv1.weight.shape == (6, 1, 3, 4)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    s = (x * m.gather.conv1.weight.view(1, 6, 3, 4)).sum(dim=(2, 3))
    bn = m.gather.norm1
    s = (s - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(m(x), x * torch.sigmoid(s)[:, :, None, None])


def test_gather_excite_layout_matches_timm():
    keys = list(ref.GatherExcite(64, extent=8, extra_params=True).state_dict())
    convs = [k for k in keys if k.endswith(".weight") and k.startswith("gather.conv")]
    assert convs == ["gather.conv1.weight", "gather.conv2.weight", "gather.conv3.weight"]
    assert keys[-4:] == ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]


# ---------------------------------------------------------------------------------------------
# GSoP, SRM, SelectiveKernel
# ---------------------------------------------------------------------------------------------


def test_gsop_covariance_matches_official_formula():
    z = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    x = z.flatten(2)
    n = x.shape[2]
    i_hat = torch.eye(n, dtype=torch.float64) / n - torch.ones(n, n, dtype=torch.float64) / n / n
    torch.testing.assert_close(ref.GSoP.covariance(z), x @ i_hat @ x.transpose(1, 2))


def test_srm_style_pooling_formula():
    m = randomise(ref.SRM(6)).double().eval()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    mu = x.mean(dim=(2, 3))
    sd = torch.sqrt(x.var(dim=(2, 3), unbiased=True) + 1e-5)
    z = mu * m.cfc[:, 0] + sd * m.cfc[:, 1]
    bn = m.bn
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(m(x), x * torch.sigmoid(z)[:, :, None, None])


def test_srm_cfc_init_zero():
    assert torch.equal(ref.SRM(8).cfc, torch.zeros(8, 2))


def test_selective_kernel_structure_and_convex_combination():
    m = randomise(ref.SelectiveKernel(64, branches=3, groups=32, reduction=16, min_dim=32)).double().eval()
    assert [p.conv.dilation for p in m.paths] == [(1, 1), (2, 2), (3, 3)]
    assert [p.conv.padding for p in m.paths] == [(1, 1), (2, 2), (3, 3)]
    assert m.attn.fc_reduce.out_channels == 32           # max(64 // 16, 32)
    assert m.attn.fc_select.out_channels == 3 * 64
    # identical branches: any convex combination returns the branch itself
    with torch.no_grad():
        for p in m.paths[1:]:
            p.conv.weight.zero_()
            p.bn.load_state_dict(m.paths[0].bn.state_dict())
        m.paths[0].conv.weight.zero_()
    x = torch.randn(2, 64, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), m.paths[0](x))


def test_selective_kernel_attention_is_branch_major():
    m = randomise(ref.SelectiveKernel(8, branches=2, groups=2, reduction=2, min_dim=2)).double().eval()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    f = [p(x) for p in m.paths]
    s = (f[0] + f[1]).mean(dim=(2, 3))
    z = F.relu(m.attn.bn(m.attn.fc_reduce(s[:, :, None, None])))
    a = m.attn.fc_select(z).flatten(1).view(2, 2, 8).softmax(dim=1)
    want = f[0] * a[:, 0, :, None, None] + f[1] * a[:, 1, :, None, None]
    torch.testing.assert_close(m(x), want)


# ---------------------------------------------------------------------------------------------
# DIACell
# ---------------------------------------------------------------------------------------------


def test_dia_state_none_equals_zero_state():
    m = randomise(ref.DIACell(16)).double()
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    zeros = (torch.zeros(2, 16, dtype=torch.float64), torch.zeros(2, 16, dtype=torch.float64))
    y0, (h0, c0) = m(x)
    y1, (h1, c1) = m(x, zeros)
    assert torch.equal(y0, y1) and torch.equal(h0, h1) and torch.equal(c0, c1)
    assert h0.shape == c0.shape == (2, 16)


def test_dia_cell_formula_and_chaining():
    m = randomise(ref.DIACell(8, reduction=4)).double()
    x1, x2 = torch.randn(2, 2, 8, 3, 4, dtype=torch.float64)
    y1, s1 = m(x1)
    y2, (h2, c2) = m(x2, s1)
    h, c = s1
    gates = m.w_ih[0](x2.mean(dim=(2, 3))) + m.w_hh[0](h)
    i, f, g, o = gates.chunk(4, 1)
    c_want = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_want = torch.sigmoid(o) * torch.sigmoid(c_want)
    torch.testing.assert_close(c2, c_want)
    torch.testing.assert_close(h2, h_want)
    torch.testing.assert_close(y2, x2 * h_want[:, :, None, None])


def test_dia_state_built_on_input_dtype():
    m = ref.DIACell(8).to(torch.bfloat16)
    y, (h, c) = m(torch.randn(2, 8, 3, 3, dtype=torch.bfloat16))
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# PyramidSplitAttention, TiledSqueezeExcite, NAM, SpatialPyramidAttention
# ---------------------------------------------------------------------------------------------


def test_psa_concatenates_in_reversed_branch_order():
    m = randomise(ref.PyramidSplitAttention(16, 64)).double()
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64)
    feats = [getattr(m, f"conv_{i + 1}")(x) for i in range(4)]
    att = torch.stack([m.se(f) for f in feats], dim=1).softmax(dim=1)
    out = m(x)
    for i in range(4):
        block = out[:, (3 - i) * 16:(4 - i) * 16]
        torch.testing.assert_close(block, feats[i] * att[:, i])


def test_psa_layout_matches_official():
    sd = ref.PyramidSplitAttention(16, 128).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [
        ("conv_1.weight", (32, 16, 3, 3)), ("conv_2.weight", (32, 4, 5, 5)), ("conv_3.weight", (32, 2, 7, 7)),
        ("conv_4.weight", (32, 1, 9, 9)), ("se.fc1.weight", (2, 32, 1, 1)), ("se.fc1.bias", (2,)),
        ("se.fc2.weight", (32, 2, 1, 1)), ("se.fc2.bias", (32,))]


@pytest.mark.parametrize("h,w,k", [(9, 15, 7), (5, 7, 3), (7, 7, 7), (3, 4, 7)])
def test_tiled_se_tiles(h, w, k):
    m = randomise(ref.TiledSqueezeExcite(8, reduction=2, pool_kernel=k)).double().eval()
    x = torch.randn(2, 8, h, w, dtype=torch.float64)
    out = m(x)
    for r0 in range(0, h, k):
        for c0 in range(0, w, k):
            tile = x[:, :, r0:r0 + k, c0:c0 + k]
            s = tile.mean(dim=(2, 3), keepdim=True)
            g = torch.sigmoid(m.fc2(F.relu(m.bn(m.fc1(s)))))
            torch.testing.assert_close(out[:, :, r0:r0 + k, c0:c0 + k], tile * g)


def test_nam_formula():
    m = randomise(ref.NAM(6)).double().eval()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    bn = m.bn2
    w = bn.weight.abs() / bn.weight.abs().sum()
    xn = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    xn = xn * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(m(x), torch.sigmoid(xn * w[:, None, None]) * x)


def test_nam_gradcheck_and_detached_weights():
    """NAM takes w = |gamma| / sum |gamma| without gradient (the official .data), so the generic
    gradcheck w.r.t. bn2.weight cannot pass; check the input and bias, and that the gradient
    w.r.t. gamma treats w as a constant."""
    m = randomise(ref.NAM(5)).double().eval()
    x = torch.randn(1, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    bias = m.bn2.bias.detach().clone().requires_grad_(True)

    def f(x, b):
        return torch.func.functional_call(m, {"bn2.bias": b}, (x,), strict=False)

    assert torch.autograd.gradcheck(f, (x, bias), eps=1e-6, atol=1e-5, rtol=1e-4)

    gamma = m.bn2.weight
    cot = torch.randn(1, 5, 3, 4, dtype=torch.float64)
    (m(x) * cot).sum().backward()
    w = (gamma.abs() / gamma.abs().sum()).detach()
    bn = m.bn2
    xhat = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    z = (xhat * gamma[:, None, None] + bn.bias[:, None, None]) * w[:, None, None]
    want = torch.autograd.grad((torch.sigmoid(z) * x * cot).sum(), gamma)[0]
    torch.testing.assert_close(gamma.grad, want)


def test_spatial_pyramid_feature_order():
    """The pooled vector is [1x1 (C), 2x2 (4C), 4x4 (16C)], each flattened channel-major."""
    m = randomise(ref.SpatialPyramidAttention(4, reduction=2)).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    p1 = x.mean(dim=(2, 3))
    p2 = x.view(2, 4, 2, 4, 2, 4).mean(dim=(3, 5)).reshape(2, 16)
    p4 = x.view(2, 4, 4, 2, 4, 2).mean(dim=(3, 5)).reshape(2, 64)
    g = m.fc(torch.cat([p1, p2, p4], dim=1))
    torch.testing.assert_close(m(x), x * g[:, :, None, None])
