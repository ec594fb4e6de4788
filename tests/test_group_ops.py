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


def params(groups, dtype=torch.float64):
    return torch.randn(1, groups, 1, 1, dtype=dtype) * 2, torch.randn(1, groups, 1, 1, dtype=dtype)


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
