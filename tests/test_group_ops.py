"""fastattn::sge_gate on the CPU (torch backend): math, gradcheck, opcheck, errors, dispatch; Triton on CUDA."""
import pytest
import torch

from fastattn.ops import _dispatch
from fastattn.ops.group import sge_gate
from fastattn.reference.spatial import SpatialGroupEnhance


def sge64(x, w, b, groups, eps=1e-5):
    """Independent float64 math, written out from the SGE paper / official code."""
    B, C, H, W = x.shape
    xg = x.double().reshape(B, groups, C // groups, H * W)
    sim = (xg * xg.mean(3, keepdim=True)).sum(2)                                  # (B, G, HW)
    mean = sim.sum(2, keepdim=True) / (H * W)
    std = ((sim - mean).square().sum(2, keepdim=True) / (H * W - 1)).sqrt()
    t = (sim - mean) / (std + eps) * w.double().view(1, groups, 1) + b.double().view(1, groups, 1)
    return (xg * torch.sigmoid(t)[:, :, None]).reshape(B, C, H, W)


def module(groups, w, b, dtype=torch.float64):
    mod = SpatialGroupEnhance(groups).to(dtype)
    with torch.no_grad():
        mod.weight.copy_(w)
        mod.bias.copy_(b)
    return mod


def params(groups, dtype=torch.float64, gen=None):
    return (torch.randn(1, groups, 1, 1, dtype=dtype, generator=gen) * 2,
            torch.randn(1, groups, 1, 1, dtype=dtype, generator=gen))


@pytest.mark.parametrize("shape", [(2, 12, 5, 7, 3), (1, 6, 13, 17, 2), (2, 4, 1, 2, 4), (3, 64, 4, 4, 64)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_math_and_format(shape, layout):
    B, C, H, W, G = shape
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = torch.stack([x, x], 2).flatten(1, 2)[:, ::2]
    w, b = params(G)
    y = sge_gate(x, w, b, G)
    torch.testing.assert_close(y, sge64(x, w, b, G), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, module(G, w, b)(x), rtol=1e-12, atol=1e-12)
    assert y.stride() == torch.empty_like(x).stride()


def test_gradients_match_reference_module():
    x = torch.randn(2, 15, 6, 7, dtype=torch.float64, requires_grad=True)
    w, b = (t.requires_grad_() for t in params(5))
    mod = module(5, w.detach(), b.detach())
    dy = torch.randn(x.shape, dtype=torch.float64)
    want = torch.autograd.grad(mod(x), (x, mod.weight, mod.bias), dy)
    got = torch.autograd.grad(sge_gate(x, w, b, 5), (x, w, b), dy)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_eps_placement():
    """eps is added to the standard deviation (not inside the square root)."""
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    w, b = params(3)
    torch.testing.assert_close(sge_gate(x, w, b, 3, eps=0.5), sge64(x, w, b, 3, eps=0.5))


def test_constant_similarity_gradient():
    """std 0: the forward is sigmoid(bias) and the std's gradient is masked to 0, as in torch."""
    x = torch.ones(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    w, b = (t.requires_grad_() for t in params(3))
    mod = module(3, w.detach(), b.detach())
    dy = torch.randn(x.shape, dtype=torch.float64)
    want = torch.autograd.grad(mod(x), (x, mod.weight, mod.bias), dy)
    got = torch.autograd.grad(sge_gate(x, w, b, 3), (x, w, b), dy)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 6, 3, 4, 3), (1, 4, 2, 1, 4), (2, 6, 3, 3, 1)], ids=str)
def test_gradcheck(layout, shape):
    B, C, H, W, G = shape
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = params(G)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda *t: sge_gate(*t, G, backend="torch"), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    """16-bit x with float32 parameters: math in float32, output in x's dtype, grads in the parameters'."""
    x = torch.randn(2, 8, 5, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = (t.float().requires_grad_() for t in params(4))
    y = sge_gate(x, w, b, 4)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), sge64(x, w.detach(), b.detach(), 4), rtol=tol, atol=tol)
    y.sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_empty_batch():
    x = torch.randn(0, 6, 3, 3, requires_grad=True)
    w, b = (t.float().requires_grad_() for t in params(3))
    y = sge_gate(x, w, b, 3)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_opcheck():
    x = torch.randn(2, 6, 4, 5, requires_grad=True)
    w, b = (t.float().requires_grad_() for t in params(3))
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for xi in (x, cl):
        torch.library.opcheck(torch.ops.fastattn.sge_gate.default, (xi, w, b, 3, 1e-5, "torch"))
    y, m, mu, sd = torch.ops.fastattn.sge_gate(x.detach(), w.detach(), b.detach(), 3, 1e-5, "torch")
    for xi in (x.detach(), cl.detach()):
        torch.library.opcheck(torch.ops.fastattn.sge_gate_backward.default,
                              (torch.randn(xi.shape), xi, w.detach(), b.detach(), m, mu, sd, 3, 1e-5, "torch"))


def test_compile_fullgraph():
    w, b = (t.float() for t in params(4))

    def f(x):
        return sge_gate(x, w, b, 4) * 2

    x = torch.randn(2, 8, 5, 5)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


W4 = torch.zeros(1, 4, 1, 1)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(2, 8, 4), W4, W4, 4), {}, ValueError, r"sge_gate: argument 'x' must be 4-D"),
    ((torch.ones(2, 8, 4, 4, dtype=torch.int32), W4, W4, 4), {}, TypeError, r"argument 'x' must be a floating"),
    (([1.0], W4, W4, 4), {}, TypeError, r"argument 'x' must be a torch.Tensor"),
    ((torch.randn(2, 6, 4, 4), W4, W4, 4), {}, ValueError, r"argument 'x' must have channels divisible by groups=4"),
    ((torch.randn(2, 8, 1, 1), W4, W4, 4), {}, ValueError, r"argument 'x' must have at least 2 spatial positions"),
    ((torch.randn(2, 8, 4, 4), W4, W4, 0), {}, ValueError, r"argument 'groups' must be a positive int"),
    ((torch.randn(2, 8, 4, 4), W4, W4, 4.0), {}, ValueError, r"argument 'groups' must be a positive int"),
    ((torch.randn(2, 8, 4, 4), torch.zeros(4), W4, 4), {}, ValueError, r"argument 'weight' must be 4-D"),
    ((torch.randn(2, 8, 4, 4), torch.zeros(1, 2, 1, 1), W4, 4), {}, ValueError,
     r"argument 'weight' must have shape \(1, groups, 1, 1\)"),
    ((torch.randn(2, 8, 4, 4), W4, torch.zeros(1, 4, 1, 2), 4), {}, ValueError,
     r"argument 'bias' must have shape \(1, groups, 1, 1\)"),
    ((torch.randn(2, 8, 4, 4), W4.long(), W4, 4), {}, TypeError, r"argument 'weight' must be a floating"),
    ((torch.randn(2, 8, 4, 4), W4, W4, 4), {"eps": -1.0}, ValueError, r"argument 'eps' must be a non-negative"),
    ((torch.randn(2, 8, 4, 4), W4, W4, 4), {"backend": "fast"}, ValueError, r"argument 'backend' must be one of"),
])
def test_bad_arguments(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        sge_gate(*args, **kwargs)


def test_explicit_backend_that_cannot_run_says_why():
    if _dispatch.triton_interpreting():
        pytest.skip("interpreter on")
    x, w = torch.randn(1, 4, 3, 3), torch.zeros(1, 2, 1, 1)
    with pytest.raises(RuntimeError, match=r"sge_gate: backend='triton' cannot run here: .*(CUDA|not installed)"):
        sge_gate(x, w, w, 2, backend="triton")
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run here"):
        sge_gate(x, w, w, 2, backend="cuda")
    assert sge_gate(x, w, w, 2, backend="auto").shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 256, 56, 56, 64), (8, 1024, 14, 14, 64), (4, 512, 28, 28, 8)], ids=str)
def test_triton_on_cuda(shape, dtype, layout):
    """Realistic SGE-ResNet shapes (split path for 56 x 56, fused for 14 x 14) against the torch backend."""
    B, C, H, W, G = shape
    x = torch.randn(B, C, H, W, device="cuda").to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(1, G, 1, 1, device="cuda") * 2).requires_grad_()
    b = torch.randn(1, G, 1, 1, device="cuda").requires_grad_()
    dy = torch.randn_like(x)
    outs = []
    for backend in ("triton", "torch"):
        ins = [x.clone().requires_grad_(), w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()]
        y = sge_gate(*ins, G, backend=backend)
        y.backward(dy)
        outs.append([y.detach()] + [t.grad for t in ins])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(*outs):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)
    assert outs[0][0].stride() == x.stride()


# ---------------------------------------------------------------------------------------------
# The C++ kernels of fastattn._C: backend="cpu" (OpenMP) and backend="cuda" (CUDA C++, gpu marker)
# ---------------------------------------------------------------------------------------------

KERNEL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KERNEL_LAYOUTS = ["nchw", "channels_last", "slice", "slice_cl", "permuted", "misaligned", "misaligned_cl"]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel(request):
    """The backend under test; skipped (with the reason) where fastattn._C lacks its kernels, except
    on a GPU machine, where a missing CUDA kernel is a failure."""
    from fastattn.ops import group

    why = group.CHECKS[request.param](torch.empty(0, device=request.param))
    if why and request.param == "cuda":
        pytest.fail(f"backend='cuda' cannot run on this GPU machine: {why}")
    if why:
        pytest.skip(why)
    return request.param


def make_map(shape, dtype, layout, device, gen):
    """A (B, C, H, W) tensor of random values in one of the layouts the kernels handle."""
    B, C, H, W = shape
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    if layout == "nchw":
        return rnd(B, C, H, W)
    if layout == "channels_last":
        return rnd(B, C, H, W).contiguous(memory_format=torch.channels_last)
    if layout == "slice":               # channel slice of a wider NCHW tensor: not dense
        return rnd(B, C + 3, H, W)[:, 1:C + 1]
    if layout == "slice_cl":            # channel slice of a channels_last tensor
        return rnd(B, C + 3, H, W).contiguous(memory_format=torch.channels_last)[:, 2:C + 2]
    if layout == "permuted":            # H x W does not flatten: the generic path
        return rnd(B, C, W, H).transpose(2, 3)
    if layout == "misaligned":          # dense NCHW one element off a 16-byte boundary
        return rnd(B * C * H * W + 1)[1:].view(B, C, H, W)
    if layout == "misaligned_cl":
        return rnd(B * C * H * W + 1)[1:].view(B, H, W, C).permute(0, 3, 1, 2)
    raise ValueError(layout)


def sge_reference64(x, dy, w, b, groups):
    """(y, dx, dweight, dbias) of the reference module in float64 (autograd)."""
    mod = module(groups, w.double().cpu(), b.double().cpu())
    x64 = x.detach().double().cpu().requires_grad_()
    y = mod(x64)
    y.backward(dy.double().cpu())
    return y.detach(), x64.grad, mod.weight.grad, mod.bias.grad


def run_sge(x, dy, w, b, groups, backend):
    xg = x.detach().requires_grad_()
    wg, bg = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y = sge_gate(xg, wg, bg, groups, backend=backend)
    y.backward(dy)
    return y.detach(), xg.grad, wg.grad, bg.grad


def check_against_reference(got, same, want, dtype, what):
    """fp32/fp64: close to the float64 reference relative to its scale (or at most 3x as far as the
    torch backend in the same dtype, for sums whose fp32 rounding is large: 2048-channel groups);
    fp16/bf16: at most twice as far from it as the torch backend in the same dtype (plus a hair)."""
    for name, g, s, r in zip(("y", "dx", "dweight", "dbias"), got, same, want):
        g, s, r = g.double().cpu(), s.double().cpu(), r.reshape(g.shape)
        scale = max(r.abs().max().item(), 1e-30)
        err = (g - r).abs().max().item() / scale
        base = (s - r).abs().max().item() / scale
        if dtype in (torch.float32, torch.float64):
            tol = 2e-5 if dtype == torch.float32 else 1e-10
            assert err <= max(tol, 3 * base), f"{what} {name}: error {err:.2e} x scale {scale:.2e}, torch's {base:.2e}"
        else:
            assert err <= 2 * base + 1e-5, f"{what} {name}: error {err:.2e}, torch backend's {base:.2e}"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", KERNEL_LAYOUTS)
def test_kernel_matches_reference(kernel, dtype, layout):
    gen = torch.Generator().manual_seed(0)
    shape, G = (2, 24, 13, 17), 6
    x = make_map(shape, dtype, layout, kernel, gen)
    dy = make_map(shape, dtype, "nchw", kernel, gen)
    if layout in ("channels_last", "slice_cl", "misaligned_cl"):
        dy = dy.contiguous(memory_format=torch.channels_last)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = (t.to(pdt).to(kernel) for t in params(G, gen=gen))
    got = run_sge(x, dy, w, b, G, kernel)
    same = run_sge(x, dy, w, b, G, "torch")
    check_against_reference(got, same, sge_reference64(x, dy, w, b, G), dtype, f"{kernel} {layout}")
    y, dx = got[:2]
    assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    assert got[2].dtype == w.dtype and got[2].shape == w.shape
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert dx.stride() == x.stride()


# Shapes with teeth: Cg = 1, C == groups, Cg not a multiple of the vector width, 1 x 2 maps, odd
# H x W, positions crossing the 256-position tiles, few slabs (positions split across jobs / blocks:
# (1, 4, 128, 192) and (1, 8, 97, 203) on the CPU), wide groups (2048 channels), channels_last
# blocks of several groups ending in a partial block (Cg = 3, 2, 8), empty tensors.
ODD_SHAPES = [((1, 4, 1, 2), 4), ((3, 6, 7, 7), 6), ((2, 48, 9, 11), 1), ((2, 18, 5, 3), 2),
              ((1, 4, 128, 192), 1), ((1, 8, 97, 203), 2), ((2, 2048, 3, 5), 1), ((2, 30, 5, 6), 10),
              ((2, 44, 6, 6), 22), ((2, 40, 6, 6), 5), ((0, 8, 5, 5), 4), ((2, 0, 3, 3), 2)]


@pytest.mark.parametrize("shape,G", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "permuted"])
def test_kernel_odd_shapes(kernel, shape, G, layout):
    gen = torch.Generator().manual_seed(1)
    x = make_map(shape, torch.float32, layout, kernel, gen)
    dy = make_map(shape, torch.float32, "nchw", kernel, gen)
    w, b = (t.float().to(kernel) for t in params(G, gen=gen))
    got = run_sge(x, dy, w, b, G, kernel)
    if x.numel() == 0:
        assert got[0].shape == x.shape and not got[2].any() and not got[3].any()
        return
    same = run_sge(x, dy, w, b, G, "torch")
    check_against_reference(got, same, sge_reference64(x, dy, w, b, G), torch.float32, f"{kernel} {shape} {layout}")


def test_kernel_statistics_outputs(kernel):
    """m, mu, sd: the float32 statistics the backward consumes, as the torch backend computes them."""
    gen = torch.Generator().manual_seed(2)
    for layout in ("nchw", "channels_last"):
        x = make_map((2, 12, 9, 10), torch.bfloat16, layout, kernel, gen)
        w, b = (t.float().to(kernel) for t in params(3, gen=gen))
        got = torch.ops.fastattn.sge_gate(x, w, b, 3, 1e-5, kernel)
        want = torch.ops.fastattn.sge_gate(x, w, b, 3, 1e-5, "torch")
        for g, h in zip(got[1:], want[1:]):
            assert g.dtype == torch.float32 and g.is_contiguous()
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_kernel_dy_layouts(kernel):
    """dy in the other memory format, and the expanded (stride 0) dy of y.sum().backward()."""
    gen = torch.Generator().manual_seed(3)
    w, b = (t.float().to(kernel) for t in params(4, gen=gen))
    for layout, dy_layout in (("nchw", "channels_last"), ("channels_last", "nchw"), ("slice_cl", "nchw")):
        x = make_map((2, 16, 11, 9), torch.float32, layout, kernel, gen)
        dy = make_map((2, 16, 11, 9), torch.float32, dy_layout, kernel, gen)
        check_against_reference(run_sge(x, dy, w, b, 4, kernel), run_sge(x, dy, w, b, 4, "torch"),
                                sge_reference64(x, dy, w, b, 4), torch.float32, f"{layout} / dy {dy_layout}")
        dy1 = torch.ones(1, device=kernel).expand(x.shape)
        check_against_reference(run_sge(x, dy1, w, b, 4, kernel), run_sge(x, dy1, w, b, 4, "torch"),
                                sge_reference64(x, dy1, w, b, 4), torch.float32, f"{layout} / dy expanded")


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
def test_kernel_gradcheck(kernel, layout):
    gen = torch.Generator().manual_seed(4)
    x = make_map((2, 6, 3, 5), torch.float64, layout, kernel, gen).requires_grad_()
    w, b = (t.to(kernel).requires_grad_() for t in params(3, gen=gen))
    assert torch.autograd.gradcheck(lambda *t: sge_gate(*t, 3, backend=kernel), (x, w, b))


def test_kernel_constant_similarity(kernel):
    """std 0 (constant x): sigmoid(bias) forward, the std's gradient masked to 0 (as torch)."""
    x = torch.ones(2, 6, 3, 4, dtype=torch.float64, device=kernel)
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=gen).to(kernel)
    w, b = (t.to(kernel) for t in params(3, gen=gen))
    got, want = run_sge(x, dy, w, b, 3, kernel), run_sge(x, dy, w, b, 3, "torch")
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_kernel_opcheck(kernel):
    w, b = (t.float().to(kernel).requires_grad_() for t in params(3, gen=torch.Generator().manual_seed(8)))
    x = torch.randn(2, 6, 4, 5, device=kernel, requires_grad=True)
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for xi in (x, cl):
        torch.library.opcheck(torch.ops.fastattn.sge_gate.default, (xi, w, b, 3, 1e-5, kernel))
        _, m, mu, sd = torch.ops.fastattn.sge_gate(xi.detach(), w.detach(), b.detach(), 3, 1e-5, kernel)
        torch.library.opcheck(torch.ops.fastattn.sge_gate_backward.default,
                              (torch.randn(xi.shape, device=kernel), xi.detach(), w.detach(), b.detach(), m, mu, sd,
                               3, 1e-5, kernel))


def test_kernel_deterministic(kernel):
    """Bitwise the same on every run, and (CPU) whatever the number of threads, also with the
    positions of a slab split across jobs."""
    gen = torch.Generator().manual_seed(6)
    for shape, G in (((1, 8, 97, 203), 2), ((4, 64, 20, 20), 16)):
        for layout in ("nchw", "channels_last"):
            x = make_map(shape, torch.float32, layout, kernel, gen)
            dy = make_map(shape, torch.float32, layout, kernel, gen)
            w, b = (t.float().to(kernel) for t in params(G, gen=gen))
            runs = []
            threads = torch.get_num_threads()
            for n in ([1, 2, 3] if kernel == "cpu" else [threads] * 3):
                torch.set_num_threads(n)
                try:
                    y, m, mu, sd = torch.ops.fastattn.sge_gate(x, w, b, G, 1e-5, kernel)
                    runs.append((y, m, mu, sd,
                                 *torch.ops.fastattn.sge_gate_backward(dy, x, w, b, m, mu, sd, G, 1e-5, kernel)))
                finally:
                    torch.set_num_threads(threads)
            for other in runs[1:]:
                assert all(torch.equal(a, c) for a, c in zip(runs[0], other)), f"{shape} {layout}"


def test_kernel_auto_on_device(kernel):
    from fastattn.ops import group

    x = torch.randn(1, 4, 3, 3, device=kernel)
    want = "cpu" if kernel == "cpu" else None
    if want:
        assert _dispatch.resolve("sge_gate", x, "auto", group.CHECKS) == "cpu"
    assert _dispatch.resolve("sge_gate", x, kernel, group.CHECKS) == kernel


def test_kernel_raw_op_checks(kernel):
    raw, bwd = torch.ops.fastattn_C.sge_gate, torch.ops.fastattn_C.sge_gate_backward
    x = torch.randn(2, 8, 4, 4, device=kernel)
    w = torch.zeros(4, device=kernel)
    m, mu = torch.zeros(2, 8, device=kernel), torch.zeros(2, 4, device=kernel)
    with pytest.raises(TypeError, match=r"sge_gate: argument 'weight' must be Float"):
        raw(x, w.double(), w, 4, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'bias' must have shape \(groups,\)"):
        raw(x, w, torch.zeros(3, device=kernel), 4, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'x' must have channels divisible by groups=3"):
        raw(x, torch.zeros(3, device=kernel), torch.zeros(3, device=kernel), 3, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'x' must have at least 2 spatial positions"):
        raw(x[:, :, :1, :1], w, w, 4, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'x' must be 4-D"):
        raw(x[0], w, w, 4, 1e-5)
    with pytest.raises(TypeError, match=r"argument 'x' must be float32, float64, float16 or bfloat16"):
        raw(x.int(), w, w, 4, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'eps' must be a non-negative"):
        raw(x, w, w, 4, -1.0)
    with pytest.raises(TypeError, match=r"sge_gate_backward: argument 'dy' must have the dtype of 'x'"):
        bwd(x.half(), x, w, w, m, mu, mu, 4, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'm' must have shape \(B, C\)"):
        bwd(x, x, w, w, mu, mu, mu, 4, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'sd' must have shape \(B, groups\)"):
        bwd(x, x, w, w, m, mu, m, 4, 1e-5)
    other = "cpu" if kernel == "cuda" else None
    if other:
        with pytest.raises(RuntimeError, match=r"sge_gate: .*'weight'"):
            raw(x, w.cpu(), w, 4, 1e-5)


@pytest.mark.gpu
def test_cuda_kernel_large_shapes():
    """SGE-ResNet stage shapes (one block per slab) and few large slabs (positions split across
    blocks) against the torch backend, both layouts."""
    from fastattn.ops import group

    why = group.CHECKS["cuda"](torch.empty(0, device="cuda"))
    assert why is None, why
    gen = torch.Generator().manual_seed(7)
    for shape, G in (((8, 256, 56, 56), 64), ((8, 1024, 14, 14), 64), ((1, 64, 200, 200), 2), ((2, 512, 7, 7), 1)):
        for layout in ("nchw", "channels_last"):
            x = make_map(shape, torch.float32, layout, "cuda", gen)
            dy = make_map(shape, torch.float32, layout, "cuda", gen)
            w, b = (t.float().cuda() for t in params(G, gen=gen))
            got, want = run_sge(x, dy, w, b, G, "cuda"), run_sge(x, dy, w, b, G, "torch")
            for name, g, h in zip(("y", "dx", "dweight", "dbias"), got, want):
                scale = h.abs().max().item()
                torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{shape} {layout} {name}: {m}")
