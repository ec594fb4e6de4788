"""Triton spatial kernels (TRITON_INTERPRET=1, CPU tensors) against the torch backend and float64 math:
spatial_pool, spatial_scale, zpool; forward and every gradient."""
import pytest
import torch

import fastattn.kernels.spatial as kspatial
from fastattn.ops.spatial import spatial_pool, spatial_scale, zpool

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (2, 70, 5, 7): C crosses BLOCK_C=64 (channels_last) and 32 (NCHW) and splits the channels over programs;
# (1, 2, 40, 33): H*W = 1320 crosses BLOCK_P=256; odd maps, C not a power of two, 1x1 maps, batch 1.
SHAPES = [(2, 70, 5, 7), (1, 3, 13, 17), (2, 5, 1, 1), (1, 2, 40, 33), (3, 6, 7, 7)]
DTYPE_IDS = lambda d: str(d)[6:]  # noqa: E731


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    # every other channel of a wider tensor (torch.cat([x, x], 1)[:, ::2] would repeat channels: max ties)
    wide = torch.randn(x.shape[0], 2 * x.shape[1], *x.shape[2:]).to(x.dtype)
    wide[:, ::2] = x
    yield "channel_slice", wide[:, ::2]


def _close(got, want, tol, what, scale=1.0):
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _grads(fn, inputs, dy):
    ins = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*ins)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in ins]


def _untied(shape, dtype, g, dim):
    """Random values, all distinct along `dim` even after rounding to bf16 (max ties would make the
    float64 gradient split between channels): a random permutation of ranks / 8, plus small noise."""
    ranks = torch.rand(shape, generator=g).argsort(dim).argsort(dim).float()
    x = (ranks - shape[dim] / 2) / 8 + 0.01 * torch.randn(shape, generator=g)
    return x.to(dtype)


def _pool64(x, a):
    v = x if a is None else x * a[:, :, None, None]
    return torch.stack((v.amax(1), v.mean(1)), 1)


def _zpool64(x, dim):
    """The official Triplet attention computation: permute so that `dim` comes first, then Z-pool dim 1."""
    xp = {1: x, 2: x.permute(0, 2, 1, 3), 3: x.permute(0, 3, 2, 1)}[dim]
    return torch.stack((xp.amax(1), xp.mean(1)), 1)


# --------------------------------------------------------------------------------------
# spatial_pool
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS)
@pytest.mark.parametrize("with_a", [True, False], ids=["a", "no_a"])
def test_spatial_pool(shape, dtype, with_a):
    g = torch.Generator().manual_seed(0)
    base = _untied(shape, dtype, g, 1)
    a0 = torch.rand(shape[:2], generator=g) + 0.1 if with_a else None
    dy = torch.randn(shape[0], 2, *shape[2:], generator=g).to(dtype)
    tol = TOL[dtype]
    for layout, x0 in layouts(base):
        y, (dx, da) = _grads(lambda x, a: spatial_pool(x, a, backend="triton"), [x0, a0], dy)
        yt, (dxt, dat) = _grads(lambda x, a: spatial_pool(x, a, backend="torch"), [x0, a0], dy)
        assert y.dtype == dtype and y.shape == (shape[0], 2, *shape[2:])
        assert y.stride() == yt.stride()
        if layout == "channels_last":
            assert dx.is_contiguous(memory_format=torch.channels_last)
        # against the torch backend (same fp32 math) ...
        _close(y, yt.double(), tol, f"{layout} y vs torch")
        _close(dx, dxt.double(), tol, f"{layout} dx vs torch")
        # ... and against autograd of the float64 math on the same (rounded) inputs
        x64 = x0.double().requires_grad_()
        a64 = a0.double().requires_grad_() if with_a else None
        y64 = _pool64(x64, a64)
        y64.backward(dy.double())
        _close(y, y64.detach(), tol, f"{layout} y")
        _close(dx, x64.grad, tol, f"{layout} dx")
        if with_a:
            assert da.dtype == a0.dtype
            _close(dat, a64.grad, tol, f"{layout} da torch", scale=shape[2] * shape[3] ** 0.5)
            _close(da, a64.grad, tol, f"{layout} da", scale=shape[2] * shape[3] ** 0.5)


def test_spatial_pool_split_channels_matches_single_program(monkeypatch):
    """Channel splits combined on the host give the same result as one program per pixel block."""
    x = torch.randn(2, 300, 3, 5)
    a = torch.rand(2, 300)
    monkeypatch.setattr(kspatial, "num_programs_hint", lambda t: 1)
    one = spatial_pool(x, a, backend="triton")
    monkeypatch.setattr(kspatial, "num_programs_hint", lambda t: 64)
    many = spatial_pool(x, a, backend="triton")
    torch.testing.assert_close(many, one)
    torch.testing.assert_close(one, _pool64(x.double(), a.double()).float())


def test_spatial_pool_ties_go_to_the_first_channel():
    x = torch.ones(1, 4, 2, 3)
    x[:, 2] = -1.0
    y = spatial_pool(x.requires_grad_(), backend="triton")
    y.backward(torch.cat([torch.ones(1, 1, 2, 3), torch.zeros(1, 1, 2, 3)], 1))
    want = torch.zeros(1, 4, 2, 3)
    want[:, 0] = 1.0
    assert torch.equal(x.grad, want)


def test_spatial_pool_nan_propagates():
    x = torch.randn(1, 70, 2, 2)
    x[0, 65, 1, 1] = float("nan")
    y = spatial_pool(x, backend="triton")
    assert torch.isnan(y[0, :, 1, 1]).all() and not torch.isnan(y[0, :, 0]).any()


def test_spatial_pool_expanded_gradient_and_fp16_a():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    a = torch.rand(2, 3, dtype=torch.float16, requires_grad=True)
    y = spatial_pool(x, a, backend="triton")
    y.backward(torch.ones(1, 1, 1, 1).expand(2, 2, 4, 5))
    assert a.grad.dtype == torch.float16
    x2, a2 = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    spatial_pool(x2, a2, backend="torch").backward(torch.ones(2, 2, 4, 5))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(a.grad, a2.grad)


# --------------------------------------------------------------------------------------
# zpool
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_zpool(shape, dtype, dim):
    g = torch.Generator().manual_seed(1)
    base = _untied(shape, dtype, g, dim)
    out_shape = _zpool64(base, dim).shape
    dy = torch.randn(out_shape, generator=g).to(dtype)
    tol = TOL[dtype]
    for layout, x0 in layouts(base):
        y, (dx,) = _grads(lambda x: zpool(x, dim, backend="triton"), [x0], dy)
        yt, (dxt,) = _grads(lambda x: zpool(x, dim, backend="torch"), [x0], dy)
        assert y.dtype == dtype and y.shape == out_shape and y.stride() == yt.stride()
        if dim != 1:
            assert y.is_contiguous()
        _close(y, yt.double(), tol, f"{layout} y vs torch")
        _close(dx, dxt.double(), tol, f"{layout} dx vs torch")
        x64 = x0.double().requires_grad_()
        y64 = _zpool64(x64, dim)
        y64.backward(dy.double())
        _close(y, y64.detach(), tol, f"{layout} y")
        _close(dx, x64.grad, tol, f"{layout} dx")


def test_zpool_dim1_is_spatial_pool():
    x = torch.randn(2, 70, 3, 5).contiguous(memory_format=torch.channels_last)
    y = zpool(x, 1, backend="triton")
    assert torch.equal(y, spatial_pool(x, backend="triton"))
    assert y.stride() == spatial_pool(x, backend="torch").stride()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_zpool_gradcheck_float64(dim):
    """The Triton kernels accept float64 (float64 accumulation): gradcheck the kernels themselves."""
    x = _untied((1, 3, 2, 3), torch.float64, torch.Generator().manual_seed(3), dim).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: zpool(t, dim, backend="triton"), (x,))


# --------------------------------------------------------------------------------------
# spatial_scale
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS)
@pytest.mark.parametrize("with_a", [True, False], ids=["a", "no_a"])
def test_spatial_scale(shape, dtype, with_a):
    g = torch.Generator().manual_seed(2)
    B, C, H, W = shape
    base = torch.randn(shape, generator=g).to(dtype)
    a0 = torch.rand(B, C, generator=g) if with_a else None
    s0 = torch.rand(B, 1, H, W, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    tol = TOL[dtype]
    for layout, x0 in layouts(base):
        y, (dx, da, ds) = _grads(lambda x, a, s: spatial_scale(x, a, s, backend="triton"), [x0, a0, s0], dy)
        yt, (dxt, dat, dst) = _grads(lambda x, a, s: spatial_scale(x, a, s, backend="torch"), [x0, a0, s0], dy)
        assert y.dtype == dtype and y.shape == shape and y.stride() == yt.stride()
        assert ds.dtype == dtype and ds.shape == s0.shape
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert dx.is_contiguous(memory_format=torch.channels_last)
        _close(y, yt.double(), tol, f"{layout} y vs torch")
        _close(dx, dxt.double(), tol, f"{layout} dx vs torch")
        _close(ds, dst.double(), tol, f"{layout} ds vs torch", scale=C ** 0.5)
        x64 = x0.double().requires_grad_()
        a64 = a0.double().requires_grad_() if with_a else None
        s64 = s0.double().requires_grad_()
        y64 = x64 * (a64[:, :, None, None] if with_a else 1) * s64
        y64.backward(dy.double())
        _close(y, y64.detach(), tol, f"{layout} y")
        _close(dx, x64.grad, tol, f"{layout} dx")
        _close(ds, s64.grad, tol, f"{layout} ds", scale=C ** 0.5)
        if with_a:
            _close(da, a64.grad, tol, f"{layout} da", scale=H * W ** 0.5)
            _close(dat, a64.grad, tol, f"{layout} da torch", scale=H * W ** 0.5)


def test_spatial_scale_strided_s_and_expanded_gradient():
    x = torch.randn(2, 70, 4, 5, requires_grad=True)
    a = torch.rand(2, 70, requires_grad=True)
    s = torch.rand(2, 1, 5, 4).transpose(2, 3).requires_grad_()   # a transposed (non-flattenable) s
    y = spatial_scale(x, a, s, backend="triton")
    y.backward(torch.ones(1, 1, 1, 1).expand(2, 70, 4, 5))
    xd, ad, sd = (t.detach() for t in (x, a, s))
    torch.testing.assert_close(y, xd * ad[:, :, None, None] * sd)
    torch.testing.assert_close(x.grad, (ad[:, :, None, None] * sd).expand_as(xd))
    torch.testing.assert_close(a.grad, (xd * sd).sum((2, 3)))
    torch.testing.assert_close(s.grad, (xd * ad[:, :, None, None]).sum(1, keepdim=True))


def test_spatial_scale_deterministic_and_split(monkeypatch):
    x = torch.randn(2, 100, 9, 11, requires_grad=True)
    a = torch.rand(2, 100, requires_grad=True)
    s = torch.rand(2, 1, 9, 11, requires_grad=True)
    dy = torch.randn(2, 100, 9, 11)
    grads = []
    for hint in (1, 1, 64, 64):          # one program per pixel block, then the channels split in up to 4 parts
        monkeypatch.setattr(kspatial, "num_programs_hint", lambda t, h=hint: h)
        for t in (x, a, s):
            t.grad = None
        spatial_scale(x, a, s, backend="triton").backward(dy)
        grads.append([t.grad.clone() for t in (x, a, s)])
    for i in range(3):
        assert torch.equal(grads[0][i], grads[1][i]) and torch.equal(grads[2][i], grads[3][i])
        torch.testing.assert_close(grads[0][i], grads[2][i])


def test_spatial_pool_deterministic_da():
    x = torch.randn(2, 8, 37, 41, requires_grad=True)
    a = torch.rand(2, 8, requires_grad=True)
    grads = []
    for _ in range(2):
        a.grad = None
        spatial_pool(x, a, backend="triton").sum().backward()
        grads.append(a.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_scale_gradcheck_float64():
    x = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    a = torch.rand(1, 3, dtype=torch.float64, requires_grad=True)
    s = torch.rand(1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: spatial_scale(*t, backend="triton"), (x, a, s))
    assert torch.autograd.gradcheck(lambda *t: spatial_pool(*t, backend="triton"), (x, a))


# --------------------------------------------------------------------------------------
# empty inputs, and the modules composed from the ops
# --------------------------------------------------------------------------------------


def test_empty_batch():
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    a = torch.rand(0, 3, requires_grad=True)
    s = torch.rand(0, 1, 4, 5, requires_grad=True)
    y = spatial_pool(x, a, backend="triton")
    assert y.shape == (0, 2, 4, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape
    for dim, shape in ((1, (0, 2, 4, 5)), (2, (0, 2, 3, 5)), (3, (0, 2, 4, 3))):
        z = zpool(x, dim, backend="triton")
        assert z.shape == shape
        z.sum().backward()
    y = spatial_scale(x, a, s, backend="triton")
    y.sum().backward()
    assert y.shape == x.shape and s.grad.shape == s.shape


def test_cbam_and_triplet_from_ops():
    """CBAM and Triplet attention composed from the Triton ops equal the reference modules."""
    from fastattn.reference import CBAM, TripletAttention

    torch.manual_seed(0)
    x = torch.randn(2, 32, 7, 9)
    cbam = CBAM(32, reduction=4).eval()
    cg, sg = cbam.ChannelGate, cbam.SpatialGate
    mc = torch.sigmoid(sum(cg.mlp(cg._pool(x, k)) for k in cg.pool_types))
    s = torch.sigmoid(sg.spatial(spatial_pool(x, mc, backend="triton")))
    torch.testing.assert_close(spatial_scale(x, mc, s, backend="triton"), cbam(x))

    trip = TripletAttention().eval()
    out_cw = x * trip.cw(zpool(x, 2, backend="triton")).permute(0, 2, 1, 3)
    out_hc = x * trip.hc(zpool(x, 3, backend="triton")).permute(0, 3, 2, 1)
    out_hw = spatial_scale(x, None, trip.hw(zpool(x, 1, backend="triton")), backend="triton")
    torch.testing.assert_close((out_hw + out_cw + out_hc) / 3, trip(x))
