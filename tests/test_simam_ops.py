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
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run here"):
        simam(x, backend="cpu")
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
