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


# ---------------------------------------------------------------------------------------------
# The C++ kernels: backend "cpu" (OpenMP, fastattn._C) and, marked gpu, backend "cuda"
# ---------------------------------------------------------------------------------------------

def _kernel_ready(backend):
    import importlib

    return importlib.import_module("fastattn.ops.coord").CHECKS[backend](
        torch.empty(0, device="cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"))


KTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


class _CoordKernelTests:
    """Every check of the C++ kernels, run on `device` with `backend` by the subclasses below."""

    device = "cpu"
    backend = "cpu"
    DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    LAYOUTS = ["nchw", "channels_last", "slice", "slice_cl", "permuted", "crop"]

    def _make(self, shape, dtype, layout, g):
        B, C, H, W = shape

        def rnd(*s):
            return torch.randn(*s, generator=g, dtype=torch.float64).to(self.device, dtype)

        if layout == "slice":          # a channel slice of a wider NCHW tensor: not dense
            return rnd(B, C + 3, H, W)[:, 1:C + 1]
        if layout == "slice_cl":       # a channel slice of a channels_last tensor
            return rnd(B, C + 3, H, W).contiguous(memory_format=torch.channels_last)[:, 2:C + 2]
        if layout == "permuted":       # (B, C, W, H) storage seen transposed: unit stride along H
            return rnd(B, C, W, H).transpose(2, 3)
        if layout == "crop":           # a spatial crop: rows of W unit stride, H stride W + 3
            return rnd(B, C, H + 2, W + 3)[:, :, 1:H + 1, 2:W + 2]
        x = rnd(B, C, H, W)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    def _grads(self, x, ah, aw, dxh, dxw, dy, backend):
        """(x_h, x_w, dx of the pool, y, dx, da_h, da_w of the scale) with `backend`."""
        xg = x.detach().requires_grad_()
        xh, xw = coord_pool(xg, backend=backend)
        (dx_pool,) = torch.autograd.grad([xh, xw], [xg], [dxh, dxw])
        ahg, awg = ah.detach().clone().requires_grad_(), aw.detach().clone().requires_grad_()
        y = coord_scale(xg, ahg, awg, backend=backend)
        dx, dah, daw = torch.autograd.grad([y], [xg, ahg, awg], [dy])
        return xh, xw, dx_pool, y, dx, dah, daw

    def _check(self, shape, dtype, layout, dy_layout=None, seed=0):
        B, C, H, W = shape
        g = torch.Generator().manual_seed(seed)
        x = self._make(shape, dtype, layout, g)
        ah = torch.rand(B, C, H, generator=g, dtype=torch.float64).to(self.device, dtype)
        aw = torch.rand(B, C, W, generator=g, dtype=torch.float64).to(self.device, dtype)
        dxh = torch.randn(B, C, H, generator=g, dtype=torch.float64).to(self.device, dtype)
        dxw = torch.randn(B, C, W, generator=g, dtype=torch.float64).to(self.device, dtype)
        if dy_layout == "expanded":    # what y.sum().backward() gives: every stride 0
            dy = torch.ones((), device=self.device, dtype=dtype).expand(shape)
        else:
            dy = self._make(shape, dtype, dy_layout or layout, g)
        got = self._grads(x, ah, aw, dxh, dxw, dy, self.backend)
        ref = self._grads(x, ah, aw, dxh, dxw, dy, "torch")

        # layouts and dtypes: means contiguous in x's dtype; y and dx with torch.empty_like(x)'s strides
        xh, xw, _, y, _, dah, daw = got
        assert xh.dtype == xw.dtype == y.dtype == dtype and dah.dtype == daw.dtype == dtype
        assert xh.is_contiguous() and xw.is_contiguous()
        assert y.stride() == torch.empty_like(x).stride()
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        dxp = torch.ops.fastattn.coord_pool_backward(dxh, dxw, cl, self.backend)
        assert dxp.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        dxs = torch.ops.fastattn.coord_scale_backward(dy, x, ah, aw, self.backend)[0]
        assert dxs.stride() == torch.empty_like(x).stride()

        # float64 math
        x64, ah64, aw64 = x.double(), ah.double()[:, :, :, None], aw.double()[:, :, None, :]
        dy64 = dy.double()
        want = (x64.mean(3), x64.mean(2), dxh.double()[:, :, :, None] / W + dxw.double()[:, :, None, :] / H,
                x64 * aw64 * ah64, dy64 * aw64 * ah64, (dy64 * x64 * aw64).sum(3), (dy64 * x64 * ah64).sum(2))
        names = ("x_h", "x_w", "dx (pool)", "y", "dx (scale)", "da_h", "da_w")
        sums = (W, H, 1, 1, 1, W, H)       # terms per output: the reductions may round more
        tol = KTOL[dtype]
        for name, a, r, t, n in zip(names, got, ref, want, sums):
            scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
            atol = tol * scale * (n ** 0.5 if dtype in (torch.float32, torch.float64) else 1)
            torch.testing.assert_close(a.double(), t, rtol=tol, atol=atol,
                                       msg=lambda m: f"{self.backend} {layout} {dtype} {name} vs float64: {m}")
            # 16-bit types: no further from float64 than the torch backend in the same dtype (x2),
            # plus an ulp (DESIGN.md); 32/64-bit: the tolerance above
            if t.numel() and dtype in (torch.float16, torch.bfloat16):
                err, err_ref = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
                assert err <= 2 * err_ref + 2 * ULP[dtype] * scale * n ** 0.5, \
                    f"{self.backend} {layout} {dtype} {name}: error {err:.3g}, torch backend's {err_ref:.3g}"

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_matches_float64_and_torch(self, dtype, layout):
        self._check((2, 70, 13, 17), dtype, layout)

    @pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 1, 1), (1, 1, 7, 7), (2, 17, 1, 33), (2, 17, 33, 1),
                                       (2, 600, 9, 9), (1, 16, 100, 90), (1, 3, 4200, 3), (1, 2, 3, 4200),
                                       (4, 33, 56, 56), (2, 40, 20, 40), (1, 64, 17, 64)], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    def test_odd_shapes(self, shape, layout):
        """1 x 1 maps, odd H and W, C not a multiple of 16, row segments (few planes), more than
        kChunk rows (partial column sums) and columns (folded row sums); rows of 1 to 4 AVX-512
        vectors (the short-row kernels: W <= 64, at least 64 planes), H not a multiple of 16."""
        self._check(shape, torch.float32, layout)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
    @pytest.mark.parametrize("layout,dy_layout", [("channels_last", "nchw"), ("nchw", "channels_last"),
                                                  ("slice_cl", "permuted"), ("nchw", "expanded"),
                                                  ("channels_last", "expanded")])
    def test_dy_in_another_layout(self, dtype, layout, dy_layout):
        self._check((2, 70, 13, 17), dtype, layout, dy_layout)

    @pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)], ids=str)
    def test_empty(self, shape):
        B, C, H, W = shape
        x = torch.randn(shape, device=self.device, requires_grad=True)
        ah = torch.rand(B, C, H, device=self.device, requires_grad=True)
        aw = torch.rand(B, C, W, device=self.device, requires_grad=True)
        xh, xw = coord_pool(x, backend=self.backend)
        txh, txw = coord_pool(x, backend="torch")     # a mean over nothing is NaN, as in torch
        torch.testing.assert_close(xh, txh, equal_nan=True)
        torch.testing.assert_close(xw, txw, equal_nan=True)
        y = coord_scale(x, ah, aw, backend=self.backend)
        (y.sum() + xh.nansum() + xw.nansum()).backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert ah.grad.shape == ah.shape and not ah.grad.any() and not aw.grad.any()

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice", "permuted"])
    def test_gradcheck(self, layout):
        g = torch.Generator().manual_seed(3)
        x = self._make((2, 3, 4, 5), torch.float64, layout, g).detach().requires_grad_()
        ah = torch.rand(2, 3, 4, generator=g, dtype=torch.float64).to(self.device).requires_grad_()
        aw = torch.rand(2, 3, 5, generator=g, dtype=torch.float64).to(self.device).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: coord_pool(t, backend=self.backend), (x,))
        assert torch.autograd.gradcheck(lambda *t: coord_scale(*t, backend=self.backend), (x, ah, aw))

    def test_opcheck(self):
        d = self.device
        x = torch.randn(2, 3, 4, 5, device=d, requires_grad=True)
        cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        ah, aw = torch.rand(2, 3, 4, device=d, requires_grad=True), torch.rand(2, 3, 5, device=d, requires_grad=True)
        for xx in (x, cl):
            torch.library.opcheck(torch.ops.fastattn.coord_pool.default, (xx, self.backend))
            torch.library.opcheck(torch.ops.fastattn.coord_scale.default, (xx, ah, aw, self.backend))
            torch.library.opcheck(torch.ops.fastattn.coord_scale_backward.default,
                                  (torch.randn(2, 3, 4, 5, device=d), xx.detach(), ah.detach(), aw.detach(),
                                   self.backend))
        for channels_last in (False, True):
            torch.library.opcheck(torch.ops.fastattn.coord_pool_backward.default,
                                  (torch.randn(2, 3, 4, device=d), torch.randn(2, 3, 5, device=d), channels_last,
                                   self.backend))

    def test_deterministic(self):
        """The reductions (x_w; da_h, da_w) are bitwise repeatable, also across thread counts."""
        g = torch.Generator().manual_seed(4)
        for layout, shape in (("nchw", (1, 3, 300, 40)), ("channels_last", (1, 64, 90, 30)),
                              ("channels_last", (2, 8, 4500, 2))):
            x = self._make(shape, torch.float32, layout, g)
            dy = self._make(shape, torch.float32, layout, g)
            B, C, H, W = shape
            ah, aw = torch.rand(B, C, H, device=self.device), torch.rand(B, C, W, device=self.device)
            runs = []
            for threads in (1, 2, 3, 1):
                old = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    runs.append(torch.ops.fastattn_C.coord_pool(x) + torch.ops.fastattn_C.coord_scale_backward(
                        dy, x, ah, aw))
                finally:
                    torch.set_num_threads(old)
            for r in runs[1:]:
                for a, b in zip(runs[0], r):
                    assert torch.equal(a, b)

    def test_auto_backend(self):
        import importlib

        coord = importlib.import_module("fastattn.ops.coord")
        x = torch.randn(1, 4, 5, 6, device=self.device)
        if self.device == "cpu":
            want = "cpu"
        else:                   # CUDA tensors: Triton first, then the CUDA C++ kernels
            want = "triton" if _dispatch.triton_reason(x) is None else "cuda"
        assert _dispatch.resolve("coord_pool", x, "auto", coord.CHECKS) == want

    def test_raw_op_checks(self):
        d, op = self.device, torch.ops.fastattn_C
        x = torch.randn(2, 3, 4, 5, device=d)
        ah, aw = torch.rand(2, 3, 4, device=d), torch.rand(2, 3, 5, device=d)
        with pytest.raises(ValueError, match=r"coord_pool: argument 'x' must be 4-D"):
            op.coord_pool(x[0])
        with pytest.raises(TypeError, match=r"coord_pool: argument 'x' must be float32, float64, float16 or bf"):
            op.coord_pool(x.int())
        with pytest.raises(TypeError, match=r"coord_scale: argument 'a_h' must be Float, got Double"):
            op.coord_scale(x, ah.double(), aw)
        with pytest.raises(ValueError, match=r"coord_scale: argument 'a_w' must have shape \(B, C, W\) = \(2, 3, 5\)"):
            op.coord_scale(x, ah, aw[:, :, :4])
        with pytest.raises(ValueError, match=r"coord_scale: argument 'a_h' must be contiguous"):
            op.coord_scale(x, torch.rand(2, 4, 3, device=d).transpose(1, 2), aw)
        with pytest.raises(TypeError, match=r"coord_scale_backward: argument 'dy' must have the dtype of 'x'"):
            op.coord_scale_backward(x.double(), x, ah, aw)
        with pytest.raises(ValueError, match=r"coord_scale_backward: argument 'dy' must have the shape of 'x'"):
            op.coord_scale_backward(x[:, :2], x, ah, aw)
        with pytest.raises(ValueError, match=r"coord_pool_backward: argument 'dxw' must have shape \(B, C, W\)"):
            op.coord_pool_backward(ah, aw[:1], False)
        with pytest.raises(TypeError, match=r"coord_pool_backward: argument 'dxw' must be Float"):
            op.coord_pool_backward(ah, aw.half(), False)


@pytest.mark.skipif(_kernel_ready("cpu") is not None, reason=str(_kernel_ready("cpu")))
class TestCoordCpu(_CoordKernelTests):
    device = "cpu"
    backend = "cpu"


@pytest.mark.gpu
class TestCoordCuda(_CoordKernelTests):
    device = "cuda"
    backend = "cuda"

    def test_kernels_are_built(self):
        assert _kernel_ready("cuda") is None, _kernel_ready("cuda")

    def test_large_batch_grid(self):
        """B * C beyond 65535 blocks: the big dimension is on grid axis x."""
        self._check((70000, 1, 2, 3), torch.float32, "nchw")
        self._check((3, 40000, 2, 3), torch.float32, "channels_last")

    def test_gates_on_another_device(self):
        x = torch.randn(2, 3, 4, 5, device="cuda")
        with pytest.raises(RuntimeError, match=r"coord_scale: .*'a_h'"):
            torch.ops.fastattn_C.coord_scale(x, torch.rand(2, 3, 4), torch.rand(2, 3, 5, device="cuda"))
