"""TripletAttention's CPU path: the raw kernels (torch.ops.fastattn_C.triplet_*, gate_conv*)
against float64 math, and fastattn.TripletAttention on it (forward, every gradient, the BatchNorm
statistics) against fastattn.reference.TripletAttention."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from cases.paths import check_training_step, count_calls, random_pair
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
# 14 and 17 wide: one masked 16-lane step, and a full step plus a one-lane tail
SHAPES = [(3, 5, 7, 9), (2, 6, 14, 14), (2, 3, 17, 33), (2, 4, 1, 6), (2, 5, 6, 1)]


def zpool64(x, dim):
    """[amax, mean] over dim of x in float64, and the first argmax."""
    xd = x.double()
    return torch.stack((xd.amax(dim), xd.mean(dim)), 1), first_argmax(xd, dim)


def first_argmax(x, dim):
    """The first index reaching the max along dim (the first NaN where there is one)."""
    n = x.shape[dim]
    pos = torch.arange(n).view([-1 if d == dim else 1 for d in range(x.dim())])
    hit = (x == x.amax(dim, keepdim=True)) | x.isnan()
    has_nan = x.isnan().any(dim, keepdim=True)
    hit = torch.where(has_nan, x.isnan(), hit)
    return torch.where(hit, pos, n).amin(dim)


def maps64(x):
    """The three Z-pools in the kernels' layouts: cw (B, 2, C, W), hc (B, 2, H, C), hw (B, 2, H, W)."""
    (cw, icw), (hc, ihc), (hw, ihw) = zpool64(x, 2), zpool64(x, 3), zpool64(x, 1)
    return (cw, icw), (hc.transpose(2, 3), ihc.transpose(1, 2)), (hw, ihw)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "no_spatial"])
def test_triplet_pools_match_float64(dtype, tol, shape, spatial):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    got = torch.ops.fastattn_C.triplet_pools(x, spatial)
    want = maps64(x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for (m, i), (wm, wi) in zip(zip(got[0::2], got[1::2]), want if spatial else want[:2]):
        assert m.dtype == acc and i.dtype == torch.int32
        torch.testing.assert_close(m.double(), wm, rtol=tol, atol=tol)
        assert torch.equal(i.long(), wi)
    if not spatial:
        assert got[4].numel() == 0 and got[5].numel() == 0


def test_triplet_pools_nan_inf_and_ties():
    """A NaN wins the max (its first position is the argmax), -inf rows and ties give the first
    index, as the op path's zpool."""
    x = torch.randn(2, 3, 5, 18).round()                  # many ties
    x[0, 1, 2, 7] = float("nan")
    x[0, 1, 2, 11] = float("nan")
    x[1, 2, 3, :] = -float("inf")
    x[1, 0, :, 4] = 9.0                                   # a tied column of maxima
    x[0, :, 1, 3] = 9.0                                   # a tied pixel across the channels
    got = torch.ops.fastattn_C.triplet_pools(x, True)
    for (m, i), (wm, wi) in zip(zip(got[0::2], got[1::2]), maps64(x)):
        torch.testing.assert_close(m.double(), wm, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(i.long(), wi)
    for dim, m in zip((2, 3, 1), got[0::2]):                         # the op path's maps, in these layouts
        torch.testing.assert_close(m, fastattn.ops.zpool(x, dim, backend="cpu"), equal_nan=True)


def gates_for(x, g):
    B, C, H, W = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return [torch.rand(s, generator=g).to(acc) for s in ((B, C, W), (B, H, C), (B, H, W))]


def gated64(x, g_cw, g_hc, g_hw, scale):
    total = g_cw.double()[:, :, None, :] + g_hc.double().transpose(1, 2)[:, :, :, None]
    if g_hw is not None:
        total = total + g_hw.double()[:, None]
    return x.double() * total * scale


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "no_spatial"])
def test_triplet_scale_and_backward_match_float64(dtype, tol, shape, spatial):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    g_cw, g_hc, g_hw = gates_for(x, g)
    g_hw = g_hw if spatial else None
    scale = 1 / 3 if spatial else 1 / 2
    y = torch.ops.fastattn_C.triplet_scale(x, g_cw, g_hc, g_hw, scale)
    assert y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y.double(), gated64(x, g_cw, g_hc, g_hw, scale), rtol=tol, atol=tol)
    # pass 1: the gates' gradients
    d_cw, d_hc, d_hw = torch.ops.fastattn_C.triplet_backward_sums(dy, x, scale, spatial)
    p = dy.double() * x.double() * scale
    stol = max(tol, 1e-5)
    torch.testing.assert_close(d_cw.double(), p.sum(2), rtol=stol, atol=stol)
    torch.testing.assert_close(d_hc.double(), p.sum(3).transpose(1, 2), rtol=stol, atol=stol)
    if spatial:
        torch.testing.assert_close(d_hw.double(), p.sum(1), rtol=stol, atol=stol)
    else:
        assert d_hw.numel() == 0
    # pass 2: dx through the gated product and the three Z-pools in float64: autograd for the
    # product and the means, the max gradients added at the first argmax (ties in bf16 / fp16:
    # amax's autograd would split them)
    xr = x.double().requires_grad_()
    means = [xr.mean(2), xr.mean(3).transpose(1, 2), xr.mean(1)][:2 + spatial]
    maps = [m for m, _ in maps64(x)][:2 + spatial]
    idx = [i for _, i in maps64(x)][:2 + spatial]
    dm = [torch.randn(m.shape, generator=g, dtype=torch.float64) for m in maps]
    torch.autograd.backward([gated64(xr, g_cw, g_hc, g_hw, scale)] + means, [dy.double()] + [d[:, 1] for d in dm])
    want = xr.grad
    want.scatter_add_(2, idx[0].unsqueeze(2), dm[0][:, 0].unsqueeze(2))
    want.scatter_add_(3, idx[1].transpose(1, 2).unsqueeze(3), dm[1][:, 0].transpose(1, 2).unsqueeze(3))
    if spatial:
        want.scatter_add_(1, idx[2].unsqueeze(1), dm[2][:, 0].unsqueeze(1))
    acc = g_cw.dtype
    args = [dm[0].to(acc), idx[0].int(), dm[1].to(acc), idx[1].int().contiguous()]
    args += [dm[2].to(acc), idx[2].int()] if spatial else [None, None]
    dx = torch.ops.fastattn_C.triplet_backward_dx(dy, g_cw, g_hc, g_hw, scale, *args)
    torch.testing.assert_close(dx.double(), want, rtol=tol, atol=tol)


def test_triplet_scale_and_dx_streaming_path():
    """fp32 outputs of at least LLC / 2 are written with streaming stores (odd planes: unaligned)."""
    need = _ext.build_info()["llc_bytes"] // 2 // 4 + 1
    side = math.isqrt(need // 6) + 2
    shape = (2, 3, side | 1, (side + 2) | 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    g_cw, g_hc, g_hw = gates_for(x, g)
    y = torch.ops.fastattn_C.triplet_scale(x, g_cw, g_hc, g_hw, 1 / 3)
    torch.testing.assert_close(y.double(), gated64(x, g_cw, g_hc, g_hw, 1 / 3), rtol=1e-6, atol=1e-6)
    (m_cw, i_cw, m_hc, i_hc, m_hw, i_hw) = torch.ops.fastattn_C.triplet_pools(x, True)
    zeros = [torch.zeros_like(m) for m in (m_cw, m_hc, m_hw)]
    dx = torch.ops.fastattn_C.triplet_backward_dx(x, g_cw, g_hc, g_hw, 1 / 3, zeros[0], i_cw, zeros[1], i_hc,
                                                  zeros[2], i_hw)
    torch.testing.assert_close(dx, y, rtol=1e-6, atol=1e-6)         # dy = x, no pool terms: dx = y


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,k", [((3, 2, 7, 9), 7), ((2, 2, 14, 40), 7), ((2, 3, 5, 4), 3), ((1, 2, 1, 1), 7),
                                     ((2, 2, 6, 5), 1), ((2, 2, 3, 30), 5)])
def test_gate_conv_matches_torch(dtype, tol, shape, k):
    g = torch.Generator().manual_seed(sum(shape) + k)
    inp = torch.randn(shape, generator=g, dtype=dtype)
    w = torch.randn(1, shape[1], k, k, generator=g, dtype=dtype)
    ir, wr = inp.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.conv2d(ir, wr, padding=(k - 1) // 2)
    d_out = torch.randn(want.shape, generator=g, dtype=dtype)
    want.backward(d_out)
    torch.testing.assert_close(torch.ops.fastattn_C.gate_conv(inp, w), want.detach(), rtol=tol, atol=tol)
    d_in, d_w = torch.ops.fastattn_C.gate_conv_backward(d_out, inp, w, True, True)
    torch.testing.assert_close(d_in, ir.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(d_w, wr.grad, rtol=tol, atol=tol)
    d_in_only, no_w = torch.ops.fastattn_C.gate_conv_backward(d_out, inp, w, True, False)
    assert torch.equal(d_in_only, d_in) and no_w.numel() == 0


def test_triplet_raw_errors():
    x = torch.randn(2, 3, 4, 5)
    g_cw, g_hc, g_hw = torch.rand(2, 3, 5), torch.rand(2, 4, 3), torch.rand(2, 4, 5)
    with pytest.raises(ValueError, match=r"triplet_pools: argument 'x' must be NCHW-contiguous"):
        torch.ops.fastattn_C.triplet_pools(x.to(memory_format=torch.channels_last), True)
    with pytest.raises(ValueError, match=r"triplet_pools: argument 'x' must not be empty"):
        torch.ops.fastattn_C.triplet_pools(torch.randn(2, 3, 0, 5), True)
    with pytest.raises(ValueError, match=r"triplet_scale: argument 'g_hc' must have shape \[2, 4, 3\]"):
        torch.ops.fastattn_C.triplet_scale(x, g_cw, g_hc.transpose(1, 2).contiguous(), g_hw, 1 / 3)
    with pytest.raises(TypeError, match=r"triplet_scale: argument 'g_cw' must be Float"):
        torch.ops.fastattn_C.triplet_scale(x, g_cw.double(), g_hc, g_hw, 1 / 3)
    with pytest.raises(TypeError, match=r"triplet_backward_sums: argument 'dy' must have the dtype of 'x'"):
        torch.ops.fastattn_C.triplet_backward_sums(x.double(), x, 1 / 3, True)
    m_cw, i_cw, m_hc, i_hc, m_hw, i_hw = torch.ops.fastattn_C.triplet_pools(x, True)
    with pytest.raises(ValueError, match=r"argument 'idx_hc' must hold positions in \[0, W = 5\)"):
        torch.ops.fastattn_C.triplet_backward_dx(x, g_cw, g_hc, g_hw, 1 / 3, m_cw, i_cw, m_hc, i_hc + 5, m_hw, i_hw)
    with pytest.raises(ValueError, match=r"'g_hw', 'dm_hw' and 'idx_hw' must be given together"):
        torch.ops.fastattn_C.triplet_backward_dx(x, g_cw, g_hc, g_hw, 1 / 3, m_cw, i_cw, m_hc, i_hc, None, None)
    with pytest.raises(ValueError, match=r"gate_conv: argument 'weight' must have shape \(1, 2, k, k\) with k odd"):
        torch.ops.fastattn_C.gate_conv(torch.randn(2, 2, 5, 5), torch.randn(1, 2, 4, 4))
    with pytest.raises(TypeError, match=r"gate_conv: argument 'input' must be float32 or float64"):
        torch.ops.fastattn_C.gate_conv(torch.randn(2, 2, 5, 5).bfloat16(), torch.randn(1, 2, 3, 3).bfloat16())


# --- fastattn.TripletAttention on the CPU path


def _count(monkeypatch):
    from fastattn.modules import hybrid

    return count_calls(monkeypatch, hybrid, "_triplet_cpu")


def _pair(dtype, **kwargs):
    return random_pair("TripletAttention", dtype, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"no_spatial": True}, {"kernel_size": 3}], ids=["k7", "no_spatial", "k3"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("shape", [(4, 12, 5, 7), (2, 8, 9, 3), (2, 5, 1, 6)], ids=["5x7", "9x3", "1x6"])
def test_triplet_module_training_matches_reference(monkeypatch, kwargs, dtype, tol, x_grad, shape):
    """(16-bit inputs have ties in the max pools, where the reference's amax splits the gradient
    and the fused path, as the op path, sends it to the first maximum: their kernels are checked
    against float64 above.)"""
    calls = _count(monkeypatch)
    torch.manual_seed(sum(shape))
    r, f = _pair(dtype, **kwargs)
    check_training_step(r, f, torch.randn(shape, dtype=dtype), tol, x_grad)     # the gates' BatchNorms too
    assert calls == [1]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kwargs", [{}, {"no_spatial": True}], ids=["k7", "no_spatial"])
def test_triplet_module_inference_matches_reference(monkeypatch, dtype, tol, kwargs):
    calls = _count(monkeypatch)
    torch.manual_seed(0)
    r, f = _pair(torch.float32, **kwargs)
    r.eval(), f.eval()
    x = torch.randn(4, 16, 14, 14).to(dtype)
    with torch.no_grad():
        want = r.to(dtype)(x)
        got = f.to(dtype)(x)
    with torch.inference_mode():
        got_inference = f(x)
    assert calls == [1, 1]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(got_inference, got)


def test_triplet_module_backward_twice_and_ties(monkeypatch):
    """retain_graph backward twice gives twice the gradients; with ties the max gradients go where
    the op path sends them (the first maximum)."""
    calls = _count(monkeypatch)
    torch.manual_seed(0)
    f = fastattn.TripletAttention()
    x = torch.randn(2, 6, 5, 7).round()
    x[:, :, 2, :] = 3.0
    dy = torch.randn(2, 7, 5, 6).permute(0, 3, 2, 1)                # non-contiguous dy
    grads = []
    for fused in (True, False):
        f.zero_grad()
        xx = x.clone().requires_grad_()
        if not fused:
            monkeypatch.setattr(fastattn.TripletAttention, "cpu_fused", lambda self, x: False)
        y = f(xx)
        y.backward(dy, retain_graph=True)
        once = [xx.grad.clone()] + [p.grad.clone() for p in f.parameters()]
        y.backward(dy)
        for a, b in zip([xx.grad] + [p.grad for p in f.parameters()], once):
            torch.testing.assert_close(a, 2 * b)
        grads.append(once)
    assert calls == [1]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triplet_module_path_conditions(monkeypatch):
    calls = _count(monkeypatch)
    f = fastattn.TripletAttention()
    x = torch.randn(2 * torch.get_num_threads(), 6, 5, 5)
    f(x.to(memory_format=torch.channels_last)).sum().backward()     # channels_last: the op path
    f.backend = "torch"
    f(x).sum().backward()
    f.backend = None
    if torch.get_num_threads() > 1:
        f(x[:1]).sum().backward()                                   # fewer samples than threads
    assert not calls
    assert f.cpu_fused(x)
    f(x).sum().backward()
    assert calls == [1]
