"""fastattn::bin_mean: the torch backend against independent float64 math and the PyTorch pools,
gradcheck, opcheck of the forward and backward ops, argument checks, backend resolution, and (on
CUDA only) the Triton kernels."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastattn.ops import _dispatch
from fastattn.ops.bins import bin_grid, bin_mean

DTYPES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SPP = (1, 2, 4)
# (shape, levels, mode): the odd sizes of the brief (overlapping adaptive bins on 6 x 5, clipped
# border tiles on 10 x 9 with k = 4, one tile on 7 x 7 with k = 7, H = 1), C not a power of two.
CASES = [
    ((2, 5, 6, 5), SPP, "adaptive"),
    ((1, 3, 13, 17), (1, 3, 6), "adaptive"),
    ((2, 3, 1, 6), SPP, "adaptive"),
    ((3, 7, 1, 1), SPP, "adaptive"),
    ((2, 5, 10, 9), (4,), "tiles"),
    ((2, 5, 7, 7), (7,), "tiles"),
    ((2, 5, 1, 6), (4,), "tiles"),
    ((1, 70, 5, 11), (3,), "tiles"),
]


def _ids(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _views(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    # every other channel of a wider tensor: x's values, channel stride 2
    yield "channel_slice", torch.stack([x, x], 2).flatten(1, 2)[:, ::2]


def _bounds(size, level, mode):
    """Independent bin bounds along one axis, from the definitions with real division."""
    if mode == "adaptive":
        return [(math.floor(i * size / level), math.ceil((i + 1) * size / level)) for i in range(level)]
    return [(i * level, min(i * level + level, size)) for i in range(math.ceil(size / level))]


def _bin_mean64(x, levels, mode):
    """Independent float64 math: one explicit mean per bin."""
    B, C, H, W = x.shape
    cols = []
    for n in levels:
        for h0, h1 in _bounds(H, n, mode):
            for w0, w1 in _bounds(W, n, mode):
                cols.append(x[:, :, h0:h1, w0:w1].double().sum(dim=(2, 3)) / ((h1 - h0) * (w1 - w0)))
    return torch.stack(cols, 2)


def _bin_mean_grad64(dy, shape, levels, mode):
    """dx of _bin_mean64: each bin spreads dy / area over its positions."""
    B, C, H, W = shape
    dx = torch.zeros(shape, dtype=torch.float64)
    i = 0
    for n in levels:
        for h0, h1 in _bounds(H, n, mode):
            for w0, w1 in _bounds(W, n, mode):
                dx[:, :, h0:h1, w0:w1] += (dy[:, :, i] / ((h1 - h0) * (w1 - w0)))[:, :, None, None]
                i += 1
    return dx


def _pools64(x, levels, mode):
    B, C = x.shape[:2]
    x = x.double()
    if mode == "adaptive":
        return torch.cat([F.adaptive_avg_pool2d(x, n).reshape(B, C, -1) for n in levels], 2)
    (k,) = levels
    return F.avg_pool2d(x, k, k, ceil_mode=True).reshape(B, C, -1)


def _n_bins(shape, levels, mode):
    return sum(nh * nw for nh, nw in bin_grid(shape[2], shape[3], levels, mode))


@pytest.mark.parametrize("shape,levels,mode", CASES, ids=_ids)
def test_bins_match_the_pytorch_pools(shape, levels, mode):
    """The independent math of this file is the definition: the PyTorch pools agree with it (the
    avg_pool2d ceil-mode border tiles are averaged over their clipped area), and so does bin_grid."""
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(_pools64(x, levels, mode), _bin_mean64(x, levels, mode), rtol=1e-12, atol=1e-12)
    grid = bin_grid(shape[2], shape[3], levels, mode)
    if mode == "adaptive":
        assert grid == [(n, n) for n in levels]
    else:
        assert grid == [tuple(F.avg_pool2d(x, levels[0], levels[0], ceil_mode=True).shape[2:])]


@pytest.mark.parametrize("shape,levels,mode", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).replace("torch.", ""))
def test_bin_mean_forward(shape, levels, mode, dtype):
    x0 = torch.randn(shape, dtype=torch.float64).to(dtype)
    want = _bin_mean64(x0, levels, mode)
    for layout, x in _views(x0):
        got = bin_mean(x, levels, mode=mode, backend="torch")
        assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
        tol = DTYPES[dtype]
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{layout}: {m}")
        offset = 0
        for n, (nh, nw) in zip(levels, bin_grid(shape[2], shape[3], levels, mode)):
            pool = F.adaptive_avg_pool2d(x, n) if mode == "adaptive" else F.avg_pool2d(x, n, n, ceil_mode=True)
            torch.testing.assert_close(got[:, :, offset:offset + nh * nw].reshape(pool.shape), pool, rtol=tol, atol=tol)
            offset += nh * nw


@pytest.mark.parametrize("shape,levels,mode", CASES, ids=_ids)
def test_bin_mean_backward_values(shape, levels, mode):
    x = torch.randn(shape, dtype=torch.float64)
    dy = torch.randn(*shape[:2], _n_bins(shape, levels, mode), dtype=torch.float64)
    want = _bin_mean_grad64(dy, shape, levels, mode)
    for layout, xv in _views(x):
        xv = xv.detach().requires_grad_(True)
        (dx,) = torch.autograd.grad(bin_mean(xv, levels, mode=mode, backend="torch"), xv, dy)
        torch.testing.assert_close(dx, want, msg=layout)
        if layout == "channels_last":
            assert dx.is_contiguous(memory_format=torch.channels_last)


def test_bin_mean_backward_16bit():
    x = torch.randn(2, 5, 6, 5, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 5, 21, dtype=torch.bfloat16)
    (dx,) = torch.autograd.grad(bin_mean(x, SPP, mode="adaptive", backend="torch"), x, dy)
    assert dx.dtype == torch.bfloat16
    torch.testing.assert_close(dx.double(), _bin_mean_grad64(dy.double(), x.shape, SPP, "adaptive"),
                               rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("levels,mode", [(SPP, "adaptive"), ((2,), "tiles"), ((3,), "tiles")], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_bin_mean_gradcheck(levels, mode, layout):
    x0 = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    x = dict(_views(x0))[layout].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: bin_mean(t, levels, mode=mode, backend="torch"), (x,))


@pytest.mark.parametrize("levels,mode", [(SPP, "adaptive"), ((3,), "tiles")], ids=str)
def test_bin_mean_gradgradcheck(levels, mode):
    """The backward op is differentiable too (its adjoint is the forward)."""
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: bin_mean(t, levels, mode=mode, backend="torch"), (x,))


def test_bin_mean_saves_nothing():
    packed = []
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        bin_mean(x, SPP, mode="adaptive", backend="torch")
        bin_mean(x, (4,), mode="tiles", backend="torch")
    assert [t for t in packed if t is not None] == []


def test_bin_mean_empty():
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4)]:
        x = torch.randn(shape, requires_grad=True)
        for levels, mode, n in [(SPP, "adaptive", 21), ((3,), "tiles", 4)]:
            y = bin_mean(x, levels, mode=mode, backend="torch")
            assert y.shape == (*shape[:2], n)
            (dx,) = torch.autograd.grad(y.sum(), x)
            assert dx.shape == shape


def _op_args():
    x = torch.randn(2, 3, 6, 5)
    yield x, list(SPP), "adaptive"
    yield x.contiguous(memory_format=torch.channels_last), [4], "tiles"
    yield torch.randn(2, 3, 10, 9, dtype=torch.float64), [4], "tiles"
    yield torch.randn(2, 3, 7, 7, dtype=torch.bfloat16), [1, 3], "adaptive"
    yield torch.cat([x, x], 1)[:, ::2], list(SPP), "adaptive"


@pytest.mark.parametrize("i", range(5))
def test_opcheck_bin_mean(i):
    x, levels, mode = list(_op_args())[i]
    torch.library.opcheck(torch.ops.fastattn.bin_mean.default, (x.requires_grad_(True), levels, mode, "torch"))


def test_opcheck_bin_mean_backward():
    op = torch.ops.fastattn.bin_mean_backward.default
    for channels_last in (False, True):
        torch.library.opcheck(op, (torch.randn(2, 3, 21), [2, 3, 6, 5], list(SPP), "adaptive", channels_last, "torch"))
        torch.library.opcheck(op, (torch.randn(2, 3, 9), [2, 3, 10, 9], [4], "tiles", channels_last, "torch"))


def test_compile_fullgraph():
    def f(x):
        s = bin_mean(x, SPP, mode="adaptive", backend="torch")
        t = bin_mean(x, (4,), mode="tiles", backend="torch")
        return x * torch.sigmoid(s.mean(2) + t.amax(2))[:, :, None, None]

    x = torch.randn(2, 8, 10, 9, requires_grad=True)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, f(x))
    (dx,) = torch.autograd.grad(got.sum(), x)
    (dx_eager,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(dx, dx_eager)


# ------------------------------------------------------------------------------------------------
# argument checks and backend resolution
# ------------------------------------------------------------------------------------------------


X = torch.randn(2, 3, 6, 5)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(2, 3, 4), SPP), {"mode": "adaptive"}, ValueError, r"bin_mean: argument 'x' must be 4-D"),
    ((X.int(), SPP), {"mode": "adaptive"}, TypeError, r"bin_mean: argument 'x' must be a floating"),
    (([1.0], SPP), {"mode": "adaptive"}, TypeError, r"bin_mean: argument 'x' must be a torch.Tensor"),
    ((torch.randn(2, 3, 0, 5), SPP), {"mode": "adaptive"}, ValueError, r"bin_mean: argument 'x' must have H >= 1"),
    ((X, SPP), {"mode": "max"}, ValueError, r"bin_mean: argument 'mode' must be one of"),
    ((X, 4), {"mode": "tiles"}, TypeError, r"bin_mean: argument 'levels' must be a sequence of one"),
    ((X, "124"), {"mode": "adaptive"}, TypeError, r"bin_mean: argument 'levels' must be a non-empty sequence"),
    ((X, ()), {"mode": "adaptive"}, ValueError, r"bin_mean: argument 'levels' must be a non-empty"),
    ((X, (1, 0)), {"mode": "adaptive"}, ValueError, r"bin_mean: argument 'levels' .*\(1, 0\)"),
    ((X, (2.0,)), {"mode": "adaptive"}, ValueError, r"bin_mean: argument 'levels' .*positive ints"),
    ((X, (True,)), {"mode": "adaptive"}, ValueError, r"bin_mean: argument 'levels'"),
    ((X, (2, 4)), {"mode": "tiles"}, ValueError, r"bin_mean: argument 'levels' must be a sequence of one .*tiles"),
    ((X, (-1,)), {"mode": "tiles"}, ValueError, r"bin_mean: argument 'levels'"),
    ((X, SPP), {"mode": "adaptive", "backend": "cudnn"}, ValueError, r"argument 'backend' must be one of"),
])
def test_bin_mean_bad_arguments(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        bin_mean(*args, **kwargs)


def test_mode_is_keyword_only():
    with pytest.raises(TypeError):
        bin_mean(X, SPP, "adaptive")


@pytest.mark.skipif(_dispatch.triton_interpreting(), reason="TRITON_INTERPRET=1 lets Triton run on CPU tensors")
def test_triton_on_cpu_raises():
    with pytest.raises(RuntimeError, match=r"fastattn::bin_mean: backend='triton' cannot run here: .*CUDA"):
        bin_mean(X, SPP, mode="adaptive", backend="triton")


def test_auto_on_cpu_runs_torch_math():
    with _dispatch.use_backend("auto"):
        got = bin_mean(X, SPP, mode="adaptive")
    torch.testing.assert_close(got.double(), _bin_mean64(X, SPP, "adaptive"), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the Triton kernels on CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------------


GPU_CASES = [((8, 256, 56, 56), SPP, "adaptive"), ((16, 512, 14, 14), SPP, "adaptive"),
             ((8, 256, 56, 56), (7,), "tiles"), ((4, 70, 13, 17), (4,), "tiles")]


def _gpu_close(got, want64, torch_res, dtype):
    half_ulp = 0.5 * torch.finfo(dtype).eps
    err = (got.double() - want64).abs().max().item()
    ref_err = (torch_res.double() - want64).abs().max().item()
    scale = want64.abs().max().item()
    assert err <= 2 * ref_err + half_ulp * scale + 1e-5 * (1 + scale), (err, ref_err)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,levels,mode", GPU_CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_bin_mean_triton(shape, levels, mode, dtype, layout):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    N = _n_bins(shape, levels, mode)
    dy = torch.randn(*shape[:2], N, device="cuda", dtype=dtype)
    res = {}
    for backend in ("triton", "torch"):
        xx = x.detach().requires_grad_(True)
        y = bin_mean(xx, levels, mode=mode, backend=backend)
        res[backend] = (y, *torch.autograd.grad(y, xx, dy))
    x64 = x.double().requires_grad_(True)
    y64 = _pools64(x64, levels, mode)
    want = (y64, *torch.autograd.grad(y64, x64, dy.double()))
    for got, ref, w in zip(res["triton"], res["torch"], want):
        _gpu_close(got, w, ref, dtype)
    if layout == "channels_last":
        assert res["triton"][1].is_contiguous(memory_format=torch.channels_last)
    again = bin_mean(x, levels, mode=mode, backend="triton")
    assert torch.equal(again, res["triton"][0])                 # deterministic


@pytest.mark.gpu
def test_gpu_gradcheck_fp64_triton():
    x = torch.randn(2, 3, 6, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    for levels, mode in [(SPP, "adaptive"), ((4,), "tiles")]:
        assert torch.autograd.gradcheck(lambda t: bin_mean(t, levels, mode=mode, backend="triton"), (x,))
        torch.library.opcheck(torch.ops.fastattn.bin_mean.default, (x, list(levels), mode, "triton"))
