"""fastattn::simam on the CPU (torch backend): math, gradient formula (gradcheck and autograd of the
reference module), opcheck, errors, dispatch; GPU-marked tests of the Triton kernels on CUDA."""
import pytest
import torch

from fastattn.ops import _dispatch
from fastattn.ops.simam import simam
from fastattn.reference.hybrid import SimAM

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = lambda d: str(d)[6:]  # noqa: E731


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "channel_slice", torch.stack([x, x], 2).flatten(1, 2)[:, ::2]      # x's values, channel stride 2
    yield "transposed", x.transpose(2, 3).contiguous().transpose(2, 3)


def math64(x, e_lambda):
    """Independent float64 SimAM, plane by plane with the statistics as Python-level sums."""
    x = x.double()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    B, C, H, W = x.shape
    n = H * W
    for b in range(B):
        for c in range(C):
            p = x[b, c].reshape(-1)
            mu = p.sum() / n
            var = ((p - mu) ** 2).sum() / (n - 1)
            energy_inv = (p - mu) ** 2 / (4 * (var + e_lambda)) + 0.5
            out[b, c] = (p / (1 + torch.exp(-energy_inv))).reshape(H, W)
    return out


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 3, 13, 17), (2, 4, 1, 2), (1, 2, 6, 1)], ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS)
@pytest.mark.parametrize("e_lambda", [1e-4, 0.1])
def test_torch_backend_math(shape, dtype, e_lambda):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g).mul(2).add(1).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    want_y = math64(x0, e_lambda)
    x64 = x0.double().clone().requires_grad_()
    SimAM(e_lambda)(x64).backward(dy.double())
    tol = TOL[dtype]
    scale = want_y.abs().max().item()
    for layout, xv in layouts(x0):
        x = xv.clone().requires_grad_()
        y = simam(x, e_lambda, backend="torch")
        assert y.dtype == dtype and y.shape == shape
        y.backward(dy)
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert x.grad.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.double(), want_y, rtol=tol, atol=tol * scale, msg=lambda m: f"{layout} y: {m}")
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{layout} dx: {m}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("e_lambda", [1e-4, 0.5])
def test_gradcheck(layout, e_lambda):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda t: simam(t, e_lambda, backend="torch"), (x.requires_grad_(),))


def test_gradcheck_smallest_plane():
    x = torch.randn(2, 3, 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: simam(t, 0.1, backend="torch"), (x,))


def test_matches_reference_module_autograd_fp32():
    x = torch.randn(4, 8, 9, 11)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    m = SimAM(0.1)
    yr, yo = m(xr), simam(xo, 0.1)
    dy = torch.randn_like(yr)
    yr.backward(dy)
    yo.backward(dy)
    torch.testing.assert_close(yo, yr)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_saves_only_x():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        simam(x)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


def test_opcheck():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for xx in (x, cl):
        torch.library.opcheck(torch.ops.fastattn.simam.default, (xx, 1e-4, "torch"))
        torch.library.opcheck(torch.ops.fastattn.simam_backward.default, (torch.randn(2, 3, 4, 5), xx.detach(),
                                                                          0.1, "torch"))
    # dy and x in different layouts: dx still has x's (the fake impl's promise)
    torch.library.opcheck(torch.ops.fastattn.simam_backward.default,
                          (torch.randn(2, 3, 4, 5), cl.detach(), 0.1, "torch"))


def test_empty_inputs():
    for shape in ((0, 3, 4, 5), (2, 0, 4, 5)):
        x = torch.randn(shape, requires_grad=True)
        y = simam(x)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape


@pytest.mark.parametrize("args,err,match", [
    (lambda: (torch.randn(2, 3, 4),), ValueError, r"simam: argument 'x' must be 4-D"),
    (lambda: (torch.ones(2, 3, 4, 4, dtype=torch.int32),), TypeError, r"simam: argument 'x' must be a floating"),
    (lambda: ("x",), TypeError, r"simam: argument 'x' must be a torch.Tensor"),
    (lambda: (torch.randn(2, 3, 1, 1),), ValueError, r"simam: argument 'x' must have at least 2 spatial positions"),
    (lambda: (torch.randn(2, 3, 0, 4),), ValueError, r"simam: argument 'x' must have at least 2 spatial positions"),
    (lambda: (torch.randn(2, 3, 4, 4), 0.0), ValueError, r"simam: argument 'e_lambda' must be a positive float"),
    (lambda: (torch.randn(2, 3, 4, 4), -1e-4), ValueError, r"simam: argument 'e_lambda' must be a positive float"),
    (lambda: (torch.randn(2, 3, 4, 4), float("nan")), ValueError, r"simam: argument 'e_lambda' must be a positive"),
    (lambda: (torch.randn(2, 3, 4, 4), float("inf")), ValueError, r"simam: argument 'e_lambda' must be a positive"),
    (lambda: (torch.randn(2, 3, 4, 4), "0.1"), ValueError, r"simam: argument 'e_lambda' must be a positive float"),
    (lambda: (torch.randn(2, 3, 4, 4), True), ValueError, r"simam: argument 'e_lambda' must be a positive float"),
])
def test_bad_arguments(args, err, match):
    with pytest.raises(err, match=match):
        simam(*args())


def test_integer_lambda_accepted():
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(simam(x, 1), SimAM(1)(x))


def test_explicit_backend_that_cannot_run_says_why():
    if _dispatch.triton_interpreting():
        pytest.skip("interpreter on")
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match=r"simam: backend='triton' cannot run here: .*(CUDA tensors|not installed)"):
        simam(x, backend="triton")
    with pytest.raises(RuntimeError, match=r"simam: backend='cuda' cannot run here: .*CUDA tensors"):
        simam(x, backend="cuda")
    with pytest.raises(ValueError, match=r"argument 'backend' must be one of"):
        simam(x, backend="fast")


def test_compile_fullgraph():
    def f(x):
        return simam(x * 2, 0.1) + 1

    x = torch.randn(2, 4, 5, 6)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 256, 56, 56), (32, 512, 7, 7), (2, 64, 112, 112)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=DTYPE_IDS)
def test_triton_on_cuda(shape, layout, dtype):
    x0 = torch.randn(shape, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    res = {}
    for backend in ("triton", "torch"):
        x = x0.clone().requires_grad_()
        y = simam(x, 0.1, backend=backend)
        y.backward(dy)
        res[backend] = (y, x.grad)
    if layout == "channels_last":
        assert res["triton"][0].is_contiguous(memory_format=torch.channels_last)
        assert res["triton"][1].is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for got, want, name in zip(res["triton"], res["torch"], ("y", "dx")):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# The C++ kernels: backend "cpu" (OpenMP, fastattn._C) and, marked gpu, backend "cuda"
# ---------------------------------------------------------------------------------------------

def _kernel_ready(backend):
    import importlib

    return importlib.import_module("fastattn.ops.simam").CHECKS[backend](
        torch.empty(0, device="cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"))


KTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


class _SimamKernelTests:
    """Every check of the C++ kernels, run on `device` with `backend` by the subclasses below."""

    device = "cpu"
    backend = "cpu"
    DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    LAYOUTS = ["nchw", "channels_last", "slice", "slice_cl", "permuted", "crop"]

    def _make(self, shape, dtype, layout, g, mean=0.0, std=1.0):
        B, C, H, W = shape

        def rnd(*s):
            return (torch.randn(*s, generator=g, dtype=torch.float64) * std + mean).to(self.device, dtype)

        if layout == "slice":          # a channel slice of a wider NCHW tensor: not dense
            return rnd(B, C + 3, H, W)[:, 1:C + 1]
        if layout == "slice_cl":       # a channel slice of a channels_last tensor
            return rnd(B, C + 3, H, W).contiguous(memory_format=torch.channels_last)[:, 2:C + 2]
        if layout == "permuted":       # (B, C, W, H) storage seen transposed
            return rnd(B, C, W, H).transpose(2, 3)
        if layout == "crop":           # a spatial crop: H x W does not flatten
            return rnd(B, C, H + 2, W + 3)[:, :, 1:H + 1, 2:W + 2]
        x = rnd(B, C, H, W)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    def _run(self, x, dy, e_lambda, backend):
        xg = x.detach().requires_grad_()
        y = simam(xg, e_lambda, backend=backend)
        (dx,) = torch.autograd.grad([y], [xg], [dy])
        return y, dx

    def _check(self, shape, dtype, layout, dy_layout=None, e_lambda=1e-4, mean=0.0, std=1.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = self._make(shape, dtype, layout, g, mean, std)
        if dy_layout == "expanded":    # what y.sum().backward() gives: every stride 0
            dy = torch.ones((), device=self.device, dtype=dtype).expand(shape)
        else:
            dy = self._make(shape, dtype, dy_layout or layout, g)
        got = self._run(x, dy, e_lambda, self.backend)
        ref = self._run(x, dy, e_lambda, "torch")
        assert got[0].dtype == got[1].dtype == dtype
        assert got[0].stride() == torch.empty_like(x).stride()
        dx_op = torch.ops.fastattn.simam_backward(dy, x, e_lambda, self.backend)
        assert dx_op.stride() == torch.empty_like(x).stride()
        # float64: the reference module (autograd for dx)
        x64 = x.double().requires_grad_()
        y64 = SimAM(e_lambda)(x64)
        (dx64,) = torch.autograd.grad([y64], [x64], [dy.double()])
        tol = KTOL[dtype]
        for name, a, r, t in zip(("y", "dx"), got, ref, (y64.detach(), dx64)):
            scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
            torch.testing.assert_close(a.double(), t, rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{self.backend} {layout} {dtype} {name} vs float64: {m}")
            # 16-bit types: no further from float64 than the torch backend in the same dtype (x2),
            # plus an ulp (DESIGN.md); 32/64-bit: the tolerance above
            if t.numel() and dtype in (torch.float16, torch.bfloat16):
                err, err_ref = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
                assert err <= 2 * err_ref + 2 * ULP[dtype] * scale, \
                    f"{self.backend} {layout} {dtype} {name}: error {err:.3g}, torch backend's {err_ref:.3g}"

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_matches_float64_and_torch(self, dtype, layout):
        self._check((2, 70, 13, 17), dtype, layout)

    @pytest.mark.parametrize("shape", [(2, 3, 1, 2), (1, 2, 6, 1), (1, 1, 7, 7), (2, 17, 1, 33), (2, 600, 9, 9),
                                       (1, 3, 100, 90), (1, 2, 70, 70), (1, 16, 100, 90), (4, 33, 56, 56),
                                       (1, 64, 129, 130)], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("e_lambda", [1e-4, 0.5])
    def test_odd_shapes(self, shape, layout, e_lambda):
        """The smallest planes, odd H and W, C not a multiple of 16, channel blocks, planes of more
        than kChunk elements (merged chunk moments), pixel segments (few planes or blocks), whole
        planes too large for the CPU backward to keep their gates (> kKeepMax elements)."""
        self._check(shape, torch.float32, layout, e_lambda=e_lambda)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("shape", [(2, 40, 9, 11), (1, 2, 90, 90)], ids=str)
    def test_large_mean(self, dtype, layout, shape):
        """|mean| >> std: the moments are taken about chunk means, no sum(x^2) - n mu^2 cancellation."""
        self._check(shape, dtype, layout, mean=300.0, std=0.5, e_lambda=0.1)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
    @pytest.mark.parametrize("layout,dy_layout", [("channels_last", "nchw"), ("nchw", "channels_last"),
                                                  ("nchw", "expanded"), ("channels_last", "expanded")])
    def test_dy_in_another_layout(self, dtype, layout, dy_layout):
        self._check((2, 70, 13, 17), dtype, layout, dy_layout)

    @pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5)], ids=str)
    def test_empty(self, shape):
        x = torch.randn(shape, device=self.device, requires_grad=True)
        y = simam(x, backend=self.backend)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice", "crop"])
    @pytest.mark.parametrize("e_lambda", [1e-4, 0.5])
    def test_gradcheck(self, layout, e_lambda):
        g = torch.Generator().manual_seed(1)
        x = self._make((2, 3, 4, 5), torch.float64, layout, g).detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: simam(t, e_lambda, backend=self.backend), (x,))

    def test_gradcheck_smallest_plane(self):
        x = torch.randn(2, 3, 1, 2, dtype=torch.float64, device=self.device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: simam(t, 0.1, backend=self.backend), (x,))

    def test_opcheck(self):
        d = self.device
        x = torch.randn(2, 3, 4, 5, device=d, requires_grad=True)
        cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        for xx in (x, cl):
            torch.library.opcheck(torch.ops.fastattn.simam.default, (xx, 1e-4, self.backend))
            torch.library.opcheck(torch.ops.fastattn.simam_backward.default,
                                  (torch.randn(2, 3, 4, 5, device=d), xx.detach(), 0.1, self.backend))
        torch.library.opcheck(torch.ops.fastattn.simam_backward.default,
                              (torch.randn(2, 3, 4, 5, device=d), cl.detach(), 0.1, self.backend))

    def test_deterministic(self):
        """Bitwise repeatable, also across thread counts (segmented planes merge in a fixed order)."""
        g = torch.Generator().manual_seed(4)
        for layout, shape in (("nchw", (1, 3, 100, 90)), ("channels_last", (1, 16, 100, 90)),
                              ("channels_last", (2, 300, 9, 9))):
            x = self._make(shape, torch.float32, layout, g)
            dy = self._make(shape, torch.float32, layout, g)
            runs = []
            for threads in (1, 2, 3, 1):
                old = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    runs.append((torch.ops.fastattn_C.simam(x, 0.1), torch.ops.fastattn_C.simam_backward(dy, x, 0.1)))
                finally:
                    torch.set_num_threads(old)
            for r in runs[1:]:
                assert torch.equal(runs[0][0], r[0]) and torch.equal(runs[0][1], r[1])

    def test_auto_backend(self):
        import importlib

        sm = importlib.import_module("fastattn.ops.simam")
        x = torch.randn(1, 4, 5, 6, device=self.device)
        if self.device == "cpu":
            want = "cpu"
        else:                   # CUDA tensors: Triton first, then the CUDA C++ kernels
            want = "triton" if _dispatch.triton_reason(x) is None else "cuda"
        assert _dispatch.resolve("simam", x, "auto", sm.CHECKS) == want

    def test_raw_op_checks(self):
        d, op = self.device, torch.ops.fastattn_C
        x = torch.randn(2, 3, 4, 5, device=d)
        with pytest.raises(ValueError, match=r"simam: argument 'x' must be 4-D"):
            op.simam(x[0], 0.1)
        with pytest.raises(TypeError, match=r"simam: argument 'x' must be float32, float64, float16 or bfloat16"):
            op.simam(x.int(), 0.1)
        with pytest.raises(ValueError, match=r"simam: argument 'x' must have at least 2 spatial positions"):
            op.simam(x[:, :, :1, :1], 0.1)
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=r"simam: argument 'e_lambda' must be a positive float"):
                op.simam(x, bad)
        with pytest.raises(ValueError, match=r"simam_backward: argument 'dy' must have the shape of 'x'"):
            op.simam_backward(x[:1], x, 0.1)
        with pytest.raises(TypeError, match=r"simam_backward: argument 'dy' must have the dtype of 'x'"):
            op.simam_backward(x.double(), x, 0.1)


@pytest.mark.skipif(_kernel_ready("cpu") is not None, reason=str(_kernel_ready("cpu")))
class TestSimamCpu(_SimamKernelTests):
    device = "cpu"
    backend = "cpu"


@pytest.mark.gpu
class TestSimamCuda(_SimamKernelTests):
    device = "cuda"
    backend = "cuda"

    def test_kernels_are_built(self):
        assert _kernel_ready("cuda") is None, _kernel_ready("cuda")

    @pytest.mark.parametrize("shape", [(8, 256, 56, 56), (32, 512, 7, 7), (2, 64, 112, 112), (1, 4, 300, 300),
                                       (70000, 1, 2, 3)], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
    def test_large_shapes(self, shape, layout, dtype):
        """ResNet-like maps (register-held planes), planes walked in tiles, B * C beyond 65535."""
        self._check(shape, dtype, layout)

    def test_dy_on_another_device(self):
        x = torch.randn(2, 3, 4, 5, device="cuda")
        with pytest.raises(RuntimeError, match=r"simam_backward: .*'dy'"):
            torch.ops.fastattn_C.simam_backward(torch.randn(2, 3, 4, 5), x, 0.1)
