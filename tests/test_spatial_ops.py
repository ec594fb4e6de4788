"""fastattn::spatial_pool, spatial_scale, zpool on the CPU (torch backend): math, gradcheck, opcheck,
errors, dispatch; and the Triton kernels on CUDA when there is one."""
import pytest
import torch

from fastattn.ops import _dispatch
from fastattn.ops.spatial import spatial_pool, spatial_scale, zpool

OPS = torch.ops.fastattn


def _layouts(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    wide = torch.randn(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
    wide[:, ::2] = x
    yield "channel_slice", wide[:, ::2]


def _pool64(x, a=None):
    v = x if a is None else x * a[:, :, None, None]
    return torch.stack((v.amax(1), v.mean(1)), 1)


def _zpool64(x, dim):
    """The official Triplet attention maps: permute the pooled dim to the front, Z-pool over dim 1."""
    xp = {1: x, 2: x.permute(0, 2, 1, 3), 3: x.permute(0, 3, 2, 1)}[dim]
    return torch.stack((xp.amax(1), xp.mean(1)), 1)


# --------------------------------------------------------------------------------------
# math against independent float64 computations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_a", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spatial_pool_math_and_format(with_a, dtype):
    base = torch.randn(2, 5, 3, 7).to(dtype)
    a = torch.rand(2, 5) if with_a else None
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for layout, x in _layouts(base):
        y = spatial_pool(x, a)
        assert y.dtype == dtype and y.shape == (2, 2, 3, 7)
        assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        want = _pool64(x.double(), a.double() if with_a else None)
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_zpool_matches_the_triplet_attention_maps(dim):
    for layout, x in _layouts(torch.randn(2, 5, 3, 7)):
        y = zpool(x, dim)
        torch.testing.assert_close(y.double(), _zpool64(x.double(), dim))
        if dim != 1:
            assert y.is_contiguous()
    # the reference module's own helper, in the layouts its gates convolve
    from fastattn.reference.hybrid import _max_mean

    x = torch.randn(2, 5, 3, 7)
    want = {1: _max_mean(x, 1), 2: _max_mean(x, 2), 3: _max_mean(x, 3).transpose(2, 3)}[dim]
    torch.testing.assert_close(zpool(x, dim), want)


@pytest.mark.parametrize("with_a", [True, False])
def test_spatial_scale_math_and_format(with_a):
    base = torch.randn(2, 5, 3, 7)
    a = torch.rand(2, 5) if with_a else None
    s = torch.rand(2, 1, 3, 7)
    for layout, x in _layouts(base):
        y = spatial_scale(x, a, s)
        assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        want = x.double() * (a.double()[:, :, None, None] if with_a else 1) * s.double()
        torch.testing.assert_close(y.double(), want)


def test_backward_values_against_float64_autograd():
    torch.manual_seed(0)
    x, a, s = torch.randn(2, 6, 4, 5), torch.rand(2, 6), torch.rand(2, 1, 4, 5)
    for fn, ref, args in [
        (spatial_pool, _pool64, (x, a)),
        (lambda t: zpool(t, 2), lambda t: _zpool64(t, 2), (x,)),
        (lambda t: zpool(t, 3), lambda t: _zpool64(t, 3), (x,)),
        (spatial_scale, lambda t, u, v: t * u[:, :, None, None] * v, (x, a, s)),
    ]:
        ins = [t.clone().requires_grad_() for t in args]
        ins64 = [t.double().requires_grad_() for t in args]
        y, y64 = fn(*ins), ref(*ins64)
        dy = torch.randn(y.shape)
        y.backward(dy)
        y64.backward(dy.double())
        for got, want in zip(ins, ins64):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_ties_send_the_max_gradient_to_the_first_channel():
    x = torch.ones(1, 3, 2, 2, requires_grad=True)
    y = spatial_pool(x)
    y.backward(torch.stack((torch.ones(1, 2, 2), torch.zeros(1, 2, 2)), 1))
    assert torch.equal(x.grad[:, 0], torch.ones(1, 2, 2)) and not x.grad[:, 1:].any()


def test_cbam_and_triplet_from_ops():
    from fastattn.reference import CBAM, TripletAttention

    torch.manual_seed(0)
    x = torch.randn(2, 32, 7, 9).contiguous(memory_format=torch.channels_last)
    cbam = CBAM(32, reduction=4).eval()
    cg, sg = cbam.ChannelGate, cbam.SpatialGate
    mc = torch.sigmoid(sum(cg.mlp(cg._pool(x, k)) for k in cg.pool_types))
    s = torch.sigmoid(sg.spatial(spatial_pool(x, mc)))
    torch.testing.assert_close(spatial_scale(x, mc, s), cbam(x))

    trip = TripletAttention().eval()
    out_cw = x * trip.cw(zpool(x, 2)).permute(0, 2, 1, 3)
    out_hc = x * trip.hc(zpool(x, 3)).permute(0, 3, 2, 1)
    out_hw = spatial_scale(x, None, trip.hw(zpool(x, 1)))
    torch.testing.assert_close((out_hw + out_cw + out_hc) / 3, trip(x))


def test_empty_inputs():
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    assert spatial_pool(x, torch.rand(0, 3)).shape == (0, 2, 4, 5)
    assert zpool(x, 3).shape == (0, 2, 4, 3)
    assert spatial_scale(x, None, torch.rand(0, 1, 4, 5)).shape == x.shape
    assert spatial_pool(torch.randn(2, 3, 0, 5)).shape == (2, 2, 0, 5)


# --------------------------------------------------------------------------------------
# gradcheck (float64), opcheck, compile
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck(layout):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    a = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: spatial_pool(*t), (x, a))
    assert torch.autograd.gradcheck(lambda t: spatial_pool(t), (x,))
    for dim in (1, 2, 3):
        assert torch.autograd.gradcheck(lambda t: zpool(t, dim), (x,))
    assert torch.autograd.gradcheck(lambda *t: spatial_scale(*t), (x, a, s))
    assert torch.autograd.gradcheck(lambda t, u: spatial_scale(t, None, u), (x, s))


def test_opcheck():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    a = torch.rand(2, 3, requires_grad=True)
    s = torch.rand(2, 1, 4, 5, requires_grad=True)
    for t in (x, cl):
        torch.library.opcheck(OPS.spatial_pool.default, (t, a, "torch"))
        torch.library.opcheck(OPS.spatial_pool.default, (t, None, "torch"))
        torch.library.opcheck(OPS.spatial_scale.default, (t, a, s, "torch"))
        torch.library.opcheck(OPS.spatial_scale.default, (t, None, s, "torch"))
        for dim in (1, 2, 3):
            torch.library.opcheck(OPS.zpool.default, (t, dim, "torch"))
    xd, ad, sd = x.detach(), a.detach(), s.detach()
    _, idx = OPS.spatial_pool(xd, ad, "torch")
    dy = torch.randn(2, 2, 4, 5)
    torch.library.opcheck(OPS.spatial_pool_backward.default, (dy, xd, ad, idx, "torch"))
    torch.library.opcheck(OPS.spatial_pool_backward.default, (dy, xd, None, idx, "torch"))
    torch.library.opcheck(OPS.spatial_scale_backward.default, (torch.randn(2, 3, 4, 5), xd, ad, sd, "torch"))
    torch.library.opcheck(OPS.spatial_scale_backward.default, (torch.randn(2, 3, 4, 5), xd, None, sd, "torch"))
    for dim in (1, 2, 3):
        y, idx = OPS.zpool(xd, dim, "torch")
        torch.library.opcheck(OPS.zpool_backward.default, (torch.randn(y.shape), xd, idx, dim, "torch"))


def test_compile_fullgraph():
    def f(x, a, conv):
        mc = torch.sigmoid(a)
        s = torch.sigmoid(conv(spatial_pool(x, mc)))
        return spatial_scale(x, mc, s) + x * conv(zpool(x, 2)).permute(0, 2, 1, 3)

    conv = torch.nn.Conv2d(2, 1, 3, padding=1)
    x, a = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, a, conv)
    want = f(x, a, conv)
    torch.testing.assert_close(got, want)
    gx, ga = torch.autograd.grad(got.sum(), (x, a))
    wx, wa = torch.autograd.grad(want.sum(), (x, a))
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(ga, wa)


# --------------------------------------------------------------------------------------
# errors and dispatch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,err,match", [
    (lambda: spatial_pool(torch.randn(2, 3, 4)), ValueError, r"spatial_pool: argument 'x' must be 4-D"),
    (lambda: spatial_pool(torch.ones(2, 3, 4, 4, dtype=torch.int32)), TypeError,
     r"spatial_pool: argument 'x' must be a floating"),
    (lambda: spatial_pool(torch.randn(2, 3, 4, 4), torch.rand(2, 4)), ValueError,
     r"spatial_pool: argument 'a' must have shape \(B, C\)"),
    (lambda: spatial_pool(torch.randn(2, 3, 4, 4), torch.rand(6)), ValueError,
     r"spatial_pool: argument 'a' must be 2-D"),
    (lambda: spatial_pool(torch.randn(2, 3, 4, 4), torch.ones(2, 3, dtype=torch.long)), TypeError,
     r"spatial_pool: argument 'a' must be a floating"),
    (lambda: spatial_pool(torch.randn(2, 0, 4, 4)), ValueError, r"spatial_pool: argument 'x' must have a non-empty"),
    (lambda: spatial_pool(torch.randn(2, 3, 4, 4), torch.rand(2, 3, device="meta")), ValueError,
     r"spatial_pool: argument 'a' must be on x's device"),
    (lambda: zpool(torch.randn(2, 3, 4, 4), 0), ValueError, r"zpool: argument 'dim' must be 1, 2 or 3"),
    (lambda: zpool(torch.randn(2, 3, 4, 4), -1), ValueError, r"zpool: argument 'dim' must be 1, 2 or 3"),
    (lambda: zpool(torch.randn(2, 3, 4, 4), True), ValueError, r"zpool: argument 'dim'"),
    (lambda: zpool(torch.randn(2, 3, 4), 1), ValueError, r"zpool: argument 'x' must be 4-D"),
    (lambda: zpool(torch.randn(2, 3, 0, 4), 2), ValueError, r"zpool: argument 'x' must have a non-empty dimension 2"),
    (lambda: spatial_scale(torch.randn(2, 3, 4), None, torch.rand(2, 1, 4, 4)), ValueError,
     r"spatial_scale: argument 'x' must be 4-D"),
    (lambda: spatial_scale(torch.randn(2, 3, 4, 4), torch.rand(3, 2), torch.rand(2, 1, 4, 4)), ValueError,
     r"spatial_scale: argument 'a' must have shape"),
    (lambda: spatial_scale(torch.randn(2, 3, 4, 4), None, torch.rand(2, 3, 4, 4)), ValueError,
     r"spatial_scale: argument 's' must have shape \(B, 1, H, W\)"),
    (lambda: spatial_scale(torch.randn(2, 3, 4, 4), None, torch.rand(2, 4, 4)), ValueError,
     r"spatial_scale: argument 's' must be 4-D"),
    (lambda: spatial_scale(torch.randn(2, 3, 4, 4), None, torch.ones(2, 1, 4, 4, dtype=torch.int64)), TypeError,
     r"spatial_scale: argument 's' must be a floating"),
    (lambda: spatial_scale(torch.randn(2, 3, 4, 4), None, torch.rand(2, 1, 4, 4, device="meta")), ValueError,
     r"spatial_scale: argument 's' must be on x's device"),
    (lambda: spatial_scale(torch.randn(2, 3, 4, 4), None, torch.rand(2, 1, 4, 4), backend="fast"), ValueError,
     r"argument 'backend' must be one of"),
])
def test_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_explicit_backend_that_cannot_run_says_why():
    if _dispatch.triton_interpreting():
        pytest.skip("interpreter on")
    x, a, s = torch.randn(1, 2, 3, 3), torch.rand(1, 2), torch.rand(1, 1, 3, 3)
    for call in (lambda: spatial_pool(x, a, backend="triton"), lambda: zpool(x, 2, backend="triton"),
                 lambda: spatial_scale(x, a, s, backend="triton")):
        with pytest.raises(RuntimeError, match=r"backend='triton' cannot run here: .*(CUDA tensors|not installed)"):
            call()
    with pytest.raises(RuntimeError, match=r"fastattn::spatial_pool: backend='cuda' cannot run here"):
        spatial_pool(x, backend="cuda")


def test_auto_on_cpu_runs_torch():
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(spatial_pool(x, backend="auto"), spatial_pool(x, backend="torch"))


# --------------------------------------------------------------------------------------
# Triton on CUDA
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 256, 56, 56), (32, 2048, 7, 7)], ids=str)
def test_triton_on_cuda(layout, dtype, shape):
    torch.manual_seed(0)
    B, C, H, W = shape
    x = torch.randn(shape, device="cuda").to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    a = torch.rand(B, C, device="cuda")
    s = torch.rand(B, 1, H, W, device="cuda")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    def run(backend):
        ins = [t.clone().requires_grad_() for t in (x, a, s)]
        p = spatial_pool(ins[0], ins[1], backend=backend)
        y = spatial_scale(ins[0], ins[1], ins[2], backend=backend)
        z2, z3 = zpool(ins[0], 2, backend=backend), zpool(ins[0], 3, backend=backend)
        g = torch.Generator(device="cuda").manual_seed(1)
        loss = sum((t.float() * torch.randn(t.shape, device="cuda", generator=g)).sum() for t in (p, y, z2, z3))
        loss.backward()
        return [p, y, z2, z3] + [t.grad for t in ins]

    got, want = run("triton"), run("torch")
    names = ["pool", "scale", "zpool2", "zpool3", "dx", "da", "ds"]
    for name, g_, w_ in zip(names, got, want):
        scale = {"da": (H * W) ** 0.5, "ds": C ** 0.5}.get(name, 1.0)
        torch.testing.assert_close(g_.float(), w_.float(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # deterministic reductions
    again = run("triton")
    for g_, a_ in zip(got[4:], again[4:]):
        assert torch.equal(g_, a_)
