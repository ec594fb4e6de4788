"""Triton coord_pool / coord_scale kernels (TRITON_INTERPRET=1, CPU tensors) against the torch
backend and float64 math."""
import pytest
import torch
import torch.nn.functional as F

from fastattn.kernels import coord as K
from fastattn.ops.coord import coord_pool, coord_scale
from fastattn.reference.hybrid import CoordinateAttention

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = [
    (1, 70, 7, 7),     # C crosses BLOCK_C=64 (channels_last), 7 x 7
    (1, 3, 13, 17),    # odd everything, batch 1
    (2, 5, 1, 1),      # 1x1 spatial
    (1, 2, 40, 33),    # HW > 1024: crosses BLOCK_HW (NCHW element-wise kernels)
    (1, 2, 3, 300),    # W > 256: two W blocks in NCHW (partial rows of x_h / da_h summed on the host)
    (1, 66, 3, 20),    # W > 16 with C >= 64: two W blocks in channels_last
]
DTYPE_IDS = lambda d: str(d)[6:]  # noqa: E731


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "channel_slice", torch.cat([x, x], 1)[:, ::2]


def close(got, want, tol, what, scale=1.0):
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS)
def test_coord_pool(shape, dtype):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    base = torch.randn(shape, generator=g).to(dtype)
    gh = torch.randn(B, C, H, generator=g).to(dtype)
    gw = torch.randn(B, C, W, generator=g).to(dtype)
    tol = TOL[dtype]
    for layout, x0 in layouts(base):
        outs, grads = {}, {}
        for backend in ("triton", "torch"):
            x = x0.clone().requires_grad_()
            xh, xw = coord_pool(x, backend=backend)
            assert xh.shape == (B, C, H) and xw.shape == (B, C, W) and xh.dtype == xw.dtype == dtype
            assert xh.is_contiguous() and xw.is_contiguous()
            torch.autograd.backward([xh, xw], [gh, gw])
            if layout == "channels_last":
                assert x.grad.is_contiguous(memory_format=torch.channels_last)
            outs[backend], grads[backend] = (xh, xw), x.grad
        x64 = x0.double()
        want_dx = gh.double()[:, :, :, None] / W + gw.double()[:, :, None, :] / H
        for backend in ("triton", "torch"):
            close(outs[backend][0], x64.mean(3), tol, f"{layout} {backend} x_h")
            close(outs[backend][1], x64.mean(2), tol, f"{layout} {backend} x_w")
            close(grads[backend], want_dx, tol, f"{layout} {backend} dx")
        close(outs["triton"][0], outs["torch"][0].double(), tol, f"{layout} x_h triton vs torch")
        close(grads["triton"], grads["torch"].double(), tol, f"{layout} dx triton vs torch")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS)
def test_coord_scale(shape, dtype):
    g = torch.Generator().manual_seed(1)
    B, C, H, W = shape
    base = torch.randn(shape, generator=g).to(dtype)
    ah0 = torch.rand(B, C, H, generator=g).to(dtype)
    aw0 = torch.rand(B, C, W, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    tol = TOL[dtype]
    for layout, x0 in layouts(base):
        res = {}
        for backend in ("triton", "torch"):
            x, ah, aw = (t.clone().requires_grad_() for t in (x0, ah0, aw0))
            y = coord_scale(x, ah, aw, backend=backend)
            assert y.shape == shape and y.dtype == dtype
            if layout == "channels_last":
                assert y.is_contiguous(memory_format=torch.channels_last)
            y.backward(dy)
            res[backend] = (y, x.grad, ah.grad, aw.grad)
        x64, ah64, aw64, dy64 = x0.double(), ah0.double()[:, :, :, None], aw0.double()[:, :, None, :], dy.double()
        want = (x64 * aw64 * ah64, dy64 * aw64 * ah64, (dy64 * x64 * aw64).sum(3), (dy64 * x64 * ah64).sum(2))
        names = ("y", "dx", "da_h", "da_w")
        scales = (1.0, 1.0, W ** 0.5, H ** 0.5)
        for backend in ("triton", "torch"):
            for got, w, name, s in zip(res[backend], want, names, scales):
                close(got, w, tol, f"{layout} {backend} {name}", s)
        for got, w, name, s in zip(res["triton"], res["torch"], names, scales):
            close(got, w.double(), tol, f"{layout} {name} triton vs torch", s)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float64_through_triton(layout):
    """float64 inputs run the kernels in float64: agreement to rounding."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 67, 9, 19, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ah = torch.rand(1, 67, 9, generator=g, dtype=torch.float64)
    aw = torch.rand(1, 67, 19, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    xh, xw = K.coord_pool_forward(x)
    torch.testing.assert_close(xh, x.mean(3), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(xw, x.mean(2), rtol=1e-12, atol=1e-14)
    dx, dah, daw = K.coord_scale_backward(dy, x, ah, aw)
    torch.testing.assert_close(dah, (dy * x * aw[:, :, None, :]).sum(3), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(daw, (dy * x * ah[:, :, :, None]).sum(2), rtol=1e-12, atol=1e-13)


def test_expanded_and_partial_gradients():
    """dy may be a broadcast view (stride 0); an unused output of coord_pool gets a zero gradient."""
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    ah, aw = torch.rand(2, 3, 4, requires_grad=True), torch.rand(2, 3, 5, requires_grad=True)
    y = coord_scale(x, ah, aw, backend="triton")
    y.backward(torch.ones(1, 1, 1, 1).expand(2, 3, 4, 5))
    torch.testing.assert_close(x.grad, (aw.detach()[:, :, None, :] * ah.detach()[:, :, :, None]))
    torch.testing.assert_close(ah.grad, (x.detach() * aw.detach()[:, :, None, :]).sum(3))
    x.grad = None
    coord_pool(x, backend="triton")[0].sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2, 3, 4, 5), 1 / 5))


def test_exotic_view_gradient_strides():
    """A transposed plane (H x W not flattenable) reads in place in the plane walkers."""
    x0 = torch.randn(2, 3, 6, 5).transpose(2, 3)
    x = x0.clone().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()   # same values, odd strides
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    xh, xw = coord_pool(x, backend="triton")
    torch.testing.assert_close(xh, x0.mean(3))
    torch.testing.assert_close(xw, x0.mean(2))
    ah, aw = torch.rand(2, 3, 5), torch.rand(2, 3, 6)
    torch.testing.assert_close(coord_scale(x, ah, aw, backend="triton"), x0 * aw[:, :, None, :] * ah[:, :, :, None])


def test_empty_batch():
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    ah, aw = torch.rand(0, 3, 4, requires_grad=True), torch.rand(0, 3, 5, requires_grad=True)
    xh, xw = coord_pool(x, backend="triton")
    (xh.sum() + xw.sum()).backward()
    assert xh.shape == (0, 3, 4) and xw.shape == (0, 3, 5) and x.grad.shape == x.shape
    x.grad = None
    y = coord_scale(x, ah, aw, backend="triton")
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and ah.grad.shape == ah.shape and aw.grad.shape == aw.shape


def test_deterministic_partial_sums():
    """Split H and W blocks: the partial rows are added in a fixed order (no atomics)."""
    x = torch.randn(1, 2, 37, 300, requires_grad=True)
    ah, aw = torch.rand(1, 2, 37, requires_grad=True), torch.rand(1, 2, 300, requires_grad=True)
    runs = []
    for _ in range(2):
        ah.grad = aw.grad = None
        coord_scale(x, ah, aw, backend="triton").sum().backward()
        runs.append((ah.grad.clone(), aw.grad.clone(), *coord_pool(x.detach(), backend="triton")))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_coordinate_attention_from_ops(layout):
    """The reference CoordinateAttention rebuilt from the two ops: output and every gradient."""
    torch.manual_seed(3)
    m = CoordinateAttention(24).eval()
    x = torch.randn(2, 24, 7, 9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = m(xr)
    want.square().sum().backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    H, W = x.shape[2:]
    x_h, x_w = coord_pool(xo, backend="triton")
    y = m.bn1(m.conv1(torch.cat([x_h, x_w], dim=2)[:, :, :, None]))
    y = y * F.relu6(y + 3) / 6
    y_h, y_w = torch.split(y, [H, W], dim=2)
    a_h = torch.sigmoid(m.conv_h(y_h))[:, :, :, 0]
    a_w = torch.sigmoid(m.conv_w(y_w))[:, :, :, 0]
    got = coord_scale(xo, a_h, a_w, backend="triton")
    got.square().sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for p, r in zip(m.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed"])
def test_opcheck_triton(layout):
    """The fake impls promise the strides the Triton path returns (transposed: a copied exotic view)."""
    x = torch.randn(2, 3, 4, 5)
    x = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
         "transposed": x.transpose(2, 3).contiguous().transpose(2, 3)}[layout].requires_grad_()
    ah, aw = torch.rand(2, 3, 4, requires_grad=True), torch.rand(2, 3, 5, requires_grad=True)
    ops = torch.ops.fastattn
    torch.library.opcheck(ops.coord_pool.default, (x, "triton"))
    torch.library.opcheck(ops.coord_scale.default, (x, ah, aw, "triton"))
    torch.library.opcheck(ops.coord_scale_backward.default,
                          (torch.randn(2, 3, 4, 5), x.detach(), ah.detach(), aw.detach(), "triton"))
    torch.library.opcheck(ops.coord_pool_backward.default,
                          (torch.randn(2, 3, 4), torch.randn(2, 3, 5), layout == "channels_last", "triton"))
