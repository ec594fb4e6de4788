"""Triton SGE gate kernels (TRITON_INTERPRET=1, CPU tensors) against the torch backend and float64 math."""
import pytest
import torch

import fastattn.kernels.group as group_kernels
from fastattn.ops.group import sge_gate
from fastattn.reference.spatial import SpatialGroupEnhance

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (B, C, H, W, groups): C / G not a power of two, C == groups, odd planes, H * W = 2,
# C = 70 channels_last, H * W = 1320 > 1024.
SHAPES = [(2, 12, 5, 7, 3), (1, 6, 13, 17, 2), (2, 70, 3, 3, 5), (1, 4, 1, 2, 4), (2, 8, 2, 1, 8),
          (1, 6, 40, 33, 3)]


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    # every other channel of a wider tensor (equal to x, channel stride 2 * H * W)
    yield "channel_slice", torch.stack([x, x], 2).flatten(1, 2)[:, ::2]


def params(groups, g, dtype=torch.float32):
    # random, so that every term of the backward (through the statistics) is exercised
    w = (torch.randn(1, groups, 1, 1, generator=g) * 2).to(dtype)
    b = torch.randn(1, groups, 1, 1, generator=g).to(dtype)
    return w, b


def reference64(x, w, b, groups, dy):
    """Output and (dx, dweight, dbias) of the reference module, float64 autograd."""
    mod = SpatialGroupEnhance(groups).double()
    with torch.no_grad():
        mod.weight.copy_(w)
        mod.bias.copy_(b)
    x64 = x.detach().double().requires_grad_()
    y = mod(x64)
    grads = torch.autograd.grad(y, (x64, mod.weight, mod.bias), dy.double())
    return y.detach(), grads


def run(x, w, b, groups, dy, backend):
    ins = [x.detach().clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    y = sge_gate(*ins, groups, backend=backend)
    y.backward(dy)
    return y.detach(), [t.grad for t in ins]


def assert_near(got, want, tol, what):
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    scale = 1 + (want.abs().max().item() if want.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def check(shape, dtype, layouts_=layouts):
    B, C, H, W, G = shape
    g = torch.Generator().manual_seed(0)
    base = torch.randn(B, C, H, W, generator=g).to(dtype)
    w, b = params(G, g)
    dy = torch.randn(B, C, H, W, generator=g).to(dtype)
    tol = TOL[dtype]
    for layout, x in layouts_(base):
        y, grads = run(x, w, b, G, dy, "triton")
        assert y.dtype == dtype and y.shape == x.shape
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert grads[0].is_contiguous(memory_format=torch.channels_last)
        y_t, grads_t = run(x, w, b, G, dy, "torch")
        y64, grads64 = reference64(x, w, b, G, dy)
        assert_near(y, y64, tol, f"{layout} y")
        for name, got, mine, want in zip(("dx", "dweight", "dbias"), grads, grads_t, grads64):
            assert got.dtype == mine.dtype and got.shape == mine.shape
            assert_near(got, want, tol, f"{layout} {name}")
            # no further from float64 than twice the torch backend's error, plus a few roundings in the
            # result's dtype (summation orders differ)
            err, err_t = ((t.double() - want).abs().max().item() for t in (got, mine))
            ulp = 8 * torch.finfo(got.dtype).eps * (1 + want.abs().max().item())
            assert err <= 2 * err_t + ulp, f"{layout} {name}: {err} vs {err_t}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
def test_fused(shape, dtype):
    check(shape, dtype)


@pytest.mark.parametrize("shape", [(2, 12, 5, 7, 3), (1, 70, 6, 5, 5), (1, 4, 9, 11, 2), (2, 8, 2, 1, 8),
                                   (1, 70, 3, 4, 1)], ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
def test_split(shape, dtype, monkeypatch):
    """The three-pass forward / two-pass backward, with tiles small enough to loop and to split H x W."""
    monkeypatch.setattr(group_kernels, "FUSED_MAX", 0)
    monkeypatch.setattr(group_kernels, "TILE", 64)
    check(shape, dtype)


@pytest.mark.parametrize("fused_max", [8192, 0], ids=["fused", "split"])
def test_float64_exact(fused_max, monkeypatch):
    """float64 in -> float64 math in the kernels: the derivation against autograd to 1e-12."""
    monkeypatch.setattr(group_kernels, "FUSED_MAX", fused_max)
    monkeypatch.setattr(group_kernels, "TILE", 32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 15, 6, 7, generator=g, dtype=torch.float64) + 0.5
    w, b = params(5, g, torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y64, grads64 = reference64(x, w, b, 5, dy)
    for layout, xl in layouts(x):
        assert torch.equal(xl, x), layout
        y, grads = run(xl, w, b, 5, dy, "triton")
        torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, grads64):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused_max", [8192, 0], ids=["fused", "split"])
def test_constant_similarity(fused_max, monkeypatch):
    """xn constant over positions (std 0): t = bias, and the std's gradient is 0 as in torch."""
    monkeypatch.setattr(group_kernels, "FUSED_MAX", fused_max)
    x = torch.ones(2, 6, 3, 4)
    w, b = params(3, torch.Generator().manual_seed(2))
    dy = torch.randn(x.shape)
    y, grads = run(x, w, b, 3, dy, "triton")
    y64, grads64 = reference64(x, w, b, 3, dy)
    torch.testing.assert_close(y.double(), y64)
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_transposed_plane_and_expanded_gradient():
    """A view whose H x W does not flatten (copied), and dy as a broadcast view (stride 0)."""
    x = torch.randn(2, 6, 4, 5).transpose(2, 3)
    w, b = params(2, torch.Generator().manual_seed(3))
    dy = torch.ones(1, 1, 1, 1).expand(x.shape)
    y, grads = run(x, w, b, 2, dy, "triton")
    y_t, grads_t = run(x, w, b, 2, dy, "torch")
    assert y.stride() == y_t.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(y, y_t)
    for got, want in zip(grads, grads_t):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    x = torch.randn(0, 6, 3, 3, requires_grad=True)
    w, b = (t.requires_grad_() for t in params(3, torch.Generator().manual_seed(4)))
    y = sge_gate(x, w, b, 3, backend="triton")
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_low_precision_parameters():
    """Parameters in bf16 like a module converted with .bfloat16(): gradients come back in bf16."""
    x = torch.randn(2, 8, 5, 5, dtype=torch.bfloat16)
    w, b = params(4, torch.Generator().manual_seed(5), torch.bfloat16)
    y, grads = run(x, w, b, 4, torch.randn(x.shape, dtype=torch.bfloat16), "triton")
    assert y.dtype == torch.bfloat16 and grads[1].dtype == grads[2].dtype == torch.bfloat16


@pytest.mark.parametrize("fused_max", [8192, 0], ids=["fused", "split"])
def test_deterministic(fused_max, monkeypatch):
    monkeypatch.setattr(group_kernels, "FUSED_MAX", fused_max)
    monkeypatch.setattr(group_kernels, "TILE", 128)
    x = torch.randn(1, 8, 19, 23)
    w, b = params(2, torch.Generator().manual_seed(6))
    dy = torch.randn(x.shape)
    first = run(x, w, b, 2, dy, "triton")[1]
    second = run(x, w, b, 2, dy, "triton")[1]
    for a, c in zip(first, second):
        assert torch.equal(a, c)
