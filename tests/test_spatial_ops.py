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


def test_auto_on_cpu_runs_the_cpu_kernels_when_built():
    from fastattn.ops import spatial

    x = torch.randn(1, 2, 3, 3)
    want = "cpu" if spatial.CHECKS["cpu"](x) is None else "torch"
    for op in ("spatial_pool", "zpool", "spatial_scale"):
        assert _dispatch.resolve(op, x, "auto", spatial.CHECKS) == want
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


# --------------------------------------------------------------------------------------
# backend="cpu" (the OpenMP C++ kernels of fastattn._C) and backend="cuda" (its CUDA kernels):
# forward and every gradient against float64 math, in every layout and dtype
# --------------------------------------------------------------------------------------

NATIVE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Element-wise results: one rounding to the dtype (and a few fp32 roundings before it).
ELEM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _native_reason(device: str):
    from fastattn.ops import spatial

    return spatial.CHECKS["cpu" if device == "cpu" else "cuda"](torch.empty(0, device=device))


def _acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make(shape, dtype, layout, device, gen):
    """A (B, C, H, W) tensor in one of the layouts the kernels tell apart (values drawn on the CPU)."""
    B, C, H, W = shape

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    if layout == "nchw":
        return randn(B, C, H, W)
    if layout == "channels_last":
        return randn(B, C, H, W).contiguous(memory_format=torch.channels_last)
    if layout == "slice":            # channels of a wider NCHW tensor: planes contiguous, not dense
        return randn(B, C + 3, H, W)[:, 1:C + 1]
    if layout == "slice_cl":         # channels of a wider channels_last tensor: channels contiguous, not dense
        return randn(B, C + 3, H, W).contiguous(memory_format=torch.channels_last)[:, 2:C + 2]
    if layout == "permuted":         # a transposed plane (B, C, W, H) storage seen as (B, C, H, W)
        return randn(B, C, W, H).transpose(2, 3)
    if layout == "stepped":          # no unit stride anywhere: the generic paths
        return randn(B, C, 2 * H, 2 * W)[:, :, ::2, ::2]
    raise ValueError(layout)


def _zperm(t, dim):
    """The Z-pool view (its own inverse permutation)."""
    return t if dim == 1 else t.permute(0, 2, 1, 3) if dim == 2 else t.permute(0, 3, 2, 1)


def _pool_reference(x, a, dim, dy):
    """(y, idx, dx, da) in float64. The argmax is taken on v = x * a rounded in the accumulation
    dtype, exactly as the kernels form it, so that near-ties cannot flip it; the rest is fp64."""
    xv = _zperm(x, dim)
    v = xv.to(_acc_of(x.dtype))
    if a is not None:
        v = v * a.to(v.dtype)[:, :, None, None]
    B, N, P1, P2 = v.shape
    idx = v.argmax(1, keepdim=True)                      # the first maximal index
    y = torch.stack((v.amax(1).double(), v.double().mean(1)), 1)
    dy64 = dy.double()
    g = (dy64[:, 1:2] / N).expand(B, N, P1, P2).clone()
    g.scatter_add_(1, idx, dy64[:, 0:1])
    dxv = g * a.double()[:, :, None, None] if a is not None else g
    da = (g * xv.double()).sum((2, 3)) if a is not None else None
    return y, idx.view(B, P1 * P2).to(torch.int32), _zperm(dxv, dim), da


def _sum_tol(n, dtype):
    """(rtol, atol) of an fp32 (fp64) sum of n products of O(1) values, stored in `dtype`."""
    if dtype == torch.float64:
        return 1e-10, 1e-10 * max(1, n) ** 0.5
    return max(1e-5, ELEM_TOL[dtype]), 1e-5 * max(1, n) ** 0.5


class _NativeChecks:
    """The checks shared by backend="cpu" and backend="cuda" (subclasses set DEVICE and BACKEND)."""

    DEVICE = "cpu"
    BACKEND = "cpu"

    def _gen(self):
        return torch.Generator().manual_seed(0)

    def _rand(self, shape, dtype, gen):
        return torch.rand(shape, generator=gen).to(device=self.DEVICE, dtype=dtype)

    # ---- pool / zpool ----------------------------------------------------------------------------

    def check_pool(self, shape, dtype, layout, with_a, dim=1, dy_layout="nchw"):
        gen = self._gen()
        x = _make(shape, dtype, layout, self.DEVICE, gen)
        a = self._rand(shape[:2], _acc_of(dtype), gen) if with_a else None
        y_t, _ = OPS.spatial_pool(x, a, "torch") if dim == 1 else OPS.zpool(x, dim, "torch")
        dy = _make(tuple(y_t.shape), dtype, dy_layout, self.DEVICE, gen)
        y64, idx64, dx64, da64 = _pool_reference(x, a, dim, dy)

        # the raw pair of ops: outputs, strides, the argmax itself
        y, idx = OPS.spatial_pool(x, a, self.BACKEND) if dim == 1 else OPS.zpool(x, dim, self.BACKEND)
        assert y.dtype == dtype and y.shape == y_t.shape and y.stride() == y_t.stride()
        assert idx.dtype == torch.int32 and idx.shape == idx64.shape and idx.is_contiguous()
        if y.numel():
            assert torch.equal(idx.cpu(), idx64.cpu()), "argmax differs from the first maximal index"
        tol = ELEM_TOL[dtype]
        torch.testing.assert_close(y[:, 0].double(), y64[:, 0], rtol=tol, atol=tol)
        N = _zperm(x, dim).shape[1]
        torch.testing.assert_close(y[:, 1].double(), y64[:, 1], rtol=tol, atol=max(tol, 1e-5 * N ** 0.5 / N))
        if dim == 1:
            dx, da = OPS.spatial_pool_backward(dy, x, a, idx, self.BACKEND)
        else:
            dx, da = OPS.zpool_backward(dy, x, idx, dim, self.BACKEND), None
        assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()
        torch.testing.assert_close(dx.double(), dx64, rtol=tol, atol=tol)
        if with_a:
            assert da.dtype == a.dtype and da.shape == a.shape
            rtol, atol = _sum_tol(shape[2] * shape[3], a.dtype)
            torch.testing.assert_close(da.double(), da64, rtol=rtol, atol=atol)

        # and through autograd, as the modules use it
        xg = x.detach().requires_grad_()
        ag = a.detach().clone().requires_grad_() if with_a else None
        out = spatial_pool(xg, ag, backend=self.BACKEND) if dim == 1 else zpool(xg, dim, backend=self.BACKEND)
        out.backward(dy)
        torch.testing.assert_close(out, y, rtol=0, atol=0)
        torch.testing.assert_close(xg.grad.double(), dx64, rtol=tol, atol=tol)
        if with_a:
            torch.testing.assert_close(ag.grad, da, rtol=0, atol=0)

    @pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice", "slice_cl", "permuted", "stepped"])
    @pytest.mark.parametrize("with_a", [True, False], ids=["a", "no_a"])
    def test_pool(self, dtype, layout, with_a):
        self.check_pool((2, 70, 13, 17), dtype, layout, with_a)

    @pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice", "permuted", "stepped"])
    @pytest.mark.parametrize("dim", [2, 3])
    def test_zpool(self, dtype, layout, dim):
        self.check_pool((2, 37, 13, 17), dtype, layout, False, dim)

    @pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 1, 1), (1, 1, 7, 7), (2, 37, 1, 9), (2, 37, 9, 1),
                                       (1, 16, 40, 30), (64, 3, 33, 33), (1, 4100, 2, 3), (64, 2, 65, 65),
                                       (0, 8, 5, 5), (2, 3, 0, 4)], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    def test_pool_odd_shapes(self, shape, layout):
        self.check_pool(shape, torch.float32, layout, True)
        for dim in (1, 2, 3):
            if shape[dim] > 0 or 0 in shape[:dim] + shape[dim + 1:]:
                self.check_pool(shape, torch.float32, layout, False, dim)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("layout,dy_layout", [("nchw", "channels_last"), ("channels_last", "nchw"),
                                                  ("nchw", "stepped")])
    def test_pool_dy_in_another_layout(self, dtype, layout, dy_layout):
        self.check_pool((2, 70, 13, 17), dtype, layout, True, 1, dy_layout)
        self.check_pool((2, 70, 13, 17), dtype, layout, False, 3, dy_layout)

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "stepped"])
    def test_pool_nan_and_ties(self, layout):
        x = _make((2, 33, 5, 6), torch.float32, layout, self.DEVICE, self._gen())
        x[:, :, 0, 0] = 1.0                      # a tie everywhere: channel 0
        x[:, 4, 1, 1] = float("nan")
        x[:, 9, 1, 1] = float("nan")             # the first NaN wins
        x[:, 7, 2, 2] = float("inf")
        x[:, 11, 2, 2] = float("nan")            # NaN beats +inf
        x[:, :, 3, 3] = -float("inf")            # all -inf: channel 0, max -inf
        y, idx = OPS.spatial_pool(x, None, self.BACKEND)
        idx = idx.view(2, 5, 6).cpu()
        assert (idx[:, 0, 0] == 0).all() and (idx[:, 1, 1] == 4).all() and (idx[:, 2, 2] == 11).all()
        assert (idx[:, 3, 3] == 0).all()
        assert y[:, 0, 1, 1].isnan().all() and y[:, 1, 1, 1].isnan().all() and y[:, 0, 2, 2].isnan().all()
        assert (y[:, 0, 3, 3] == -float("inf")).all()
        want = x.double().amax(1)
        ok = ~want.isnan()
        assert torch.equal(y[:, 0].double()[ok], want[ok])

    # ---- scale -----------------------------------------------------------------------------------

    def check_scale(self, shape, dtype, layout, with_a, dy_layout=None, s_dtype=None):
        gen = self._gen()
        B, C, H, W = shape
        x = _make(shape, dtype, layout, self.DEVICE, gen)
        a = self._rand((B, C), _acc_of(dtype), gen) if with_a else None
        s = self._rand((B, 1, H, W), s_dtype or dtype, gen)
        dy = _make(shape, dtype, dy_layout or layout, self.DEVICE, gen)
        x64, s64, dy64 = x.double(), s.double(), dy.double()
        a64 = a.double()[:, :, None, None] if with_a else torch.ones((), dtype=torch.float64, device=self.DEVICE)
        tol = ELEM_TOL[dtype]

        y = OPS.spatial_scale(x, a, s, self.BACKEND)
        assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
        torch.testing.assert_close(y.double(), x64 * a64 * s64, rtol=tol, atol=tol)
        dx, da, ds = OPS.spatial_scale_backward(dy, x, a, s, self.BACKEND)
        assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()
        assert ds.dtype == s.dtype and ds.shape == s.shape and ds.is_contiguous()
        torch.testing.assert_close(dx.double(), dy64 * a64 * s64, rtol=tol, atol=tol)
        rtol, atol = _sum_tol(C, ds.dtype)
        torch.testing.assert_close(ds.double(), (dy64 * x64 * a64).sum(1, keepdim=True), rtol=rtol, atol=atol)
        if with_a:
            assert da.dtype == a.dtype and da.shape == a.shape
            rtol, atol = _sum_tol(H * W, a.dtype)
            torch.testing.assert_close(da.double(), (dy64 * x64 * s64).sum((2, 3)), rtol=rtol, atol=atol)

        xg, sg = x.detach().requires_grad_(), s.detach().clone().requires_grad_()
        ag = a.detach().clone().requires_grad_() if with_a else None
        out = spatial_scale(xg, ag, sg, backend=self.BACKEND)
        out.backward(dy)
        torch.testing.assert_close(out, y, rtol=0, atol=0)
        torch.testing.assert_close(xg.grad, dx.to(xg.grad.dtype), rtol=0, atol=0)
        torch.testing.assert_close(sg.grad, ds, rtol=0, atol=0)
        if with_a:
            torch.testing.assert_close(ag.grad, da, rtol=0, atol=0)

    @pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice", "slice_cl", "permuted", "stepped"])
    @pytest.mark.parametrize("with_a", [True, False], ids=["a", "no_a"])
    def test_scale(self, dtype, layout, with_a):
        self.check_scale((2, 70, 13, 17), dtype, layout, with_a)

    @pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 1, 1), (1, 1, 7, 7), (2, 37, 1, 9), (2, 37, 9, 1),
                                       (1, 16, 40, 30), (64, 3, 33, 33), (1, 4100, 2, 3), (64, 2, 65, 65),
                                       (1, 2, 150, 251), (0, 8, 5, 5), (2, 3, 0, 4), (2, 0, 4, 4)], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("with_a", [True, False], ids=["a", "no_a"])
    def test_scale_odd_shapes(self, shape, layout, with_a):
        self.check_scale(shape, torch.float32, layout, with_a)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("layout,dy_layout", [("nchw", "channels_last"), ("channels_last", "nchw"),
                                                  ("slice_cl", "nchw"), ("nchw", "stepped")])
    def test_scale_dy_in_another_layout(self, dtype, layout, dy_layout):
        self.check_scale((2, 70, 13, 17), dtype, layout, True, dy_layout)

    def test_scale_s_in_float32_for_a_bfloat16_map(self):
        self.check_scale((2, 24, 5, 7), torch.bfloat16, "channels_last", True, s_dtype=torch.float32)

    # ---- gradcheck, opcheck, determinism, errors ---------------------------------------------------

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice", "stepped"])
    def test_gradcheck(self, layout):
        gen = self._gen()
        x = _make((2, 3, 4, 5), torch.float64, layout, self.DEVICE, gen).requires_grad_()
        a = self._rand((2, 3), torch.float64, gen).requires_grad_()
        s = self._rand((2, 1, 4, 5), torch.float64, gen).requires_grad_()
        bk = self.BACKEND
        assert torch.autograd.gradcheck(lambda t, u: spatial_pool(t, u, backend=bk), (x, a))
        for dim in (1, 2, 3):
            assert torch.autograd.gradcheck(lambda t: zpool(t, dim, backend=bk), (x,))
        assert torch.autograd.gradcheck(lambda t, u, v: spatial_scale(t, u, v, backend=bk), (x, a, s))
        assert torch.autograd.gradcheck(lambda t, v: spatial_scale(t, None, v, backend=bk), (x, s))

    def test_opcheck(self):
        gen = self._gen()
        bk = self.BACKEND
        x = _make((2, 3, 4, 5), torch.float32, "nchw", self.DEVICE, gen)
        a = self._rand((2, 3), torch.float32, gen)
        s = self._rand((2, 1, 4, 5), torch.float32, gen)
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            tg = t.detach().requires_grad_()
            ag, sg = a.clone().requires_grad_(), s.clone().requires_grad_()
            torch.library.opcheck(OPS.spatial_pool.default, (tg, ag, bk))
            torch.library.opcheck(OPS.spatial_pool.default, (tg, None, bk))
            torch.library.opcheck(OPS.spatial_scale.default, (tg, ag, sg, bk))
            torch.library.opcheck(OPS.spatial_scale.default, (tg, None, sg, bk))
            for dim in (1, 2, 3):
                torch.library.opcheck(OPS.zpool.default, (tg, dim, bk))
                y, idx = OPS.zpool(t, dim, bk)
                dy = torch.randn(y.shape, generator=gen).to(self.DEVICE)
                torch.library.opcheck(OPS.zpool_backward.default, (dy, t, idx, dim, bk))
            _, idx = OPS.spatial_pool(t, a, bk)
            dy = torch.randn(2, 2, 4, 5, generator=gen).to(self.DEVICE)
            torch.library.opcheck(OPS.spatial_pool_backward.default, (dy, t, a, idx, bk))
            torch.library.opcheck(OPS.spatial_pool_backward.default, (dy, t, None, idx, bk))
            dy = torch.randn(2, 3, 4, 5, generator=gen).to(self.DEVICE)
            torch.library.opcheck(OPS.spatial_scale_backward.default, (dy, t, a, s, bk))
            torch.library.opcheck(OPS.spatial_scale_backward.default, (dy, t, None, s, bk))

    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    def test_reductions_are_deterministic(self, layout):
        gen = self._gen()
        x = _make((3, 200, 30, 30), torch.float32, layout, self.DEVICE, gen)
        a = self._rand((3, 200), torch.float32, gen)
        s = self._rand((3, 1, 30, 30), torch.float32, gen)
        dy = _make((3, 200, 30, 30), torch.float32, layout, self.DEVICE, gen)
        dyp = torch.randn(3, 2, 30, 30, generator=gen).to(self.DEVICE)
        _, idx = OPS.spatial_pool(x, a, self.BACKEND)
        runs = [(OPS.spatial_scale_backward(dy, x, a, s, self.BACKEND),
                 OPS.spatial_pool_backward(dyp, x, a, idx, self.BACKEND)) for _ in range(3)]
        for (sc, po) in runs[1:]:
            assert all(torch.equal(u, v) for u, v in zip(sc + po, runs[0][0] + runs[0][1]))

    def test_raw_op_errors(self):
        bk_dev = self.DEVICE
        x = torch.randn(2, 3, 4, 4, device=bk_dev)
        a, s = torch.rand(2, 3, device=bk_dev), torch.rand(2, 1, 4, 4, device=bk_dev)
        raw = torch.ops.fastattn_C
        cases = [
            (lambda: raw.spatial_pool(x[0], None, 1), ValueError, r"spatial_pool: argument 'x' must be 4-D"),
            (lambda: raw.spatial_pool(x.int(), None, 1), TypeError, r"spatial_pool: argument 'x' must be float32"),
            (lambda: raw.spatial_pool(x, None, 0), ValueError, r"spatial_pool: argument 'dim' must be 1, 2 or 3"),
            (lambda: raw.spatial_pool(x, a, 2), ValueError, r"spatial_pool: argument 'a' .* must be None"),
            (lambda: raw.spatial_pool(x, a.double(), 1), TypeError, r"spatial_pool: argument 'a' must be Float"),
            (lambda: raw.spatial_pool(x, a[:, :2], 1), ValueError, r"spatial_pool: argument 'a' must have shape"),
            (lambda: raw.spatial_pool(x, torch.rand(3, 2, device=bk_dev).t(), 1), ValueError,
             r"spatial_pool: argument 'a' must be contiguous"),
            (lambda: raw.spatial_pool(torch.randn(2, 0, 4, 4, device=bk_dev), None, 1), ValueError,
             r"spatial_pool: argument 'x' must have a non-empty dimension 1"),
            (lambda: raw.spatial_pool_backward(torch.randn(2, 2, 4, 4, device=bk_dev).half(), x, None,
                                               torch.zeros(2, 16, dtype=torch.int32, device=bk_dev), 1),
             TypeError, r"spatial_pool_backward: argument 'dy' must have the dtype"),
            (lambda: raw.spatial_pool_backward(torch.randn(2, 2, 4, 3, device=bk_dev), x, None,
                                               torch.zeros(2, 16, dtype=torch.int32, device=bk_dev), 1),
             ValueError, r"spatial_pool_backward: argument 'dy' must have shape"),
            (lambda: raw.spatial_pool_backward(torch.randn(2, 2, 4, 4, device=bk_dev), x, None,
                                               torch.zeros(2, 16, dtype=torch.int64, device=bk_dev), 1),
             TypeError, r"spatial_pool_backward: argument 'idx' must be int32"),
            (lambda: raw.spatial_pool_backward(torch.randn(2, 2, 4, 4, device=bk_dev), x, None,
                                               torch.zeros(2, 15, dtype=torch.int32, device=bk_dev), 1),
             ValueError, r"spatial_pool_backward: argument 'idx' must have shape"),
            (lambda: raw.spatial_scale(x, None, s.double()), TypeError, r"spatial_scale: argument 's' must be Float"),
            (lambda: raw.spatial_scale(x, None, s[:, :, :3]), ValueError,
             r"spatial_scale: argument 's' must have shape"),
            (lambda: raw.spatial_scale(x, None, torch.rand(2, 1, 4, 4, device=bk_dev).transpose(2, 3)), ValueError,
             r"spatial_scale: argument 's' must be contiguous"),
            (lambda: raw.spatial_scale(x, a[:1], s), ValueError, r"spatial_scale: argument 'a' must have shape"),
            (lambda: raw.spatial_scale_backward(x[:, :2], x, None, s), ValueError,
             r"spatial_scale_backward: argument 'dy' must have the shape of 'x'"),
            (lambda: raw.spatial_scale_backward(x.double(), x, None, s), TypeError,
             r"spatial_scale_backward: argument 'dy' must have the dtype of 'x'"),
        ]
        for call, err, match in cases:
            with pytest.raises(err, match=match):
                call()

    def test_cbam_and_triplet_from_ops(self):
        """The reference modules' forward and input gradient, rebuilt from these ops on this backend."""
        from fastattn.reference import CBAM, TripletAttention

        torch.manual_seed(0)
        bk = self.BACKEND
        cbam = CBAM(32, reduction=4).to(self.DEVICE).eval()
        trip = TripletAttention().to(self.DEVICE).eval()

        def cbam_ops(x):
            cg, sg = cbam.ChannelGate, cbam.SpatialGate
            mc = torch.sigmoid(sum(cg.mlp(cg._pool(x, k)) for k in cg.pool_types))
            return spatial_scale(x, mc, torch.sigmoid(sg.spatial(spatial_pool(x, mc, backend=bk))), backend=bk)

        def trip_ops(x):
            out_cw = x * trip.cw(zpool(x, 2, backend=bk)).permute(0, 2, 1, 3)
            out_hc = x * trip.hc(zpool(x, 3, backend=bk)).permute(0, 3, 2, 1)
            out_hw = spatial_scale(x, None, trip.hw(zpool(x, 1, backend=bk)), backend=bk)
            return (out_hw + out_cw + out_hc) / 3

        # cuDNN's default TF32 convolutions would round the (equal up to fp32 rounding) pooled maps apart
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            self._compare_modules(((cbam_ops, cbam), (trip_ops, trip)))
        finally:
            torch.backends.cudnn.allow_tf32 = tf32

    def _compare_modules(self, pairs):
        for fast, ref in pairs:
            for layout in ("nchw", "channels_last"):
                x = _make((2, 32, 9, 11), torch.float32, layout, self.DEVICE, self._gen())
                xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
                yr, yf = ref(xr), fast(xf)
                torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
                dy = torch.randn(yr.shape, generator=self._gen()).to(self.DEVICE)
                yr.backward(dy)
                yf.backward(dy)
                torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(_native_reason("cpu") is not None, reason=str(_native_reason("cpu")))
class TestSpatialCpu(_NativeChecks):
    DEVICE = "cpu"
    BACKEND = "cpu"

    def test_results_do_not_depend_on_the_thread_count(self):
        gen = self._gen()
        out = []
        for layout in ("nchw", "channels_last"):
            x = _make((1, 96, 37, 41), torch.float32, layout, "cpu", gen)
            a, s = torch.rand(1, 96, generator=gen), torch.rand(1, 1, 37, 41, generator=gen)
            dy = _make((1, 96, 37, 41), torch.float32, layout, "cpu", gen)
            dyp = torch.randn(1, 2, 37, 41, generator=gen)
            old = torch.get_num_threads()
            res = []
            try:
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    y, idx = OPS.spatial_pool(x, a, "cpu")
                    res.append((y, idx, *OPS.spatial_pool_backward(dyp, x, a, idx, "cpu"),
                                *OPS.spatial_scale_backward(dy, x, a, s, "cpu")))
            finally:
                torch.set_num_threads(old)
            out.append(res)
        for res in out:
            for r in res[1:]:
                assert all(torch.equal(u, v) for u, v in zip(r, res[0]))

    def test_auto_picks_cpu_and_the_fast_modules_match(self):
        from fastattn import modules, reference
        from fastattn.ops import spatial

        x = torch.randn(2, 32, 9, 11)
        assert _dispatch.resolve("spatial_pool", x, "auto", spatial.CHECKS) == "cpu"
        torch.manual_seed(0)
        for name, args in (("CBAM", (32,)), ("TripletAttention", ())):
            ref = getattr(reference, name)(*args).eval()
            fast = getattr(modules, name)(*args).eval()
            fast.load_state_dict(ref.state_dict())
            for t in (x, x.contiguous(memory_format=torch.channels_last)):
                xr, xf = t.clone().requires_grad_(), t.clone().requires_grad_()
                yr, yf = ref(xr), fast(xf)
                torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
                dy = torch.randn(yr.shape)
                yr.backward(dy)
                yf.backward(dy)
                torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
class TestSpatialCuda(_NativeChecks):
    DEVICE = "cuda"
    BACKEND = "cuda"

    def test_cuda_backend_is_the_kernel(self):
        from fastattn.ops import spatial

        assert _native_reason("cuda") is None, _native_reason("cuda")
        x = torch.randn(1, 4, 5, 5, device="cuda")
        assert _dispatch.resolve("spatial_scale", x, "cuda", spatial.CHECKS) == "cuda"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("shape", [(8, 256, 56, 56), (32, 2048, 7, 7), (4, 1024, 14, 14), (2, 3, 130, 129)],
                             ids=str)
    def test_stage_shapes(self, dtype, layout, shape):
        self.check_pool(shape, dtype, layout, True)
        self.check_scale(shape, dtype, layout, True)
        for dim in (2, 3):
            self.check_pool(shape, dtype, layout, False, dim)

    def test_other_stream_and_device_guard(self):
        s = torch.cuda.Stream()
        x = torch.randn(2, 64, 28, 28, device="cuda")
        a = torch.rand(2, 64, device="cuda")
        sp = torch.rand(2, 1, 28, 28, device="cuda")
        want = OPS.spatial_scale(x, a, sp, "torch")
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            got = OPS.spatial_scale(x, a, sp, "cuda")
        torch.cuda.current_stream().wait_stream(s)
        torch.testing.assert_close(got, want)
