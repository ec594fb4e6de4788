"""SimAM's CPU training kernels (torch.ops.fastattn_C.simam_train_forward / _backward: the forward
saves each plane's (mu, r), the backward uses them instead of recomputing the plane statistics)
and fastattn.SimAM's use of them."""
import pytest
import torch

import fastattn
from cases.paths import op_names, check_backward_twice
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

OPS = torch.ops.fastattn_C if _ext.available() else None
LAMBDA = 0.1


def layouts(x):
    """x as NCHW, channels_last and a strided view (the kernels' plane, channel and generic sweeps)."""
    wide = torch.cat([x, x], dim=3)[..., ::2]            # every other column: neither layout
    return {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last), "strided": wide}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 3, 1, 2), (33, 4, 14, 14), (2, 40, 5, 6), (1, 40, 64, 65),
                                   (1, 2, 130, 131)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_kernels_equal_the_recomputing_ones(dtype, shape, layout):
    """y equals simam's, the saved stats are each plane's (mu, r) (float64 reference), and dx from
    them equals simam_backward's (which recomputes them; bit for bit in NCHW, the module's path).
    1x2x130x131: planes split into segments (few planes); 33x4x14x14: more planes than threads;
    2x40x5x6: channels_last in blocks of 16 channels (1x40x64x65: and segments)."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = layouts((torch.randn(shape, generator=gen) * 2 + torch.randn(shape[0], shape[1], 1, 1, generator=gen))
                .to(dtype))[layout]
    dy = layouts(torch.randn(shape, generator=gen).to(dtype))[layout]
    y, stats = OPS.simam_train_forward(x, LAMBDA)
    assert stats.shape == (shape[0], shape[1], 2) and stats.dtype == torch.float64
    torch.testing.assert_close(y, OPS.simam(x, LAMBDA), rtol=0, atol=0)
    xd = x.double()
    n = shape[2] * shape[3]
    mu = xd.mean(dim=(2, 3))
    r = 1.0 / (4.0 * (((xd - mu[..., None, None]) ** 2).sum(dim=(2, 3)) / (n - 1) + LAMBDA))
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(stats[..., 0], mu, rtol=rel, atol=rel * xd.abs().max().item())
    torch.testing.assert_close(stats[..., 1], r, rtol=rel, atol=0)
    dx = OPS.simam_train_backward(dy, x, stats)
    # NCHW: forward and backward cut the planes alike, so the same bits; channels_last blocks are cut by
    # bytes per element of the tensors swept (x; dy and x), so the moments may merge in another order
    exact = layout == "nchw"
    tol = 0 if exact else {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(dx, OPS.simam_backward(dy, x, LAMBDA), rtol=tol, atol=tol)


def test_backward_uses_the_saved_stats():
    """A changed r changes dx: the backward reads the stats rather than recomputing them."""
    gen = torch.Generator().manual_seed(3)
    x, dy = torch.randn(2, 3, 14, 14, generator=gen), torch.randn(2, 3, 14, 14, generator=gen)
    _, stats = OPS.simam_train_forward(x, LAMBDA)
    other = stats.clone()
    other[1, 2, 1] *= 1.5
    dx, dx_other = OPS.simam_train_backward(dy, x, stats), OPS.simam_train_backward(dy, x, other)
    assert not torch.equal(dx[1, 2], dx_other[1, 2])
    torch.testing.assert_close(dx[0], dx_other[0], rtol=0, atol=0)


def test_kernel_errors():
    x = torch.randn(2, 3, 4, 5)
    _, stats = OPS.simam_train_forward(x, LAMBDA)
    with pytest.raises(ValueError, match=r"simam_train_backward: argument 'stats' must be a contiguous float64 tensor "
                                         r"of shape \(2, 3, 2\)"):
        OPS.simam_train_backward(x, x, stats.float())
    with pytest.raises(ValueError, match=r"argument 'stats' must be .* got Double \[3, 2, 2\]"):
        OPS.simam_train_backward(x, x, stats.reshape(3, 2, 2))
    with pytest.raises(ValueError, match=r"\(not contiguous\)"):
        OPS.simam_train_backward(x, x, torch.zeros(2, 2, 3, dtype=torch.float64).transpose(1, 2))
    with pytest.raises(ValueError, match=r"simam_train_backward: argument 'dy' must have the shape of 'x'"):
        OPS.simam_train_backward(x[:1], x, stats)
    with pytest.raises(TypeError, match=r"simam_train_backward: argument 'dy' must have the dtype of 'x'"):
        OPS.simam_train_backward(x.double(), x, stats)
    with pytest.raises(ValueError, match=r"simam_train_forward: argument 'e_lambda' must be a positive float"):
        OPS.simam_train_forward(x, 0.0)


def simam_float64(x, e_lambda):
    """SimAM in float64 autograd (the reference module's math)."""
    return fastattn.reference.SimAM(e_lambda)(x.double())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-10), (torch.bfloat16, 3e-2),
                                       (torch.float16, 3e-3)], ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(4, 8, 14, 14), (3, 5, 7, 9), (2, 2, 1, 3)], ids=lambda s: "x".join(map(str, s)))
def test_module_training_matches_float64(dtype, tol, shape):
    """fastattn.SimAM in training takes the kernels (profiler) and matches float64 autograd of
    the reference: y and dx."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    module = fastattn.SimAM(LAMBDA).train()
    xf, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    assert module.saves_stats(xf)
    ran = op_names(lambda: module(xf).backward(dy))
    assert {"fastattn_C::simam_train_forward", "fastattn_C::simam_train_backward"} <= ran
    assert "fastattn_C::simam_backward" not in ran
    y = module(xf)
    yd = simam_float64(xd, LAMBDA)
    yd.backward(dy.double())
    xf.grad = None
    y.backward(dy)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), yd.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(xf.grad.double(), xd.grad, rtol=tol, atol=tol)


def test_module_non_contiguous_dy_and_backward_twice():
    module = fastattn.SimAM(LAMBDA).train()
    x = torch.randn(3, 4, 6, 5)
    check_backward_twice(module, x)
    xr = x.clone().requires_grad_()
    xf = x.clone().requires_grad_()
    module(xf).sum().backward()          # a stride-0 dy
    simam_float64(xr, LAMBDA).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad.float(), rtol=2e-5, atol=2e-5)


def test_module_conditions():
    """The kernels only where a gradient of x is recorded on an NCHW CPU tensor under backend
    auto/cpu; otherwise the op path (same results)."""
    module = fastattn.SimAM(LAMBDA)
    x = torch.randn(2, 3, 5, 5)
    assert module.saves_stats(x.requires_grad_())
    assert not module.saves_stats(x.detach())
    with torch.no_grad():
        assert not module.saves_stats(x)
    assert not module.saves_stats(x.detach().contiguous(memory_format=torch.channels_last).requires_grad_())
    module.backend = "torch"
    assert not module.saves_stats(x)
    ran = op_names(lambda: module(x).sum().backward())
    assert "fastattn_C::simam_train_forward" not in ran
    module.backend = None
    with fastattn.use_backend("torch"):
        assert not module.saves_stats(x)


def test_module_argument_errors():
    """The same errors as the op path."""
    module = fastattn.SimAM(LAMBDA)
    with pytest.raises(ValueError, match=r"simam: argument 'x' must have at least 2 spatial positions"):
        module(torch.randn(2, 3, 1, 1, requires_grad=True))
    module.e_lambda = -1.0                # set after construction (the constructor checks it too)
    with pytest.raises(ValueError, match=r"simam: argument 'e_lambda' must be a positive float"):
        module(torch.randn(2, 3, 4, 4, requires_grad=True))
