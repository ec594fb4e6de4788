"""fastattn::channel_scale on the CPU (torch backend): math, gradcheck, opcheck, errors, dispatch."""
import pytest
import torch

from fastattn.ops import _dispatch
from fastattn.ops.gate import channel_scale


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)        # the same inputs whichever tests ran before


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_math_and_format(layout):
    x = torch.randn(2, 5, 3, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    a, r = torch.rand(2, 5), torch.randn(2, 5, 3, 7)
    y = channel_scale(x, a, r)
    torch.testing.assert_close(y, x * a[:, :, None, None] + r)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_low_precision_output_dtype():
    x = torch.randn(2, 5, 3, 3, dtype=torch.bfloat16)
    y = channel_scale(x, torch.rand(2, 5))          # a in fp32, x in bf16: output stays bf16
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("with_residual", [False, True])
def test_gradcheck(with_residual):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True) if with_residual else None
    args = (x, a, r) if with_residual else (x, a)
    assert torch.autograd.gradcheck(lambda *t: channel_scale(*t), args)


def test_opcheck():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    a = torch.rand(2, 3, requires_grad=True)
    r = torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.fastattn.channel_scale.default, (x, a, r, "torch"))
    torch.library.opcheck(torch.ops.fastattn.channel_scale.default, (x, a, None, "torch"))
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.channel_scale.default, (cl, a, None, "torch"))
    torch.library.opcheck(torch.ops.fastattn.channel_scale_backward.default, (torch.randn(2, 3, 4, 5), x.detach(),
                                                                             a.detach(), "torch"))
    # dy in another layout than x: the real strides must still be the promised ones
    torch.library.opcheck(torch.ops.fastattn.channel_scale_backward.default, (torch.randn(2, 3, 4, 5), cl.detach(),
                                                                             a.detach(), "torch"))


@pytest.mark.parametrize("args,err,match", [
    (lambda: (torch.randn(2, 3, 4), torch.rand(2, 3)), ValueError, r"channel_scale: argument 'x' must be 4-D"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.rand(2, 4)), ValueError, r"argument 'a' must have shape \(B, C\)"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.rand(6)), ValueError, r"argument 'a' must be 2-D"),
    (lambda: (torch.ones(2, 3, 4, 4, dtype=torch.int32), torch.rand(2, 3)), TypeError, r"argument 'x' must be a floating"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.rand(2, 3), torch.randn(2, 3, 4, 5)), ValueError,
     r"argument 'residual' must have the shape of 'x'"),
])
def test_bad_arguments(args, err, match):
    with pytest.raises(err, match=match):
        channel_scale(*args())


def test_explicit_backend_that_cannot_run_says_why():
    x, a = torch.randn(1, 2, 3, 3), torch.rand(1, 2)
    if _dispatch.triton_interpreting():
        pytest.skip("interpreter on")
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run here: .*(CUDA tensors|not installed)"):
        channel_scale(x, a, backend="triton")
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run here"):
        channel_scale(x, a, backend="cuda")
    with pytest.raises(ValueError, match=r"argument 'backend' must be one of"):
        channel_scale(x, a, backend="fast")


def test_auto_on_cpu_and_use_backend():
    x = torch.randn(1, 2, 3, 3)
    assert _dispatch.resolve("channel_scale", x, "auto", {"triton": _dispatch.triton_reason}) == "torch"
    with _dispatch.use_backend("torch"):
        assert _dispatch.get_backend() == "torch"
    assert _dispatch.get_backend() == "auto"


def test_compile_fullgraph():
    def f(x, a):
        return channel_scale(x, torch.sigmoid(a))

    x, a = torch.randn(2, 4, 5, 5), torch.randn(2, 4)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x, a), f(x, a))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_on_cuda(layout, dtype):
    x = torch.randn(8, 256, 56, 56, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    a = torch.rand(8, 256, device="cuda", requires_grad=True)
    xg = x.clone().requires_grad_()
    y = channel_scale(xg, a, backend="triton")
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y.float(), x.float() * a.detach()[:, :, None, None], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.grad, x.float().sum((2, 3)), rtol=1e-2, atol=1e-1)


CS_MODES = ["max", "add", "bam", "bam_sum"]


@pytest.mark.parametrize("mode", CS_MODES)
def test_channel_spatial_gate_math_and_gradcheck(mode):
    from fastattn.ops.gate import channel_spatial_gate

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.randn(2, 1, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    a4 = a[:, :, None, None]
    want = {"max": torch.maximum(x * a4, x * s), "add": x * a4 + x * s,
            "bam": x * (1 + torch.sigmoid(a4 * s)), "bam_sum": x * (1 + torch.sigmoid(a4 + s))}[mode]
    torch.testing.assert_close(channel_spatial_gate(x, a, s, mode), want)
    assert torch.autograd.gradcheck(lambda *t: channel_spatial_gate(*t, mode), (x, a, s))


def test_channel_spatial_gate_opcheck_and_format():
    from fastattn.ops.gate import channel_spatial_gate

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    a, s = torch.rand(2, 3, requires_grad=True), torch.rand(2, 1, 4, 5, requires_grad=True)
    assert channel_spatial_gate(x, a, s).is_contiguous(memory_format=torch.channels_last)
    for mode in CS_MODES:
        torch.library.opcheck(torch.ops.fastattn.channel_spatial_gate.default, (x, a, s, mode, "torch"))
    torch.library.opcheck(torch.ops.fastattn.channel_spatial_gate_backward.default,
                          (torch.randn(2, 3, 4, 5), x.detach(), a.detach(), s.detach(), "bam", "torch"))


@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(2, 3, 4, 4), torch.rand(2, 3), torch.rand(2, 4, 4)), r"argument 's' must be 4-D"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.rand(2, 3), torch.rand(2, 1, 4, 5)), r"argument 's' must have shape"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.rand(3, 2), torch.rand(2, 1, 4, 4)), r"argument 'a' must have shape"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.rand(2, 3), torch.rand(2, 1, 4, 4), "min"), r"argument 'mode' must be"),
])
def test_channel_spatial_gate_bad_arguments(args, match):
    from fastattn.ops.gate import channel_spatial_gate

    with pytest.raises(ValueError, match=r"channel_spatial_gate: " + match):
        channel_spatial_gate(*args())


def test_channel_affine_gate_math_gradcheck_opcheck():
    from fastattn.ops.gate import channel_affine_gate

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    al = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    be = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    want = x * torch.sigmoid(al[:, :, None, None] * x + be[:, :, None, None])
    torch.testing.assert_close(channel_affine_gate(x, al, be), want)
    assert torch.autograd.gradcheck(lambda *t: channel_affine_gate(*t), (x, al, be))
    cl = x.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.channel_affine_gate.default, (cl, al.float(), be.float(), "torch"))
    torch.library.opcheck(torch.ops.fastattn.channel_affine_gate_backward.default,
                          (torch.randn(2, 3, 4, 5), cl.detach(), al.detach().float(), be.detach().float(), "torch"))
    with pytest.raises(ValueError, match=r"channel_affine_gate: argument 'beta' must have shape"):
        channel_affine_gate(x, al, be[:1])


# ---------------------------------------------------------------------------------------------
# channel_scale, backend="cpu" (the OpenMP C++ kernels of fastattn._C)
# ---------------------------------------------------------------------------------------------

def _cpu_scale_ready():
    from fastattn.ops import gate

    return gate.CHECKS["cpu"](torch.empty(0))


@pytest.mark.skipif(_cpu_scale_ready() is not None, reason=str(_cpu_scale_ready()))
class TestChannelScaleCpu:
    DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

    @staticmethod
    def _make(shape, dtype, layout):
        B, C, H, W = shape
        if layout == "slice":                  # a channel slice of a wider NCHW tensor: not dense
            return torch.randn(B, C + 3, H, W, dtype=dtype)[:, 1:C + 1]
        if layout == "slice_cl":               # a channel slice of a channels_last tensor
            return torch.randn(B, C + 3, H, W, dtype=dtype).contiguous(memory_format=torch.channels_last)[:, 2:C + 2]
        if layout == "permuted":               # (B, C, W, H) storage seen transposed: the generic path
            return torch.randn(B, C, W, H, dtype=dtype).transpose(2, 3)
        x = torch.randn(shape, dtype=dtype)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    @staticmethod
    def _tols(dtype):
        return {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12),
                torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}[dtype]

    def _check(self, shape, dtype, layout, with_residual, dy_layout=None):
        x = self._make(shape, dtype, layout)
        a = torch.rand(shape[:2])
        r = self._make(shape, dtype, "channels_last" if layout == "nchw" else "nchw") if with_residual else None
        dy = self._make(shape, dtype, dy_layout or layout)
        outs = {}
        for backend in ("cpu", "torch"):
            xg, ag = x.clone().requires_grad_(), a.clone().requires_grad_()
            # clone() keeps the strides of a dense x; re-view the non-dense layouts so the kernel sees them
            if layout in ("slice", "slice_cl", "permuted"):
                xg = x.detach().requires_grad_()
            rg = r.clone().requires_grad_() if r is not None else None
            y = channel_scale(xg, ag, rg, backend=backend)
            y.backward(dy)
            outs[backend] = (y, xg.grad, ag.grad, rg.grad if rg is not None else None, xg)
            xg.grad = None
        y, dx, da, dr, xg = outs["cpu"]
        yt, dxt, dat, drt, _ = outs["torch"]
        # strides: those of torch.empty_like(x) (channels_last stays channels_last)
        assert y.dtype == x.dtype and dx.dtype == x.dtype and da.dtype == a.dtype
        assert y.stride() == torch.empty_like(x).stride()
        # (x.grad is restrided by autograd for a non-dense x: ask the backward op itself)
        dx_op, _ = torch.ops.fastattn.channel_scale_backward(dy, x, a, "cpu")
        assert dx_op.stride() == torch.empty_like(x).stride()
        # float64 math
        x64, a64, dy64 = x.double(), a.double()[:, :, None, None], dy.double()
        y64 = x64 * a64 + (r.double() if r is not None else 0)
        rtol, atol = self._tols(dtype)
        torch.testing.assert_close(y.double(), y64, rtol=rtol, atol=atol)
        torch.testing.assert_close(dx.double(), dy64 * a64, rtol=rtol, atol=atol)
        da64 = (dy64 * x64).sum((2, 3))
        da_atol = 1e-5 * max(1, shape[2] * shape[3]) ** 0.5     # both sums round in fp32
        torch.testing.assert_close(da.double(), da64, rtol=1e-5, atol=da_atol)
        if r is not None:
            torch.testing.assert_close(dr, dy)
        # and the torch path, in the same dtype: the same fp32 math, where the C++ kernel may fuse
        # x * a + r into one fma (one rounding fewer): at most one rounding step of the dtype apart
        # (one rounding of x * a: relative to |x * a|, not to |y|, which cancellation can make tiny)
        ulp = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        bound = ulp * (yt.double().abs() + (0 if r is None else (x64 * a64).abs()))
        assert bool(((y.double() - yt.double()).abs() <= bound).all()), (y.double() - yt.double()).abs().max()
        torch.testing.assert_close(dx, dxt, rtol=0, atol=0)
        torch.testing.assert_close(da, dat, rtol=1e-5, atol=2 * da_atol)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice", "slice_cl", "permuted"])
    @pytest.mark.parametrize("with_residual", [False, True])
    def test_matches_torch_and_fp64(self, dtype, layout, with_residual):
        self._check((2, 70, 13, 17), dtype, layout, with_residual)

    @pytest.mark.parametrize("shape", [(1, 70, 13, 17), (3, 5, 1, 1), (1, 1, 7, 7), (2, 600, 9, 9),
                                       (1, 16, 100, 90), (0, 8, 5, 5), (2, 3, 0, 4)])
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    def test_odd_shapes(self, shape, layout):
        self._check(shape, torch.float32, layout, with_residual=True)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("layout,dy_layout", [("channels_last", "nchw"), ("nchw", "channels_last"),
                                                  ("slice_cl", "nchw")])
    def test_dy_in_another_layout(self, dtype, layout, dy_layout):
        self._check((2, 70, 13, 17), dtype, layout, True, dy_layout)

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
    @pytest.mark.parametrize("with_residual", [False, True])
    def test_gradcheck(self, layout, with_residual):
        x = self._make((2, 3, 4, 5), torch.float64, layout).detach().requires_grad_()
        a = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
        r = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True) if with_residual else None
        assert torch.autograd.gradcheck(lambda x, a, r: channel_scale(x, a, r, backend="cpu"), (x, a, r))

    def test_opcheck(self):
        x = torch.randn(2, 3, 4, 5, requires_grad=True)
        a = torch.rand(2, 3, requires_grad=True)
        r = torch.randn(2, 3, 4, 5, requires_grad=True)
        cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        op = torch.ops.fastattn.channel_scale.default
        torch.library.opcheck(op, (x, a, r, "cpu"))
        torch.library.opcheck(op, (x, a, None, "cpu"))
        torch.library.opcheck(op, (cl, a, r, "cpu"))
        bwd = torch.ops.fastattn.channel_scale_backward.default
        torch.library.opcheck(bwd, (torch.randn(2, 3, 4, 5), cl.detach(), a.detach(), "cpu"))

    def test_auto_prefers_cpu_and_deterministic_da(self):
        from fastattn.ops import gate

        x = torch.randn(1, 64, 40, 40).contiguous(memory_format=torch.channels_last)
        assert _dispatch.resolve("channel_scale", x, "auto", gate.CHECKS) == "cpu"
        dy, a = torch.randn_like(x), torch.rand(1, 64)
        da = [torch.ops.fastattn_C.channel_scale_backward(dy, x, a)[1] for _ in range(3)]
        assert all(torch.equal(da[0], d) for d in da[1:])

    def test_raw_op_checks(self):
        x = torch.randn(2, 3, 4, 4)
        with pytest.raises(TypeError, match="argument 'a' must be Float"):
            torch.ops.fastattn_C.channel_scale(x, torch.rand(2, 3, dtype=torch.float64), None)
        with pytest.raises(ValueError, match=r"argument 'a' must have shape \(B, C\)"):
            torch.ops.fastattn_C.channel_scale(x, torch.rand(2, 4), None)
        with pytest.raises(ValueError, match="argument 'residual' must have the shape"):
            torch.ops.fastattn_C.channel_scale(x, torch.rand(2, 3), torch.randn(2, 3, 4, 5))
        with pytest.raises(TypeError, match="argument 'dy' must have the dtype"):
            torch.ops.fastattn_C.channel_scale_backward(x.half(), x, torch.rand(2, 3))


# ---------------------------------------------------------------------------------------------
# The C++ kernels of every gate op against float64 math: backend "cpu" (CPU tensors) and backend
# "cuda" (CUDA tensors; marked gpu, skipped without a GPU). Forward and every gradient, in every
# layout (NCHW, channels_last, channel slices of both, a transposed view that takes the generic
# path, a view with an unaligned base), odd shapes, all dtypes, dy in another layout than x.
# ---------------------------------------------------------------------------------------------

from fastattn.ops import gate as gate_ops  # noqa: E402

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
LAYOUTS = ["nchw", "channels_last", "slice", "slice_cl", "permuted", "offset"]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPS = ["scale", "scale_res", "max", "add", "bam", "bam_sum", "affine"]


def _ext_reason(device):
    if device != "cpu":
        return None      # backend="cuda" must work on a GPU machine: a missing kernel fails the test
    return gate_ops.CS_CHECKS["cpu"](torch.empty(0))


def _skip_without_ext(device):
    why = _ext_reason(device)
    if why is not None:
        pytest.skip(why)


def _map(shape, dtype, layout, device, g):
    """A (B, C, H, W) random map in one of LAYOUTS (values drawn on the CPU: the same on every device)."""
    B, C, H, W = shape

    def rnd(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    if layout == "nchw":
        return rnd(*shape)
    if layout == "channels_last":
        return rnd(*shape).contiguous(memory_format=torch.channels_last)
    if layout == "slice":            # a channel slice of a wider NCHW tensor: planes contiguous, not dense
        return rnd(B, C + 3, H, W)[:, 1:C + 1]
    if layout == "slice_cl":         # a channel slice of a channels_last tensor
        return rnd(B, C + 3, H, W).contiguous(memory_format=torch.channels_last)[:, 2:C + 2]
    if layout == "permuted":         # (B, C, W, H) storage seen transposed: H x W does not flatten
        return rnd(B, C, W, H).transpose(2, 3)
    if layout == "offset":           # dense NCHW one element into its storage: no 16-byte alignment
        return rnd(B * C * H * W + 1)[1:].view(shape)
    raise ValueError(layout)


def _params(op, shape, dtype, device, g):
    """The small inputs of op, in x's accumulation dtype (or in `dtype`)."""
    B, C, H, W = shape

    def rnd(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    if op in ("scale", "scale_res"):
        return {"a": torch.rand(B, C, generator=g).to(device=device, dtype=dtype)}
    if op == "affine":
        return {"alpha": rnd(B, C), "beta": rnd(B, C)}
    return {"a": rnd(B, C), "s": rnd(B, 1, H, W)}


def _call(op, x, p, r, backend):
    if op in ("scale", "scale_res"):
        return gate_ops.channel_scale(x, p["a"], r, backend=backend)
    if op == "affine":
        return gate_ops.channel_affine_gate(x, p["alpha"], p["beta"], backend=backend)
    return gate_ops.channel_spatial_gate(x, p["a"], p["s"], op, backend=backend)


def _reference(op, x, p, r, dy, acc):
    """(y, grads) in float64: grads maps 'x' and each parameter (and 'r') to its gradient. The max
    mode's choice is made in the kernels' math dtype `acc`, as they make it."""
    x64, dy64 = x.double(), dy.double()
    q = {k: v.double() for k, v in p.items()}
    if op in ("scale", "scale_res"):
        a4 = q["a"][:, :, None, None]
        y = x64 * a4 + (r.double() if r is not None else 0)
        grads = {"x": dy64 * a4, "a": (dy64 * x64).sum((2, 3))}
        if r is not None:
            grads["r"] = dy64
        return y, grads
    if op == "affine":
        al, be = q["alpha"][:, :, None, None], q["beta"][:, :, None, None]
        sg = torch.sigmoid(al * x64 + be)
        u = dy64 * x64 * sg * (1 - sg)
        return x64 * sg, {"x": dy64 * sg + u * al, "alpha": (u * x64).sum((2, 3)), "beta": u.sum((2, 3))}
    a4, s = q["a"][:, :, None, None], q["s"]
    if op == "max":     # torch.maximum's gradient: half to each side on a tie
        xa, a_acc, s_acc = x.to(acc), p["a"].to(acc)[:, :, None, None], p["s"].to(acc)
        win, tie = xa * a_acc >= xa * s_acc, xa * a_acc == xa * s_acc
        wa = torch.where(tie, 0.5, win.double())
        ws = torch.where(tie, 0.5, 1 - win.double())
        g = dy64 * x64
        return (torch.where(win, x64 * a4, x64 * s),
                {"x": dy64 * (wa * a4 + ws * s), "a": (wa * g).sum((2, 3)), "s": (ws * g).sum(1, keepdim=True)})
    if op == "add":
        g = dy64 * x64
        return x64 * (a4 + s), {"x": dy64 * (a4 + s), "a": g.sum((2, 3)), "s": g.sum(1, keepdim=True)}
    sg = torch.sigmoid(a4 * s if op == "bam" else a4 + s)
    dt = dy64 * x64 * sg * (1 - sg)
    ga, gs = (dt * s, dt * a4) if op == "bam" else (dt, dt)
    return x64 * (1 + sg), {"x": dy64 * (1 + sg), "a": ga.sum((2, 3)), "s": gs.sum(1, keepdim=True)}


_ELEM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _run(op, x, p, r, dy, backend):
    """Forward and backward through the public op: (y, {name: grad})."""
    xg = x.detach().requires_grad_()
    pg = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    rg = r.detach().clone().requires_grad_() if r is not None else None
    y = _call(op, xg, pg, rg, backend)
    y.backward(dy)
    grads = {"x": xg.grad, **{k: v.grad for k, v in pg.items()}}
    if rg is not None:
        grads["r"] = rg.grad
    return y, grads


def _check(op, shape, dtype, layout, device, *, dy_layout=None, param_dtype=None, seed=0):
    backend = "cpu" if device == "cpu" else "cuda"
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = _map(shape, dtype, layout, device, g)
    p = _params(op, shape, param_dtype or acc, device, g)
    if op == "max" and x.numel():
        # ties: x = 0 (every pixel of a column, as after a ReLU), and a = s at one pixel of channel 0
        x[..., ::3] = 0
        p["a"][:, 0] = p["s"][:, 0, 0, -1]
    r = _map(shape, dtype, "channels_last" if layout == "nchw" else "nchw", device, g) if op == "scale_res" else None
    dy = _map(shape, dtype, dy_layout or layout, device, g)
    y, grads = _run(op, x, p, r, dy, backend)
    # dtypes and strides: those of torch.empty_like(x), the small gradients in their input's dtype
    assert y.dtype == x.dtype and y.stride() == torch.empty_like(x).stride()
    for k, v in p.items():
        assert grads[k].dtype == v.dtype and grads[k].shape == v.shape, k
    y64, g64 = _reference(op, x, p, r, dy, acc)
    tol = _ELEM_TOL[dtype]
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(grads["x"].double(), g64["x"], rtol=tol, atol=tol)
    if r is not None:
        torch.testing.assert_close(grads["r"], dy)
    B, C, H, W = shape
    for k in p:
        # sums over H x W (channel parameters) or over C (s): fp32 accumulation of fp32 terms
        n = C if k == "s" else H * W
        ptol = _ELEM_TOL[p[k].dtype] if p[k].dtype in (torch.float16, torch.bfloat16) else 0
        rtol = 1e-10 if acc == torch.float64 else 1e-5
        atol = (1e-10 if acc == torch.float64 else 2e-5) * max(1, n) ** 0.5
        torch.testing.assert_close(grads[k].double(), g64[k], rtol=max(rtol, ptol), atol=max(atol, ptol), msg=k)
    if dtype in (torch.float16, torch.bfloat16) and x.numel():
        # no further from float64 than PyTorch's own math in the same dtype (2x, plus a little)
        yt, gt = _run(op, x, p, r, dy, "torch")
        for got, want, ref in ((y, yt, y64), (grads["x"], gt["x"], g64["x"])):
            err, err_t = (got.double() - ref).abs().max().item(), (want.double() - ref).abs().max().item()
            assert err <= 2 * err_t + tol * 0.1, (err, err_t)
    return y, grads


@pytest.mark.parametrize("device", DEVICES)
class TestGateKernels:
    """channel_scale, channel_spatial_gate (4 modes) and channel_affine_gate on the C++ kernels."""

    @pytest.fixture(autouse=True)
    def _ext(self, device):
        _skip_without_ext(device)

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
    @pytest.mark.parametrize("op", OPS)
    def test_matches_float64(self, device, op, dtype, layout):
        _check(op, (2, 70, 13, 17), dtype, layout, device)

    @pytest.mark.parametrize("shape", [
        (1, 70, 13, 17), (3, 5, 1, 1), (1, 1, 7, 7), (4, 3, 1, 9), (2, 600, 9, 9), (1, 16, 100, 90),
        (2, 1100, 5, 3), (1, 3, 70, 70), (2, 33, 1, 1), (0, 8, 5, 5), (2, 3, 0, 4), (2, 0, 3, 3)], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("op", OPS)
    def test_odd_shapes(self, device, op, shape, layout):
        _check(op, shape, torch.float32, layout, device)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("layout,dy_layout", [("channels_last", "nchw"), ("nchw", "channels_last"),
                                                  ("slice_cl", "nchw"), ("nchw", "permuted")])
    @pytest.mark.parametrize("op", ["scale", "max", "bam", "affine"])
    def test_dy_in_another_layout(self, device, op, dtype, layout, dy_layout):
        _check(op, (2, 70, 13, 17), dtype, layout, device, dy_layout=dy_layout)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("op", ["scale", "max", "bam_sum", "affine"])
    def test_params_in_the_maps_dtype(self, device, op, dtype):
        # as the modules call them: gates computed in x's dtype, gradients returned in it
        _check(op, (2, 40, 9, 11), dtype, "channels_last", device, param_dtype=dtype)

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "permuted"])
    @pytest.mark.parametrize("op", OPS)
    def test_gradcheck(self, device, op, layout):
        g = torch.Generator().manual_seed(1)
        shape = (2, 3, 4, 5)
        x = _map(shape, torch.float64, layout, device, g).requires_grad_()
        p = {k: v.requires_grad_() for k, v in _params(op, shape, torch.float64, device, g).items()}
        r = _map(shape, torch.float64, "nchw", device, g).requires_grad_() if op == "scale_res" else None
        backend = "cpu" if device == "cpu" else "cuda"
        names = list(p)

        def f(x, *args):
            return _call(op, x, dict(zip(names, args[:len(names)])), args[len(names)] if r is not None else None,
                         backend)

        inputs = (x, *p.values(), *([r] if r is not None else []))
        assert torch.autograd.gradcheck(f, inputs)

    @pytest.mark.parametrize("op", OPS)
    def test_opcheck(self, device, op):
        g = torch.Generator().manual_seed(2)
        backend = "cpu" if device == "cpu" else "cuda"
        for layout in ("nchw", "channels_last"):
            shape = (2, 3, 4, 5)
            x = _map(shape, torch.float32, layout, device, g).requires_grad_()
            p = {k: v.requires_grad_() for k, v in _params(op, shape, torch.float32, device, g).items()}
            dy = _map(shape, torch.float32, "nchw", device, g)     # another layout than x for one of them
            xd, pd = x.detach(), {k: v.detach() for k, v in p.items()}
            if op in ("scale", "scale_res"):
                r = _map(shape, torch.float32, "nchw", device, g).requires_grad_() if op == "scale_res" else None
                torch.library.opcheck(torch.ops.fastattn.channel_scale.default, (x, p["a"], r, backend))
                torch.library.opcheck(torch.ops.fastattn.channel_scale_backward.default, (dy, xd, pd["a"], backend))
            elif op == "affine":
                torch.library.opcheck(torch.ops.fastattn.channel_affine_gate.default,
                                      (x, p["alpha"], p["beta"], backend))
                torch.library.opcheck(torch.ops.fastattn.channel_affine_gate_backward.default,
                                      (dy, xd, pd["alpha"], pd["beta"], backend))
            else:
                torch.library.opcheck(torch.ops.fastattn.channel_spatial_gate.default, (x, p["a"], p["s"], op, backend))
                torch.library.opcheck(torch.ops.fastattn.channel_spatial_gate_backward.default,
                                      (dy, xd, pd["a"], pd["s"], op, backend))

    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("op", ["scale", "max", "bam", "affine"])
    def test_backward_is_deterministic(self, device, op, layout):
        # partial sums cross blocks and segments at this shape on both devices
        g = torch.Generator().manual_seed(3)
        shape = (2, 300, 48, 48)
        x = _map(shape, torch.float32, layout, device, g)
        p = _params(op, shape, torch.float32, device, g)
        dy = _map(shape, torch.float32, layout, device, g)
        runs = [_run(op, x, p, None, dy, "cpu" if device == "cpu" else "cuda")[1] for _ in range(3)]
        for k in runs[0]:
            assert all(torch.equal(runs[0][k], rr[k]) for rr in runs[1:]), k


def _raw_inputs(device="cpu"):
    x = torch.randn(2, 3, 4, 4, device=device)
    return x, torch.randn(2, 3, device=device), torch.randn(2, 1, 4, 4, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call,err,match", [
    (lambda x, a, s: torch.ops.fastattn_C.channel_spatial_gate(x[0], a, s, "max"), ValueError,
     r"channel_spatial_gate: argument 'x' must be 4-D"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_spatial_gate(x.int(), a, s, "max"), TypeError,
     r"argument 'x' must be float32, float64, float16 or bfloat16"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_spatial_gate(x, a.double(), s, "max"), TypeError,
     r"argument 'a' must be Float for 'x' of dtype Float"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_spatial_gate(x, a[:, :2], s, "max"), ValueError,
     r"argument 'a' must have shape \(B, C\) = \[2, 3\]"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_spatial_gate(x, a.t().contiguous().t(), s, "max"), ValueError,
     r"argument 'a' must be contiguous"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_spatial_gate(x, a, s[..., :3], "max"), ValueError,
     r"argument 's' must have shape \(B, 1, H, W\)"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_spatial_gate(x, a, s, "mul"), ValueError,
     r"argument 'mode' must be one of 'max', 'add', 'bam', 'bam_sum', got 'mul'"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_spatial_gate_backward(x.half(), x, a, s, "add"), TypeError,
     r"channel_spatial_gate_backward: argument 'dy' must have the dtype of 'x'"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_spatial_gate_backward(x[:1], x, a, s, "add"), ValueError,
     r"argument 'dy' must have the shape of 'x'"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_affine_gate(x, a, a[:1]), ValueError,
     r"channel_affine_gate: argument 'beta' must have shape \(B, C\)"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_affine_gate(x.double(), a, a.double()), TypeError,
     r"argument 'alpha' must be Double for 'x' of dtype Double"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_affine_gate_backward(x, x, a, a.half()), TypeError,
     r"channel_affine_gate_backward: argument 'beta' must be Float"),
    (lambda x, a, s: torch.ops.fastattn_C.channel_scale_backward(x.half(), x, a.abs()), TypeError,
     r"argument 'dy' must have the dtype"),
])
def test_raw_op_errors(device, call, err, match):
    _skip_without_ext(device)
    with pytest.raises(err, match=match):
        call(*_raw_inputs(device))


@pytest.mark.gpu
def test_cuda_raw_ops_reject_other_devices():
    x, a, s = _raw_inputs("cuda")
    with pytest.raises(RuntimeError, match=r"argument 'a' must be on the device of 'x'"):
        torch.ops.fastattn_C.channel_spatial_gate(x, a.cpu(), s, "max")
    with pytest.raises(RuntimeError, match=r"argument 'dy' must be on the device of 'x'"):
        torch.ops.fastattn_C.channel_affine_gate_backward(x.cpu(), x, a, a)
    with pytest.raises(RuntimeError, match=r"channel_scale: argument 'residual' must be on the device of 'x'"):
        torch.ops.fastattn_C.channel_scale(x, a, x.cpu())


def test_auto_prefers_the_cpu_kernels():
    _skip_without_ext("cpu")
    x = torch.randn(1, 8, 5, 5)
    assert _dispatch.resolve(gate_ops.CS_OP, x, "auto", gate_ops.CS_CHECKS) == "cpu"
    assert _dispatch.resolve(gate_ops.AG_OP, x, "auto", gate_ops.AG_CHECKS) == "cpu"
    with pytest.raises(RuntimeError, match=r"channel_affine_gate: backend='cuda' cannot run here: .*CUDA tensors"):
        gate_ops.channel_affine_gate(x, torch.randn(1, 8), torch.randn(1, 8), backend="cuda")


_THREADS_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from fastattn import _ext
assert _ext.available(), _ext.why_unavailable()      # loads fastattn._C and its ops
g = torch.Generator().manual_seed(7)
out = {}
for layout in ("nchw", "channels_last"):
    x = torch.randn(2, 300, 48, 48, generator=g)
    dy = torch.randn(2, 300, 48, 48, generator=g)
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    a, s = torch.randn(2, 300, generator=g), torch.randn(2, 1, 48, 48, generator=g)
    out[layout + "_cs"] = torch.ops.fastattn_C.channel_spatial_gate_backward(dy, x, a, s, "bam")[1:]
    out[layout + "_ag"] = torch.ops.fastattn_C.channel_affine_gate_backward(dy, x, a, a.flip(1).contiguous())[1:]
    out[layout + "_sc"] = torch.ops.fastattn_C.channel_scale_backward(dy, x, a.abs())[1:]
torch.save(out, sys.argv[2])
"""


def test_cpu_reductions_do_not_depend_on_the_thread_count(tmp_path):
    """The same bits with 1 and 3 OpenMP threads (a fixed summation order, whatever the threads)."""
    import os
    import subprocess
    import sys

    _skip_without_ext("cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for threads in ("1", "3"):
        path = tmp_path / f"out{threads}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, root, str(path)], check=True, env=env)
        results.append(torch.load(path))
    for k in results[0]:
        for u, v in zip(results[0][k], results[1][k]):
            assert torch.equal(u, v), k


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 256, 56, 56), (32, 1024, 14, 14), (8, 2048, 7, 7), (2, 64, 112, 112)],
                         ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["scale_res", "max", "bam", "affine"])
def test_cuda_resnet_shapes(op, dtype, layout, shape):
    """The shapes the benchmarks use: vector loads, many tiles, partial sums across tiles."""
    _check(op, shape, dtype, layout, "cuda")


@pytest.mark.gpu
def test_cuda_backend_is_registered():
    from fastattn import _ext

    assert _ext.has_cuda_kernels(), f"fastattn._C has no CUDA kernels: {_ext.why_unavailable() or _ext.build_info()}"
    x = torch.empty(1, 1, 1, 1, device="cuda")
    for checks in (gate_ops.CHECKS, gate_ops.CS_CHECKS, gate_ops.AG_CHECKS):
        assert checks["cuda"](x) is None


def test_inference_calls_run_the_implementation_directly(monkeypatch):
    """Without autograd, compile or modes, an op with the C++ backend runs its implementation as a
    plain function (`_dispatch.run`); otherwise through the registered custom op. Same results."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastattn.ops import gate as gate_ops
    from fastattn.ops import pool as pool_ops

    calls = []
    for mod, name in ((gate_ops, "_channel_scale"), (pool_ops, "_channel_mean")):
        op = getattr(mod, name)
        monkeypatch.setattr(op, "plain", (lambda f, n: lambda *a: calls.append(n) or f(*a))(op.plain, name))
    x, a = torch.randn(2, 3, 4, 5), torch.rand(2, 3)
    with torch.no_grad():
        y1 = gate_ops.channel_scale(x, a, backend="cpu")
        m1 = pool_ops.channel_mean(x)
    assert calls == ["_channel_scale", "_channel_mean"]
    xg = x.clone().requires_grad_()
    y2 = gate_ops.channel_scale(xg, a, backend="cpu")      # autograd records: the custom op
    m2 = pool_ops.channel_mean(xg)
    assert y2.grad_fn is not None and m2.grad_fn is not None
    with torch.no_grad(), FlopCounterMode(display=False):  # a dispatch mode sees the custom op
        gate_ops.channel_scale(x, a, backend="cpu")
    with torch.no_grad():
        gate_ops.channel_scale(x, a, backend="torch")       # the torch backend: always the custom op
    assert calls == ["_channel_scale", "_channel_mean"]
    torch.testing.assert_close(y1, y2.detach(), rtol=0, atol=0)
    torch.testing.assert_close(m1, m2.detach(), rtol=0, atol=0)
