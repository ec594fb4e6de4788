"""fastattn::channel_pool and fastattn::dct_pool: the torch backend against independent float64
math, gradcheck, opcheck of the forward and backward ops, argument checks, backend resolution,
and (on CUDA only) the Triton kernels."""
from __future__ import annotations

import pytest
import torch

from fastattn import _ext
from fastattn.ops import _dispatch
from fastattn.ops.pool import channel_pool, dct_pool

ALL = ("mean", "max", "std")
DTYPES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(2, 5, 7, 7), (1, 3, 13, 17), (3, 70, 2, 3), (2, 4, 1, 2)]


def _views(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    # every other channel of a wider tensor: x's values, channel stride 2
    yield "channel_slice", torch.stack([x, x], 2).flatten(1, 2)[:, ::2]


def _pool64(x: torch.Tensor, kinds, eps=1e-5):
    """Independent float64 math: loops over the planes, two-pass variance."""
    B, C = x.shape[:2]
    out = {k: torch.empty(B, C, dtype=torch.float64) for k in kinds}
    for b in range(B):
        for c in range(C):
            p = x[b, c].double().reshape(-1)
            m = p.sum() / p.numel()
            if "mean" in kinds:
                out["mean"][b, c] = m
            if "max" in kinds:
                out["max"][b, c] = p.max()
            if "std" in kinds:
                out["std"][b, c] = (((p - m) ** 2).sum() / (p.numel() - 1) + eps).sqrt()
    return [out[k] for k in kinds]


# ------------------------------------------------------------------------------------------------
# channel_pool
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).replace("torch.", ""))
def test_channel_pool_forward(shape, dtype):
    x0 = torch.randn(shape, dtype=torch.float64).to(dtype)
    for kinds in (ALL, ("std", "mean"), ("max",), ("mean",)):
        want = _pool64(x0, kinds, eps=1e-3)
        for layout, x in _views(x0):
            got = channel_pool(x, kinds, eps=1e-3, backend="torch")
            assert isinstance(got, tuple) and len(got) == len(kinds)
            for k, g, w in zip(kinds, got, want):
                assert g.dtype == dtype and g.shape == shape[:2]
                tol = DTYPES[dtype]
                torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=lambda m: f"{layout} {k}: {m}")


def test_channel_pool_backward_values():
    """dx = dmean / HW + [p == argmax] dmax + dstd (x - mean) / ((HW - 1) std), written out."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    d = torch.randn(3, 2, 3, dtype=torch.float64)
    for layout, xv in _views(x):
        xv = xv.detach().requires_grad_(True)
        outs = channel_pool(xv, ALL, backend="torch")
        (dx,) = torch.autograd.grad(outs, xv, list(d))
        flat = x.flatten(2)
        mean, std = flat.mean(2), (flat.var(2) + 1e-5).sqrt()
        want = d[0][:, :, None] / 20 + d[2][:, :, None] * (flat - mean[:, :, None]) / (19 * std[:, :, None])
        want.scatter_add_(2, flat.argmax(2, keepdim=True), d[1][:, :, None])
        torch.testing.assert_close(dx, want.view_as(x), msg=layout)
        if layout == "channels_last":
            assert dx.is_contiguous(memory_format=torch.channels_last)


def test_channel_pool_std_mean_100_fp32():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64) + 100
    (std,) = channel_pool(x.float(), ["std"], backend="torch")
    torch.testing.assert_close(std.double(), _pool64(x.float(), ["std"])[0], rtol=1e-5, atol=0)


def test_channel_pool_max_gradient_goes_to_the_first_max():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 2] = x[0, 0, 2, 0] = 5.0
    x.requires_grad_(True)
    (m,) = channel_pool(x, ["max"], backend="torch")
    m.sum().backward()
    assert x.grad.nonzero().tolist() == [[0, 0, 1, 2]] and x.grad.sum() == 1


@pytest.mark.parametrize("kinds", [ALL, ("std", "max"), ("mean",), ("max", "mean")], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_channel_pool_gradcheck(kinds, layout):
    x0 = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    x = dict(_views(x0))[layout].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: channel_pool(t, kinds, backend="torch"), (x,))


def test_channel_pool_mean_alone_uses_the_cpp_kernel():
    if not _ext.available():
        pytest.skip(f"extension not built: {_ext.why_unavailable()}")
    x = torch.randn(2, 3, 5, 5)
    raw = torch.ops.fastattn.channel_pool.default(x, ["mean"], 1e-5, "torch")
    assert len(raw) == 1                               # no aux outputs: nothing to save
    torch.testing.assert_close(raw[0], torch.ops.fastattn_C.channel_mean(x))


def test_channel_pool_saves_little():
    """mean: nothing; max: the argmax only (int32); std: x (the same storage) and two (B, C) stats."""
    def saved(kinds, x):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            channel_pool(x, kinds, backend="torch")
        return packed

    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    assert all(t is None for t in saved(("mean",), x))
    s = [t for t in saved(("max", "mean"), x) if t is not None]
    assert [(t.dtype, tuple(t.shape)) for t in s] == [(torch.int32, (2, 3))]
    s = [t for t in saved(("std",), x) if t is not None]
    assert sum(t.numel() for t in s) == x.numel() + 2 * 6 and any(t.data_ptr() == x.data_ptr() for t in s)


def test_channel_pool_empty():
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4)]:
        x = torch.randn(shape, requires_grad=True)
        outs = channel_pool(x, ALL, backend="torch")
        assert [o.shape for o in outs] == [shape[:2]] * 3
        sum(o.sum() for o in outs).backward()
        assert x.grad.shape == shape


def _pool_op_args():
    x = torch.randn(2, 3, 4, 5)
    yield x, list(ALL)
    yield x.contiguous(memory_format=torch.channels_last), ["std", "mean"]
    yield torch.randn(2, 3, 4, 5, dtype=torch.float64), ["max"]
    yield torch.randn(2, 3, 4, 5, dtype=torch.bfloat16), ["mean", "max"]
    yield torch.cat([x, x], 1)[:, ::2], ["mean"]


@pytest.mark.parametrize("i", range(5))
def test_opcheck_channel_pool(i):
    x, kinds = list(_pool_op_args())[i]
    torch.library.opcheck(torch.ops.fastattn.channel_pool.default, (x.requires_grad_(True), kinds, 1e-5, "torch"))


def test_opcheck_channel_pool_backward():
    B, C, size = 2, 3, [2, 3, 4, 5]
    x = torch.randn(size)
    argmax = torch.randint(0, 20, (B, C))
    g = [torch.randn(B, C) for _ in range(3)]
    mean, std = torch.randn(B, C), torch.rand(B, C) + 1
    op = torch.ops.fastattn.channel_pool_backward.default
    for channels_last in (False, True):
        torch.library.opcheck(op, (g[0], g[1], g[2], argmax, x, mean, std, size, channels_last, "torch"))
        torch.library.opcheck(op, (None, g[1], None, argmax, None, None, None, size, channels_last, "torch"))
        torch.library.opcheck(op, (g[0], None, g[2], None, x, mean, std, size, channels_last, "torch"))


def test_compile_fullgraph():
    def f(x, w):
        mean, vmax, std = channel_pool(x, ALL, backend="torch")
        return x * torch.sigmoid(mean + vmax - std + dct_pool(x, w, backend="torch"))[:, :, None, None]

    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    w = torch.randn(8, 5, 5)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(x, w)
    torch.testing.assert_close(got, f(x, w))
    (dx,) = torch.autograd.grad(got.sum(), x)
    (dx_eager,) = torch.autograd.grad(f(x, w).sum(), x)
    torch.testing.assert_close(dx, dx_eager)


# ------------------------------------------------------------------------------------------------
# dct_pool
# ------------------------------------------------------------------------------------------------


def _dct64(x, w):
    return torch.einsum("bchw,chw->bc", x.double(), w.double())


@pytest.mark.parametrize("shape", SHAPES + [(3, 6, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).replace("torch.", ""))
def test_dct_pool_forward(shape, dtype):
    x0 = torch.randn(shape, dtype=torch.float64).to(dtype)
    w = torch.randn(shape[1:], dtype=torch.float64).to(dtype)
    want = _dct64(x0, w)
    scale = shape[2] * shape[3]
    for layout, x in _views(x0):
        got = dct_pool(x, w, backend="torch")
        assert got.dtype == dtype and got.shape == shape[:2]
        tol = DTYPES[dtype] * scale ** 0.5
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{layout}: {m}")


def test_dct_pool_backward_values():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    w = torch.randn(4, 5, 6, dtype=torch.float64)
    dy = torch.randn(3, 4, dtype=torch.float64)
    for layout, xv in _views(x):
        xv, wv = xv.detach().requires_grad_(True), w.clone().requires_grad_(True)
        dx, dw = torch.autograd.grad(dct_pool(xv, wv, backend="torch"), (xv, wv), dy)
        torch.testing.assert_close(dx, dy[:, :, None, None] * w)
        torch.testing.assert_close(dw, torch.einsum("bc,bchw->chw", dy, x))
        if layout == "channels_last":
            assert dx.is_contiguous(memory_format=torch.channels_last)


def test_dct_pool_mixed_dtypes():
    """bf16 activations with the fp32 buffer of a module: y in bf16, dweight in fp32."""
    x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 7, 7, requires_grad=True)
    y = dct_pool(x, w, backend="torch")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _dct64(x, w.detach()), rtol=1.6e-2, atol=5e-2)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_dct_pool_gradcheck(layout):
    x0 = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    x = dict(_views(x0))[layout].detach().requires_grad_(True)
    w = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: dct_pool(a, b, backend="torch"), (x, w))


def test_dct_pool_saves_little():
    def saved(x, w):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            dct_pool(x, w, backend="torch")
        return [t for t in packed if t is not None]

    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.randn(3, 4, 5)
    assert [t.shape for t in saved(x, w)] == [w.shape]                      # a buffer: x is not kept
    assert sorted(t.numel() for t in saved(x, w.requires_grad_(True))) == [w.numel(), x.numel()]


def test_opcheck_dct_pool():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.randn(3, 4, 5, requires_grad=True)
    op = torch.ops.fastattn.dct_pool.default
    torch.library.opcheck(op, (x, w, "torch"))
    torch.library.opcheck(op, (x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True),
                               w, "torch"))
    torch.library.opcheck(op, (x, w.detach(), "torch"))


def test_opcheck_dct_pool_backward():
    size = [2, 3, 4, 5]
    dy, x, w = torch.randn(2, 3), torch.randn(size), torch.randn(3, 4, 5)
    op = torch.ops.fastattn.dct_pool_backward.default
    for channels_last in (False, True):
        torch.library.opcheck(op, (dy, w, x, size, channels_last, True, "torch"))
        torch.library.opcheck(op, (dy, w, None, size, channels_last, True, "torch"))
        torch.library.opcheck(op, (dy, w, x, size, channels_last, False, "torch"))


def test_dct_pool_empty():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w = torch.randn(3, 4, 4, requires_grad=True)
    y = dct_pool(x, w, backend="torch")
    assert y.shape == (0, 3)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------------
# argument checks and backend resolution
# ------------------------------------------------------------------------------------------------


X = torch.randn(2, 3, 4, 5)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(2, 3, 4), ALL), {}, ValueError, r"channel_pool: argument 'x' must be 4-D"),
    ((torch.ones(2, 3, 4, 4, dtype=torch.int32), ALL), {}, TypeError, r"channel_pool: argument 'x' must be a floating"),
    (([1.0], ALL), {}, TypeError, r"channel_pool: argument 'x' must be a torch.Tensor"),
    ((X, "mean"), {}, TypeError, r"channel_pool: argument 'kinds' must be a sequence"),
    ((X, 3), {}, TypeError, r"channel_pool: argument 'kinds' must be a sequence"),
    ((X, ()), {}, ValueError, r"channel_pool: argument 'kinds' must be a non-empty"),
    ((X, ("mean", "min")), {}, ValueError, r"channel_pool: argument 'kinds' .*'min'"),
    ((X, ("mean", "mean")), {}, ValueError, r"channel_pool: argument 'kinds' must be .*distinct"),
    ((X, ALL), {"eps": -1.0}, ValueError, r"channel_pool: argument 'eps' must be a finite number >= 0"),
    ((X, ALL), {"eps": float("nan")}, ValueError, r"channel_pool: argument 'eps'"),
    ((X, ALL), {"eps": "1e-5"}, ValueError, r"channel_pool: argument 'eps'"),
    ((torch.randn(2, 3, 1, 1), ("std",)), {}, ValueError, r"channel_pool: argument 'x' must have H \* W >= 2"),
    ((torch.randn(2, 3, 0, 4), ("max",)), {}, ValueError, r"channel_pool: argument 'x' must have H \* W >= 1"),
    ((X, ALL), {"backend": "cudnn"}, ValueError, r"argument 'backend' must be one of"),
])
def test_channel_pool_bad_arguments(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        channel_pool(*args, **kwargs)


@pytest.mark.parametrize("args,err,match", [
    ((torch.randn(2, 3, 4), torch.randn(3, 4, 5)), ValueError, r"dct_pool: argument 'x' must be 4-D"),
    ((X.int(), torch.randn(3, 4, 5)), TypeError, r"dct_pool: argument 'x' must be a floating"),
    ((X, torch.randn(3, 20)), ValueError, r"dct_pool: argument 'weight' must be 3-D \(C, H, W\)"),
    ((X, torch.ones(3, 4, 5, dtype=torch.int64)), TypeError, r"dct_pool: argument 'weight' must be a floating"),
    ((X, [1.0]), TypeError, r"dct_pool: argument 'weight' must be a torch.Tensor"),
    ((X, torch.randn(3, 5, 4)), ValueError, r"dct_pool: argument 'weight' must have shape \(C, H, W\) = \(3, 4, 5\)"),
    ((X, torch.randn(3, 4, 5, device="meta")), ValueError, r"dct_pool: argument 'weight' must be on x's device"),
])
def test_dct_pool_bad_arguments(args, err, match):
    with pytest.raises(err, match=match):
        dct_pool(*args)


@pytest.mark.skipif(_dispatch.triton_interpreting(), reason="TRITON_INTERPRET=1 lets Triton run on CPU tensors")
def test_triton_on_cpu_raises():
    w = torch.randn(3, 4, 5)
    with pytest.raises(RuntimeError, match=r"fastattn::channel_pool: backend='triton' cannot run here: .*CUDA"):
        channel_pool(X, ALL, backend="triton")
    with pytest.raises(RuntimeError, match=r"fastattn::dct_pool: backend='triton' cannot run here: .*CUDA"):
        dct_pool(X, w, backend="triton")


def test_auto_on_cpu_runs_torch_math():
    w = torch.randn(3, 4, 5)
    with _dispatch.use_backend("auto"):
        got = channel_pool(X, ALL)
        y = dct_pool(X, w)
    for g, want in zip(got, _pool64(X, ALL)):
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), _dct64(X, w), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the Triton kernels on CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------------


GPU_SHAPES = [(8, 256, 56, 56), (16, 2048, 7, 7), (3, 70, 13, 17)]


def _gpu_close(got, want64, torch_res, dtype):
    half_ulp = 0.5 * torch.finfo(dtype).eps
    err = (got.double() - want64).abs().max().item()
    ref_err = (torch_res.double() - want64).abs().max().item()
    scale = want64.abs().max().item()
    assert err <= 2 * ref_err + half_ulp * scale + 1e-5 * (1 + scale), (err, ref_err)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_channel_pool_triton(shape, dtype, layout):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dys = [torch.randn(shape[:2], device="cuda", dtype=dtype) for _ in ALL]
    res = {}
    for backend in ("triton", "torch"):
        xx = x.detach().requires_grad_(True)
        outs = channel_pool(xx, ALL, backend=backend)
        res[backend] = (*outs, *torch.autograd.grad(outs, xx, dys))
    x64 = x.double().requires_grad_(True)
    flat = x64.flatten(2)
    want = [flat.mean(2), flat.max(2).values, (flat.var(2) + 1e-5).sqrt()]
    want.append(torch.autograd.grad(want, x64, [d.double() for d in dys])[0])
    for got, ref, w in zip(res["triton"], res["torch"], want):
        _gpu_close(got, w, ref, dtype)
    assert torch.equal(res["triton"][1], res["torch"][1])
    if layout == "channels_last":
        assert res["triton"][3].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_dct_pool_triton(shape, dtype, layout):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1:], device="cuda", dtype=dtype)
    dy = torch.randn(shape[:2], device="cuda", dtype=dtype)
    res = {}
    for backend in ("triton", "torch"):
        xx, ww = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        y = dct_pool(xx, ww, backend=backend)
        res[backend] = (y, *torch.autograd.grad(y, (xx, ww), dy))
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    y64 = dct_pool(x64, w64, backend="torch")
    want = (y64, *torch.autograd.grad(y64, (x64, w64), dy.double()))
    for got, ref, w_ in zip(res["triton"], res["torch"], want):
        _gpu_close(got, w_, ref, dtype)
    ww = w.detach().requires_grad_(True)
    (dw_again,) = torch.autograd.grad(dct_pool(x, ww, backend="triton"), ww, dy)
    assert torch.equal(dw_again, res["triton"][2])             # deterministic weight gradient


@pytest.mark.gpu
def test_gpu_gradcheck_fp64_triton():
    x = torch.randn(2, 3, 3, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: channel_pool(t, ALL, backend="triton"), (x,))
    assert torch.autograd.gradcheck(lambda a, b: dct_pool(a, b, backend="triton"), (x, w))
    torch.library.opcheck(torch.ops.fastattn.channel_pool.default, (x, list(ALL), 1e-5, "triton"))
    torch.library.opcheck(torch.ops.fastattn.dct_pool.default, (x, w, "triton"))
