"""fastattn::coord_pool and fastattn::coord_scale on the CPU (torch backend): math, gradcheck,
opcheck, errors, dispatch; GPU-marked tests of the Triton kernels on CUDA."""
import pytest
import torch
import torch.nn.functional as F

from fastattn.ops import _dispatch
from fastattn.ops.coord import coord_pool, coord_scale
from fastattn.reference.hybrid import CoordinateAttention

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = lambda d: str(d)[6:]  # noqa: E731


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "channel_slice", torch.stack([x, x], 2).flatten(1, 2)[:, ::2]      # x's values, channel stride 2
    yield "transposed", x.transpose(2, 3).contiguous().transpose(2, 3)


def math64(x, ah, aw, dxh, dxw, dy):
    """Independent float64 math, by explicit loops over the planes' axes (no broadcasting shortcuts)."""
    x, ah, aw, dxh, dxw, dy = (t.double() for t in (x, ah, aw, dxh, dxw, dy))
    B, C, H, W = x.shape
    x_h = torch.stack([x[:, :, :, w] for w in range(W)]).sum(0) / W
    x_w = torch.stack([x[:, :, h, :] for h in range(H)]).sum(0) / H
    dx_pool = torch.stack([torch.stack([dxh[:, :, h] / W + dxw[:, :, w] / H for w in range(W)], -1)
                           for h in range(H)], -2)
    y = torch.stack([torch.stack([x[:, :, h, w] * ah[:, :, h] * aw[:, :, w] for w in range(W)], -1)
                     for h in range(H)], -2)
    dx_scale = torch.stack([torch.stack([dy[:, :, h, w] * ah[:, :, h] * aw[:, :, w] for w in range(W)], -1)
                            for h in range(H)], -2)
    dah = torch.stack([sum(dy[:, :, h, w] * x[:, :, h, w] * aw[:, :, w] for w in range(W)) for h in range(H)], -1)
    daw = torch.stack([sum(dy[:, :, h, w] * x[:, :, h, w] * ah[:, :, h] for h in range(H)) for w in range(W)], -1)
    return x_h, x_w, dx_pool, y, dx_scale, dah, daw


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 3, 13, 17), (2, 4, 1, 1), (1, 2, 6, 1)], ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS)
def test_torch_backend_math(shape, dtype):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    x0 = torch.randn(shape, generator=g).to(dtype)
    ah0, aw0 = torch.rand(B, C, H, generator=g).to(dtype), torch.rand(B, C, W, generator=g).to(dtype)
    dxh, dxw = torch.randn(B, C, H, generator=g).to(dtype), torch.randn(B, C, W, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    want = math64(x0, ah0, aw0, dxh, dxw, dy)
    tol = TOL[dtype]
    for layout, xv in layouts(x0):
        x = xv.clone().requires_grad_()
        xh, xw = coord_pool(x, backend="torch")
        assert xh.dtype == xw.dtype == dtype and xh.is_contiguous() and xw.is_contiguous()
        torch.autograd.backward([xh, xw], [dxh, dxw])
        dx_pool = x.grad
        x.grad = None
        ah, aw = ah0.clone().requires_grad_(), aw0.clone().requires_grad_()
        y = coord_scale(x, ah, aw, backend="torch")
        assert y.dtype == dtype
        y.backward(dy)
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert dx_pool.is_contiguous(memory_format=torch.channels_last)
            assert x.grad.is_contiguous(memory_format=torch.channels_last)
        got = (xh, xw, dx_pool, y, x.grad, ah.grad, aw.grad)
        names = ("x_h", "x_w", "dx (pool)", "y", "dx (scale)", "da_h", "da_w")
        scales = (1, 1, 1, 1, 1, W ** 0.5, H ** 0.5)
        for a, b, name, s in zip(got, want, names, scales):
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * s, msg=lambda m: f"{layout} {name}: {m}")


def test_mixed_gate_dtypes():
    """Gates in another float dtype than x: the output keeps x's dtype, each gradient its input's."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16, requires_grad=True)
    ah = torch.rand(2, 3, 4, requires_grad=True)
    aw = torch.rand(2, 3, 5, dtype=torch.float16, requires_grad=True)
    y = coord_scale(x, ah, aw)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert ah.grad.dtype == torch.float32 and aw.grad.dtype == torch.float16


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck(layout):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ah = torch.rand(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    aw = torch.rand(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: coord_pool(t, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda *t: coord_scale(*t, backend="torch"), (x, ah, aw))


def test_opcheck():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    ah, aw = torch.rand(2, 3, 4, requires_grad=True), torch.rand(2, 3, 5, requires_grad=True)
    for xx in (x, cl):
        torch.library.opcheck(torch.ops.fastattn.coord_pool.default, (xx, "torch"))
        torch.library.opcheck(torch.ops.fastattn.coord_scale.default, (xx, ah, aw, "torch"))
        torch.library.opcheck(torch.ops.fastattn.coord_scale_backward.default,
                              (torch.randn(2, 3, 4, 5), xx.detach(), ah.detach(), aw.detach(), "torch"))
    for channels_last in (False, True):
        torch.library.opcheck(torch.ops.fastattn.coord_pool_backward.default,
                              (torch.randn(2, 3, 4), torch.randn(2, 3, 5), channels_last, "torch"))


def test_coord_pool_saves_nothing():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        xh, xw = coord_pool(x)
    assert saved == []
    (xh.sum() + xw.sum()).backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 5 + 1 / 4))


def test_coord_scale_saves_only_inputs():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    ah, aw = torch.rand(2, 3, 4, requires_grad=True), torch.rand(2, 3, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        coord_scale(x, ah, aw)
    assert len(saved) == 3 and {t.data_ptr() for t in saved} == {x.data_ptr(), ah.data_ptr(), aw.data_ptr()}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_coordinate_attention_from_ops(layout):
    """The reference CoordinateAttention rebuilt from the two ops: output and every gradient."""
    torch.manual_seed(2)
    m = CoordinateAttention(16)
    x = torch.randn(2, 16, 6, 9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = m(xr)
    want.square().sum().backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    H, W = x.shape[2:]
    x_h, x_w = coord_pool(xo)
    y = m.bn1(m.conv1(torch.cat([x_h, x_w], dim=2)[:, :, :, None]))
    y = y * F.relu6(y + 3) / 6
    y_h, y_w = torch.split(y, [H, W], dim=2)
    got = coord_scale(xo, torch.sigmoid(m.conv_h(y_h))[:, :, :, 0], torch.sigmoid(m.conv_w(y_w))[:, :, :, 0])
    got.square().sum().backward()
    torch.testing.assert_close(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for p, r in zip(m.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-5)


def test_empty_inputs():
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    xh, xw = coord_pool(x)
    y = coord_scale(x, torch.rand(0, 3, 4), torch.rand(0, 3, 5))
    (xh.sum() + xw.sum() + y.sum()).backward()
    assert xh.shape == (0, 3, 4) and xw.shape == (0, 3, 5) and y.shape == x.shape and x.grad.shape == x.shape


X = (2, 3, 4, 5)


@pytest.mark.parametrize("op,args,err,match", [
    ("pool", lambda: (torch.randn(2, 3, 4),), ValueError, r"coord_pool: argument 'x' must be 4-D"),
    ("pool", lambda: (torch.ones(X, dtype=torch.int32),), TypeError, r"coord_pool: argument 'x' must be a floating"),
    ("pool", lambda: ([1.0],), TypeError, r"coord_pool: argument 'x' must be a torch.Tensor"),
    ("scale", lambda: (torch.randn(2, 3, 4), torch.rand(2, 3, 4), torch.rand(2, 3, 5)), ValueError,
     r"coord_scale: argument 'x' must be 4-D"),
    ("scale", lambda: (torch.ones(X, dtype=torch.int64), torch.rand(2, 3, 4), torch.rand(2, 3, 5)), TypeError,
     r"coord_scale: argument 'x' must be a floating"),
    ("scale", lambda: (torch.randn(X), torch.rand(2, 3, 4, 1), torch.rand(2, 3, 5)), ValueError,
     r"coord_scale: argument 'a_h' must be 3-D"),
    ("scale", lambda: (torch.randn(X), torch.rand(2, 3, 5), torch.rand(2, 3, 5)), ValueError,
     r"coord_scale: argument 'a_h' must have shape \(B, C, H\)"),
    ("scale", lambda: (torch.randn(X), torch.ones(2, 3, 4, dtype=torch.int32), torch.rand(2, 3, 5)), TypeError,
     r"coord_scale: argument 'a_h' must be a floating"),
    ("scale", lambda: (torch.randn(X), torch.rand(2, 3, 4), torch.rand(2, 3, 4)), ValueError,
     r"coord_scale: argument 'a_w' must have shape \(B, C, W\)"),
    ("scale", lambda: (torch.randn(X), torch.rand(2, 3, 4), torch.rand(2, 5)), ValueError,
     r"coord_scale: argument 'a_w' must be 3-D"),
    ("scale", lambda: (torch.randn(X), torch.rand(2, 3, 4), "aw"), TypeError,
     r"coord_scale: argument 'a_w' must be a torch.Tensor"),
    ("scale", lambda: (torch.randn(X), torch.rand(2, 3, 4, device="meta"), torch.rand(2, 3, 5)), ValueError,
     r"coord_scale: argument 'a_h' must be on x's device"),
])
def test_bad_arguments(op, args, err, match):
    fn = coord_pool if op == "pool" else coord_scale
    with pytest.raises(err, match=match):
        fn(*args())


def test_explicit_backend_that_cannot_run_says_why():
    if _dispatch.triton_interpreting():
        pytest.skip("interpreter on")
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match=r"coord_pool: backend='triton' cannot run here: .*(CUDA tensors|not inst)"):
        coord_pool(x, backend="triton")
    with pytest.raises(RuntimeError, match=r"coord_scale: backend='triton' cannot run here: .*(CUDA tensors|not inst)"):
        coord_scale(x, torch.rand(1, 2, 3), torch.rand(1, 2, 3), backend="triton")
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run here"):
        coord_pool(x, backend="cuda")
    with pytest.raises(ValueError, match=r"argument 'backend' must be one of"):
        coord_scale(x, torch.rand(1, 2, 3), torch.rand(1, 2, 3), backend="fast")


def test_compile_fullgraph():
    def f(x):
        x_h, x_w = coord_pool(x)
        return coord_scale(x, torch.sigmoid(x_h), torch.sigmoid(x_w))

    x = torch.randn(2, 4, 5, 6)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 256, 56, 56), (4, 96, 28, 300)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS)
def test_triton_on_cuda(shape, layout, dtype):
    B, C, H, W = shape
    x0 = torch.randn(shape, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    ah0 = torch.rand(B, C, H, device="cuda", dtype=dtype)
    aw0 = torch.rand(B, C, W, device="cuda", dtype=dtype)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    res = {}
    for backend in ("triton", "torch"):
        x, ah, aw = (t.clone().requires_grad_() for t in (x0, ah0, aw0))
        xh, xw = coord_pool(x, backend=backend)
        y = coord_scale(x, ah, aw, backend=backend)
        torch.autograd.backward([xh, xw, y], [ah0, aw0, dy])
        res[backend] = (xh, xw, y, x.grad, ah.grad, aw.grad)
    if layout == "channels_last":
        assert res["triton"][2].is_contiguous(memory_format=torch.channels_last)
        assert res["triton"][3].is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for got, want, name, s in zip(res["triton"], res["torch"], ("x_h", "x_w", "y", "dx", "da_h", "da_w"),
                                  (1, 1, 1, 1, W ** 0.5, H ** 0.5)):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * s, msg=lambda m: f"{name}: {m}")
