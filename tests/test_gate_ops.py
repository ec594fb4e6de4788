"""fastattn::channel_scale on the CPU (torch backend): math, gradcheck, opcheck, errors, dispatch."""
import pytest
import torch

from fastattn.ops import _dispatch
from fastattn.ops.gate import channel_scale


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
        ulp = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        torch.testing.assert_close(y, yt, rtol=ulp, atol=0 if r is None else ulp)
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
