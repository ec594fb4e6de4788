"""fastattn::channel_pool and fastattn::dct_pool: the Triton kernels (under TRITON_INTERPRET=1, on
CPU tensors) against the torch backend and the float64 math, forward and every gradient."""
from __future__ import annotations

import pytest
import torch

from fastattn.ops.pool import channel_pool, dct_pool

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "channel_slice"]
ALL = ("std", "max", "mean")
# (shape, layouts): odd C, 7x7, batch 1 with 13x17 (several HW splits in channels_last),
# C = 70 across BLOCK_C = 64 (both layouts: NCHW packs 64 planes of 15 per tile), HW = 1200
# across BLOCK_HW = 1024 in NCHW.
SHAPES = [
    ((2, 5, 7, 7), LAYOUTS),
    ((1, 3, 13, 17), LAYOUTS),
    ((2, 70, 3, 5), LAYOUTS),
    ((1, 2, 40, 30), ["nchw"]),
]
SPATIAL_1x1 = (3, 6, 1, 1)


def _ids(d):
    return str(d).replace("torch.", "")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":
        # every other channel of a wider tensor: x's values, channel stride 2
        return torch.stack([x, x], 2).flatten(1, 2)[:, ::2]
    return x


def _input(shape, dtype, layout, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return _layout((torch.randn(shape, generator=g, dtype=torch.float64) + shift).to(dtype), layout)


def _close(got, want64, torch_res, name):
    """At most 2x as far from the float64 math as the torch backend's own result in that dtype,
    plus a small atol: one rounding to the dtype (half an ulp of the largest value; a whole ulp
    for bf16, which the interpreter truncates instead of rounding) and 1e-5."""
    if got.numel() == 0:
        return
    half_ulp = (1.0 if got.dtype == torch.bfloat16 else 0.5) * torch.finfo(got.dtype).eps
    got, torch_res = got.double(), torch_res.double()
    err = (got - want64).abs().max().item()
    scale = want64.abs().max().item()
    ref_err = (torch_res - want64).abs().max().item()
    atol = half_ulp * scale + 1e-5 * (1 + scale)
    assert err <= 2 * ref_err + atol, f"{name}: error {err:.3g}, torch backend's {ref_err:.3g}, atol {atol:.3g}"


def _pool64(x64: torch.Tensor, kinds, eps=1e-5):
    flat = x64.flatten(2)
    math = {"mean": lambda: flat.mean(2), "max": lambda: flat.max(2).values,
            "std": lambda: (flat.var(2) + eps).sqrt()}
    return [math[k]() for k in kinds]


def _run_pool(x, kinds, dys, backend):
    x = x.detach().requires_grad_(True)
    outs = channel_pool(x, kinds, backend=backend)
    (dx,) = torch.autograd.grad(outs, x, dys)
    return outs, dx


def _check_pool(x, kinds):
    g = torch.Generator().manual_seed(1)
    dys = [torch.randn(x.shape[:2], generator=g, dtype=torch.float64).to(x.dtype) for _ in kinds]
    outs, dx = _run_pool(x, kinds, dys, "triton")
    outs_t, dx_t = _run_pool(x, kinds, dys, "torch")
    # float64 math on the same (rounded) input: the argmax ties resolve as in the kernels
    x64 = x.detach().double().requires_grad_(True)
    want = _pool64(x64, kinds)
    (dx64,) = torch.autograd.grad(want, x64, [d.double() for d in dys])
    for k, o, o_t, w in zip(kinds, outs, outs_t, want):
        assert o.dtype == x.dtype and o.shape == x.shape[:2]
        if k == "max":
            assert torch.equal(o, o_t), "max must be exact"
        _close(o, w, o_t, k)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    _close(dx, dx64, dx_t, "dx")
    return dx


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape,layouts", SHAPES, ids=lambda s: str(s) if isinstance(s, tuple) else "")
def test_channel_pool(shape, layouts, dtype):
    for layout in layouts:
        x = _input(shape, dtype, layout)
        dx = _check_pool(x, ALL)
        if layout == "channels_last":
            assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kinds", [("mean",), ("max",), ("std",), ("max", "mean"), ("mean", "std")], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_pool_subsets(kinds, layout):
    _check_pool(_input((2, 5, 7, 7), torch.float32, layout), kinds)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_pool_1x1_spatial(layout):
    _check_pool(_input(SPATIAL_1x1, torch.float32, layout), ("max", "mean"))


def test_channel_pool_std_mean_100():
    """std of planes of mean 100 and std 1 in fp32 keeps ~1e-6 relative precision (no E[x^2] - E[x]^2)."""
    cases = [((1, 1, 64, 64), "nchw"), ((2, 3, 13, 17), "channels_last"), ((1, 70, 9, 9), "channels_last")]
    for shape, layout in cases:
        x = _input(shape, torch.float32, layout, shift=100.0)
        (std,) = channel_pool(x, ["std"], backend="triton")
        (want,) = _pool64(x.double(), ["std"])
        torch.testing.assert_close(std.double(), want, rtol=1e-5, atol=0)


def test_channel_pool_max_ties_and_nan():
    """Ties go to the first position (also across HW splits), NaN wins, as in torch."""
    x = torch.zeros(1, 2, 64, 64)                       # NCHW: 4 tiles, split over several programs
    x[0, :, 10, 5] = x[0, :, 50, 1] = x[0, :, 60, 0] = 3.0
    x[0, 1, 40, 3] = x[0, 1, 62, 3] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    for layout in ["nchw", "channels_last"]:
        xx = _layout(x, layout).detach().requires_grad_(True)
        (m,) = channel_pool(xx, ["max"], backend="triton")
        assert m[0, 0] == 3.0 and torch.isnan(m[0, 1])
        m.sum().backward()
        assert xx.grad.nonzero().tolist() == [[0, 0, 10, 5], [0, 1, 40, 3]]
    y = torch.full((1, 70, 3, 3), float("-inf")).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    (m,) = channel_pool(y, ["max"], backend="triton")
    m.sum().backward()
    assert (m == float("-inf")).all() and (y.grad[:, :, 0, 0] == 1).all() and y.grad.sum() == 70


def test_channel_pool_gradcheck_fp64():
    x = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: channel_pool(t, ALL, backend="triton"), (x,))


def test_channel_pool_empty_batch():
    for layout in ["nchw", "channels_last"]:
        x = _layout(torch.randn(0, 4, 5, 5), layout).requires_grad_(True)
        outs = channel_pool(x, ALL, backend="triton")
        assert [o.shape for o in outs] == [(0, 4)] * 3
        sum(o.sum() for o in outs).backward()
        assert x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------
# dct_pool
# ------------------------------------------------------------------------------------------------


def _run_dct(x, w, dy, backend):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    y = dct_pool(x, w, backend=backend)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


def _check_dct(x, w):
    dy = torch.randn(x.shape[:2], generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(x.dtype)
    y, dx, dw = _run_dct(x, w, dy, "triton")
    y_t, dx_t, dw_t = _run_dct(x, w, dy, "torch")
    y64, dx64, dw64 = _run_dct(x.double(), w.double(), dy.double(), "torch")
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    assert dx.shape == x.shape and dw.shape == w.shape and dw.stride() == torch.empty_like(w).stride()
    _close(y, y64, y_t, "y")
    _close(dx, dx64, dx_t, "dx")
    _close(dw, dw64, dw_t, "dweight")
    return dx


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape,layouts", SHAPES + [((3, 6, 1, 1), LAYOUTS)],
                         ids=lambda s: str(s) if isinstance(s, tuple) else "")
def test_dct_pool(shape, layouts, dtype):
    w = _input(shape[1:], dtype, "nchw", seed=3)
    for layout in layouts:
        dx = _check_dct(_input(shape, dtype, layout), w)
        if layout == "channels_last":
            assert dx.is_contiguous(memory_format=torch.channels_last)


def test_dct_pool_weight_views_and_dtypes():
    x = _input((2, 5, 7, 6), torch.bfloat16, "channels_last")
    w32 = torch.randn(5, 6, 7).transpose(1, 2)          # fp32 weight, H x W does not flatten: copied
    _check_dct(x, w32)
    _check_dct(_input((2, 5, 7, 6), torch.float32, "nchw"), torch.randn(5, 7, 12)[:, :, ::2])


def test_dct_pool_only_one_gradient():
    x = _input((2, 5, 7, 7), torch.float32, "channels_last")
    w = torch.randn(5, 7, 7)
    y = dct_pool(x.requires_grad_(True), w, backend="triton")    # weight a buffer: x not saved
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, w.expand(2, 5, 7, 7).contiguous())
    y = dct_pool(x.detach(), w.requires_grad_(True), backend="triton")
    (dw,) = torch.autograd.grad(y.sum(), w)
    torch.testing.assert_close(dw, x.detach().sum(0), rtol=1e-5, atol=1e-5)


def test_dct_pool_weight_grad_is_deterministic():
    """dweight splits the batch over programs (5 samples, 3 splits here) and adds the splits on the
    host: bitwise the same on every run."""
    x = _input((5, 2, 6, 6), torch.float32, "nchw")
    w = torch.randn(2, 6, 6)
    dy = torch.randn(5, 2)
    runs = [_run_dct(x, w, dy, "triton")[2] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], _run_dct(x, w, dy, "torch")[2], rtol=1e-5, atol=1e-5)


def test_dct_pool_gradcheck_fp64():
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: dct_pool(a, b, backend="triton"), (x, w))


def test_dct_pool_empty_batch():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 5, 5, requires_grad=True)
    y = dct_pool(x, w, backend="triton")
    assert y.shape == (0, 4)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------------
# opcheck with the Triton backend: the fake implementations match the kernels' outputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_triton(layout):
    x = _input((2, 3, 4, 5), torch.float32, layout).requires_grad_(True)
    w = torch.randn(3, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.fastattn.channel_pool.default, (x, list(ALL), 1e-5, "triton"))
    torch.library.opcheck(torch.ops.fastattn.dct_pool.default, (x, w, "triton"))
    dy = torch.randn(2, 3)
    argmax = torch.randint(0, 20, (2, 3))
    stats = (torch.randn(2, 3), torch.rand(2, 3) + 1)
    cl = layout == "channels_last"
    torch.library.opcheck(torch.ops.fastattn.channel_pool_backward.default,
                          (dy, dy, dy, argmax, x.detach(), *stats, [2, 3, 4, 5], cl, "triton"))
    torch.library.opcheck(torch.ops.fastattn.dct_pool_backward.default,
                          (dy, w.detach(), x.detach(), [2, 3, 4, 5], cl, True, "triton"))
